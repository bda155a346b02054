"""Who is calling, read from the ``Authorization`` header, never keeping the credential.

A bearer JWT gives its claims (names configurable). Signatures are verified when a JWKS is
configured, and every event says whether they were. A bearer token that is not a JWT is an
OAuth opaque token: it is recorded only as a keyed hash (HMAC-SHA256 under a key the
deployment keeps, see :func:`load_token_key`), never as any part of itself; BALP's
"last 32 characters" would keep the whole of a short token. Basic credentials give the
user name only. A token seen again within a minute is not read again (:class:`IdentityCache`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import aiohttp

from proxy.private_files import create_private_parents
from proxy.settings import IdentitySettings

if TYPE_CHECKING:
    import jwt

# PyJWT (and the cryptography it loads, tens of MB of OpenSSL bindings) is imported by the
# first bearer token or JWKS, not with this module: a proxy at rest need not hold it.

log = logging.getLogger(__name__)

TOKEN_HASH_PREFIX = "hmac-sha256:"
"""``agent.policy`` of an opaque token: this prefix and 32 hex digits (128 bits) of
HMAC-SHA256(key, token). Whoever holds the key and a token can find its events; the
trail alone reveals nothing of the token."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller as the audit records it. Holds no credential."""

    token_kind: str = "none"
    """``jwt``, ``opaque``, ``basic`` or ``none``."""
    user_id: str | None = None
    user_name: str | None = None
    client_id: str | None = None
    issuer: str | None = None
    jti: str | None = None
    fhir_user: str | None = None
    purpose_of_use: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    token_hash: str | None = None
    """An opaque token's keyed hash (:data:`TOKEN_HASH_PREFIX`), never the token."""
    verified: bool | None = None
    """None: not checked (no JWKS configured); True/False: the signature check's result."""
    failure: str | None = None
    """Why verification failed (``expired``, ``bad signature``)."""


ANONYMOUS = Identity()

JwksKeys: TypeAlias = "jwt.PyJWKSet"


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if isinstance(v, str | int) and _said(str(v)))
    return (str(value),)


def _said(text: str) -> bool:
    """Whether ``text`` says something: FHIR strings hold more than whitespace."""
    return bool(text) and not text.isspace()


def _first(claims: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = claims.get(name)
        if isinstance(value, str | int) and _said(str(value)):
            return str(value)
    return None


def _roles(claims: Mapping[str, Any]) -> tuple[str, ...]:
    roles = list(_strings(claims.get("roles")))
    realm = claims.get("realm_access")
    if isinstance(realm, Mapping):  # Keycloak
        roles.extend(r for r in _strings(realm.get("roles")) if r not in roles)
    return tuple(roles)


def _verify(
    token: str, settings: IdentitySettings, keys: JwksKeys, require: tuple[str, ...] = ()
) -> tuple[bool, str | None]:
    """Check ``token``'s signature against ``keys``, its ``exp`` and ``nbf``, its ``aud``
    and ``iss`` when configured, and that it has the claims in ``require``. A key
    verifies only with the one algorithm it is for (:func:`key_algorithm`), whatever the
    token's header names. Never raises: the token is the caller's, and anything it makes
    the verifier do wrong is a failed verification (the reason a word or two, never the
    token's own text)."""
    import jwt

    try:
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        candidates = [k for k in keys.keys if kid is None or k.key_id == kid]
        if not candidates:
            return False, "unknown signing key"
        alg = header.get("alg")
        key = next((k for k in candidates if key_algorithm(k) == alg), None)
        if key is None or not isinstance(alg, str):
            return False, "algorithm not allowed"
        jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=settings.audience,
            issuer=settings.issuer,
            options={
                "verify_aud": settings.audience is not None,
                "verify_iss": settings.issuer is not None,
                "require": list(require),
            },
        )
        return True, None
    except jwt.ExpiredSignatureError:
        return False, "expired"
    except jwt.InvalidAudienceError:
        return False, "wrong audience"
    except jwt.InvalidIssuerError:
        return False, "wrong issuer"
    except jwt.MissingRequiredClaimError as exc:
        return False, f"no {exc.claim} claim"
    except jwt.InvalidSignatureError:
        return False, "bad signature"
    except jwt.PyJWTError as exc:
        return False, type(exc).__name__
    except Exception as exc:  # a malformed header or key the library did not foresee
        log.debug("a JWT could not be verified: %s", type(exc).__name__)
        return False, "unverifiable token"


def key_algorithm(key: jwt.PyJWK) -> str | None:
    """The one signature algorithm a JWKS key verifies: the ``alg`` the JWK declares,
    else its key type's (RS256 for RSA, ES256/384/512 by an EC key's curve, EdDSA for
    OKP). None for a symmetric (``oct``) key: a JWKS is public, so a token "signed" with
    it proves nothing (the HS256 confusion), and ``none`` is never an algorithm."""
    if key.key_type == "oct":
        return None
    name = key.algorithm_name
    if not name or name == "none" or name.startswith("HS"):
        return None
    return name


def opaque_token_hash(token: str, key: bytes) -> str:
    """The recorded form of an opaque token: :data:`TOKEN_HASH_PREFIX` + 32 hex digits."""
    digest = hmac.new(key, token.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return TOKEN_HASH_PREFIX + digest.hexdigest()[:32]


def load_token_key(configured: str | None, key_file: Path) -> bytes:
    """The key opaque tokens are hashed under: ``configured`` (``audit.token_hash_key``,
    shared by every proxy that must give a token the same hash), else 32 random bytes
    kept in ``key_file`` beside the store (created on first start, mode 0600), so that one
    store's hashes stay comparable across restarts."""
    if configured:
        return configured.encode()
    try:
        return key_file.read_bytes()
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    try:
        create_private_parents(key_file)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:  # a full disk must not stop the proxy from starting
        key_file.unlink(missing_ok=True)
        log.warning("token key not kept in %s (%s): hashes change at restart", key_file, exc)
    return key


def identity_from_headers(
    headers: Mapping[str, str],
    settings: IdentitySettings,
    keys: JwksKeys | None = None,
    *,
    token_key: bytes = b"",
    require: tuple[str, ...] = (),
) -> Identity:
    """The caller from ``headers`` (lower-case names). An opaque token is kept only as
    its HMAC under ``token_key``; a JWT verified against ``keys`` must also carry the
    claims in ``require``. Pure apart from the key set passed in; never raises."""
    return _identity(headers.get("authorization", ""), settings, keys, token_key, require)[0]


class IdentityCache:
    """:func:`identity_from_headers` for the credentials seen lately. A client sends the
    same token with each request until it expires, and reading one costs 30 us (a JWT's
    claims) to 100 us (its RS256 signature checked against the JWKS) of the event loop.

    An entry is found by a keyed digest of the ``Authorization`` header (the credential
    itself is not kept), lives at most ``ttl_s`` and never past a verified token's
    ``exp``; a new JWKS empties the cache; a verification that may succeed later (a token
    not valid yet) is not kept. At most ``max_entries``, the oldest let go first."""

    def __init__(
        self,
        settings: IdentitySettings,
        *,
        token_key: bytes,
        ttl_s: float = 60.0,
        max_entries: int = 4096,
    ) -> None:
        self._settings = settings
        self._token_key = token_key
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._keys: JwksKeys | None = None
        self._entries: dict[bytes, tuple[Identity, float]] = {}
        self._digest_key = secrets.token_bytes(32)
        """Keys the entries' digests: without it (it never leaves this process), what the
        cache holds cannot be matched against a token."""

    def identity(self, headers: Mapping[str, str], keys: JwksKeys | None) -> Identity:
        auth = headers.get("authorization")
        if not auth:
            return ANONYMOUS
        entries = self._entries
        if keys is not self._keys:
            entries.clear()
            self._keys = keys
        digest = hashlib.blake2b(
            auth.encode("utf-8", "surrogateescape"), key=self._digest_key, digest_size=16
        ).digest()
        now = time.time()
        hit = entries.get(digest)
        if hit is not None and now < hit[1]:
            return hit[0]
        identity, expires = _identity(auth, self._settings, keys, self._token_key)
        if identity.failure in _TRANSIENT_FAILURES:
            return identity
        until = now + self._ttl_s
        if identity.verified and expires is not None:
            until = min(until, expires)
        if hit is None and len(entries) >= self._max_entries:
            del entries[next(iter(entries))]
        entries[digest] = (identity, until)
        return identity


_TRANSIENT_FAILURES = frozenset({"ImmatureSignatureError"})
"""Verification failures that time may cure (``nbf`` in the future): never cached."""


def _identity(
    auth: str,
    settings: IdentitySettings,
    keys: JwksKeys | None,
    token_key: bytes,
    require: tuple[str, ...] = (),
) -> tuple[Identity, float | None]:
    """The caller from an ``Authorization`` value, and a JWT's ``exp`` (POSIX time)."""
    auth = auth.strip()
    scheme, _, credential = auth.partition(" ")
    credential = credential.strip()
    if not credential:
        return ANONYMOUS, None
    if scheme.lower() == "basic":
        try:
            user = base64.b64decode(credential, validate=True).decode("utf-8").split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            user = None
        named = user if user is not None and _said(user) else None
        return Identity(token_kind="basic", user_id=named, user_name=named), None
    if scheme.lower() != "bearer":
        return Identity(token_kind="other"), None
    import jwt

    try:
        claims = jwt.decode(credential, options={"verify_signature": False})
    except Exception:  # not a JWT, or one too malformed to read: an opaque token
        hashed = opaque_token_hash(credential, token_key)
        return Identity(token_kind="opaque", token_hash=hashed), None
    verified: bool | None = None
    failure: str | None = None
    if keys is not None:
        verified, failure = _verify(credential, settings, keys, require)
    exp = claims.get("exp")
    expires = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
    identity = Identity(
        token_kind="jwt",
        user_id=_first(claims, (settings.user_claim,)),
        user_name=_first(claims, (settings.name_claim, "preferred_username")),
        client_id=_first(claims, settings.client_claims),
        issuer=_first(claims, (settings.issuer_claim,)),
        jti=_first(claims, (settings.jti_claim,)),
        fhir_user=_first(claims, (settings.fhir_user_claim,)),
        purpose_of_use=_strings(claims.get(settings.purpose_of_use_claim)),
        roles=_roles(claims),
        scopes=_strings(claims.get("scope") or claims.get("scp")),
        verified=verified,
        failure=failure,
    )
    return identity, expires


class JwksCache:
    """The identity provider's signing keys, fetched from ``jwks_url`` and refreshed every
    ``jwks_cache_s``. Started and stopped by the app; failures are logged, and while no
    keys are known tokens are recorded as unverified rather than refused."""

    def __init__(self, settings: IdentitySettings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self._keys: JwksKeys | None = None
        self._task: asyncio.Task[None] | None = None

    def keys(self) -> JwksKeys | None:
        return self._keys

    async def refresh(self) -> None:
        import jwt

        url = self._settings.jwks_url
        assert url is not None
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                resp.raise_for_status()
                self._keys = jwt.PyJWKSet.from_dict(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, jwt.PyJWTError, ValueError) as exc:
            log.warning("JWKS could not be fetched from %s: %s", url, type(exc).__name__)

    async def start(self) -> None:
        await self.refresh()

        async def loop() -> None:
            while True:
                await asyncio.sleep(self._settings.jwks_cache_s)
                await self.refresh()

        self._task = asyncio.create_task(loop(), name="jwks-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
