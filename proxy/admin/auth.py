"""Who may use the admin API, and for what.

Routes fall into groups (:class:`RouteGroup`). Probes, metrics and the viewer's static
files are open; every other route needs a static bearer token (from settings or files,
compared in constant time) or a JWT signed by a key of the configured JWKS (with the one
algorithm that key is for), unexpired, with an ``exp``, the configured audience and issuer,
and the group's scope. A loopback listener with no authentication configured lets every local
caller in; a non-loopback one refuses to start (:class:`AdminExposed`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from proxy.audit.identity import Identity, JwksKeys, identity_from_headers
from proxy.settings import AdminSettings, IdentitySettings

ADMIN_CLAIMS = ("exp",)
"""Claims every admin JWT must carry: a token that never expires is a standing key."""


class RouteGroup(StrEnum):
    """What a route gives access to; each non-open group has its own JWT scope."""

    OPEN = "open"
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class AdminExposed(SystemExit):
    """The admin listener would be reachable from the network with no authentication.
    A ``SystemExit``: the process stops with this one line, not a traceback."""


@dataclass(frozen=True, slots=True)
class StaticToken:
    """One configured bearer token and the name it is recorded under."""

    secret: bytes
    label: str
    """``token:1`` for the first token in settings, ``token:{file name}`` for a file."""


@dataclass(frozen=True, slots=True)
class AdminCaller:
    """An authenticated admin caller, as the access audit records it. Holds no credential."""

    identity: Identity
    """The caller as an ``Identity`` (user id, name, client, scopes); ``token_kind`` is
    ``jwt`` for JWTs, ``opaque`` for static tokens, ``none`` for unauthenticated loopback."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: 401 (no or bad credential) or 403 (wrong scope)."""

    status: int
    reason: str


def load_static_tokens(settings: AdminSettings) -> tuple[StaticToken, ...]:
    """The tokens from settings and from ``token_files`` (read now; blank lines skipped)."""
    tokens = [
        StaticToken(t.get_secret_value().encode(), f"token:{i}")
        for i, t in enumerate(settings.tokens, start=1)
        if t.get_secret_value()
    ]
    for path in settings.token_files:
        for line in path.read_text().splitlines():
            if line.strip():
                tokens.append(StaticToken(line.strip().encode(), f"token:{path.name}"))
    return tuple(tokens)


def check_exposure(settings: AdminSettings) -> None:
    """Raise :class:`AdminExposed` for a non-loopback listener with no authentication
    (``run`` refuses such a configuration before, with ``check-config``'s error)."""
    exposure = settings.exposure()
    if exposure is not None:
        raise AdminExposed(f"fhir-audit-proxy: refusing to start: {exposure}")


class AdminAuth:
    """Decides each admin request. ``keys`` gives the current JWKS (None while unknown)."""

    def __init__(
        self,
        settings: AdminSettings,
        *,
        tokens: tuple[StaticToken, ...],
        keys: Callable[[], JwksKeys | None] | None = None,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._keys = keys
        self._open = not settings.authenticates
        self._jwt = IdentitySettings(
            jwks_url=settings.jwks_url, audience=settings.audience, issuer=settings.issuer
        )

    def use_keys(self, keys: Callable[[], JwksKeys | None]) -> None:
        """Verify JWTs with ``keys`` from now on (the JWKS cache, once it has started)."""
        self._keys = keys

    def scope_for(self, group: RouteGroup) -> str:
        scopes = self._settings.scopes
        return {RouteGroup.READ: scopes.read, RouteGroup.WRITE: scopes.write}.get(
            group, scopes.admin
        )

    def authorize(self, group: RouteGroup, headers: Mapping[str, str]) -> AdminCaller | Refusal:
        """The caller of a request to a route of ``group`` (``headers`` with lower-case
        names), or why it is refused."""
        if group is RouteGroup.OPEN or self._open:
            return AdminCaller(Identity())
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        credential = presented.strip()
        if scheme.lower() != "bearer" or not credential:
            return Refusal(401, "the admin API needs a bearer token")
        given = credential.encode()
        # Compare against every token, without stopping at a match, so the time taken
        # does not tell which one matched or how far a guess got.
        matched: StaticToken | None = None
        for token in self._tokens:
            if hmac.compare_digest(given, token.secret):
                matched = token
        if matched is not None:
            return AdminCaller(
                Identity(token_kind="opaque", user_id=matched.label, user_name=matched.label)
            )
        if self._keys is None:
            return Refusal(401, "the bearer token was not accepted")
        keys = self._keys()
        if keys is None:
            return Refusal(401, "the bearer token cannot be checked: no signing keys known yet")
        identity = identity_from_headers(
            {"authorization": f"Bearer {credential}"}, self._jwt, keys, require=ADMIN_CLAIMS
        )
        if identity.token_kind != "jwt" or not identity.verified:
            why = identity.failure or "not a JWT"
            return Refusal(401, f"the bearer token was not accepted ({why})")
        scope = self.scope_for(group)
        if scope not in identity.scopes:
            return Refusal(403, f"the token lacks the scope {scope!r}")
        return AdminCaller(identity)
