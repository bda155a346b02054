"""The FHIR repository modes: events over HTTP to a FHIR server (Auditbox, Aidbox, HAPI,
Medplum, any FHIR server).

- ``bundle``: ``POST {url}`` with a ``collection`` Bundle (Auditbox bulk, Aidbox).
- ``single``: ``POST {url}/AuditEvent`` per event (Auditbox single).
- ``transaction``: ``POST {url}`` with a ``transaction`` Bundle of ``PUT AuditEvent/{id}``:
  a redelivery overwrites instead of duplicating (HAPI, Aidbox, Medplum, any FHIR server).

A 2xx delivers; 5xx, 408, 429, 401/403 (credentials), a timeout or a connection error is
:class:`RepositoryUnavailable`; any other 4xx (or a failed entry of a transaction) is
:class:`RepositoryRejected`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import Field, field_serializer, model_validator

from proxy.delivery.oauth import OAuth2Settings, TokenError, TokenProvider
from proxy.delivery.sink import (
    DeliveryError,
    Origin,
    PartialDelivery,
    RepositoryBase,
    RepositoryRejected,
    RepositoryUnavailable,
    Sink,
)
from proxy.settings_base import (
    MASK,
    given_secrets,
    http_url,
    readable_file_problem,
    redact_url,
    url_secret,
)

FHIR_JSON = "application/fhir+json"
BODY_EXCERPT = 2048
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
"""Header names whose values are always masked; ``repository.secret_headers`` adds more."""


class HttpRepository(RepositoryBase):
    """A FHIR server as the repository (modes ``bundle``, ``single``, ``transaction``)."""

    url: str | None = None
    """The FHIR base URL. None keeps events local."""
    mode: Literal["bundle", "single", "transaction"] = "bundle"
    request_headers: dict[str, str] = Field(default_factory=dict)
    secret_headers: tuple[str, ...] = ()
    """Header names whose values are masked in ``check-config`` and logs, besides
    Authorization, Proxy-Authorization, Cookie and X-Api-Key."""
    auth: OAuth2Settings = OAuth2Settings()

    def is_secret_header(self, name: str) -> bool:
        """Whether a request header's value must never be shown."""
        lowered = name.lower()
        return lowered in CREDENTIAL_HEADERS or lowered in {h.lower() for h in self.secret_headers}

    @field_serializer("request_headers")
    def _headers_masked(self, value: dict[str, str]) -> dict[str, str]:
        return {k: MASK if self.is_secret_header(k) else v for k, v in value.items()}

    @field_serializer("url")
    def _url_masked(self, value: str | None) -> str | None:
        return None if value is None else redact_url(value)

    @model_validator(mode="after")
    def _url_is_http(self) -> HttpRepository:
        if self.url is not None:
            try:
                http_url(self.url)
            except ValueError as exc:
                raise ValueError(
                    f"url {exc} (mode {self.mode}); for a file use mode: file"
                ) from None
        return self

    def secret_values(self) -> set[str]:
        found = super().secret_values()
        for name, value in self.request_headers.items():
            if self.is_secret_header(name):
                found.add(value)
                found.update(value.split()[1:])
        auth = self.auth
        found |= given_secrets(auth.client_secret, auth.client_secret_file)
        token_url_secret = url_secret(auth.token_url)
        if token_url_secret:
            found.add(token_url_secret)
        return found

    def path_problems(self) -> list[str]:
        problem = readable_file_problem(
            "repository.auth.client_secret_file",
            self.auth.client_secret_file,
            "the secret (or set client_secret)",
        )
        return [problem] if problem else []

    async def open_sink(self, origin: Origin) -> Sink:
        session = aiohttp.ClientSession()
        tokens = None
        if self.auth.type == "oauth2_client_credentials":
            tokens = TokenProvider(self.auth, session)
        return FhirRepositorySink(self, session, tokens, owns_session=True)


class FhirRepositorySink:
    """A FHIR server (or Auditbox, or Aidbox) over HTTP."""

    def __init__(
        self,
        settings: HttpRepository,
        session: aiohttp.ClientSession,
        tokens: TokenProvider | None = None,
        *,
        owns_session: bool = False,
    ) -> None:
        """``owns_session``: :meth:`close` closes ``session`` too."""
        assert settings.url is not None
        self._base = settings.url.rstrip("/")
        self._mode = settings.mode
        self._session = session
        self._headers = {
            "Content-Type": FHIR_JSON,
            "Accept": FHIR_JSON,
            **settings.request_headers,
        }
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._tokens = tokens
        self._owns_session = owns_session

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        if self._mode == "single":
            for done, event in enumerate(events):
                try:
                    await self._post(f"{self._base}/{event['resourceType']}", orjson.dumps(event))
                except DeliveryError as exc:
                    if done:
                        raise PartialDelivery(done, exc) from exc
                    raise
            return
        if self._mode == "transaction":
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "fullUrl": f"{self._base}/{e['resourceType']}/{e['id']}",
                        "resource": e,
                        "request": {"method": "PUT", "url": f"{e['resourceType']}/{e['id']}"},
                    }
                    for e in events
                ],
            }
        else:
            bundle = {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"fullUrl": f"urn:uuid:{e['id']}", "resource": e} for e in events],
            }
        answer = await self._post(self._base, orjson.dumps(bundle))
        if self._mode == "transaction":
            _check_transaction_response(answer)

    async def _post(self, url: str, body: bytes) -> bytes:
        for attempt in (1, 2):
            headers = dict(self._headers)
            if self._tokens is not None:
                try:
                    headers["Authorization"] = f"Bearer {await self._tokens.token()}"
                except TokenError as exc:
                    raise RepositoryUnavailable(str(exc)) from None
            try:
                async with self._session.post(
                    url, data=body, headers=headers, timeout=self._timeout
                ) as resp:
                    answer = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RepositoryUnavailable(
                    f"repository unreachable: {type(exc).__name__}"
                ) from None
            if status == 401 and self._tokens is not None and attempt == 1:
                self._tokens.invalidate()  # expired or revoked early: refresh once
                continue
            if 200 <= status < 300:
                return answer
            excerpt = answer[:BODY_EXCERPT].decode("utf-8", "replace")
            if status in (401, 403):
                # About our credentials, not the events: bisecting would dead-letter every
                # one of them. Hold them back until the credentials are fixed.
                refreshed = self._tokens is not None and status == 401
                what = "the refreshed token" if refreshed else "the credentials"
                raise RepositoryUnavailable(f"repository refused {what}: HTTP {status}: {excerpt}")
            if status in (408, 429) or status >= 500:
                raise RepositoryUnavailable(f"HTTP {status}: {excerpt}")
            raise RepositoryRejected(status, excerpt)
        raise AssertionError("unreachable: the second attempt always returns or raises")

    async def close(self) -> None:
        if self._owns_session:
            await self._session.close()


def _check_transaction_response(answer: bytes) -> None:
    try:
        bundle = orjson.loads(answer) if answer else {}
    except orjson.JSONDecodeError:
        return  # a 2xx without a readable body: the server took it
    for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
        status = str((entry.get("response") or {}).get("status", "200")).split(" ")[0]
        if status.isdigit() and int(status) >= 300:
            raise RepositoryRejected(int(status), orjson.dumps(entry)[:BODY_EXCERPT].decode())
