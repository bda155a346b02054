"""Where events are shipped: a FHIR repository in one of three modes, or a file.

- ``bundle``: ``POST {url}`` with a ``collection`` Bundle (Auditbox bulk, Aidbox).
- ``single``: ``POST {url}/AuditEvent`` per event (Auditbox single).
- ``transaction``: ``POST {url}`` with a ``transaction`` Bundle of ``PUT AuditEvent/{id}``:
  a redelivery overwrites instead of duplicating (HAPI, Aidbox, Medplum, any FHIR server).
- ``file``: NDJSON appended and fsynced, for log shippers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.delivery.oauth import TokenError, TokenProvider
from proxy.private_files import create_private_parents
from proxy.settings import RepositorySettings

FHIR_JSON = "application/fhir+json"
BODY_EXCERPT = 2048


class DeliveryError(Exception):
    """A batch was not delivered."""


class RepositoryUnavailable(DeliveryError):
    """5xx, 408, 429, 401/403 (credentials), a timeout or a connection error: retry
    with backoff."""


class RepositoryRejected(DeliveryError):
    """A 4xx answer: the batch holds something the repository will not take."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class PartialDelivery(DeliveryError):
    """``single`` mode: the first ``delivered`` events went through, then ``cause``."""

    def __init__(self, delivered: int, cause: DeliveryError) -> None:
        super().__init__(str(cause))
        self.delivered = delivered
        self.cause = cause


class Sink(Protocol):
    """Something that takes a batch of events or raises a :class:`DeliveryError`."""

    async def send(self, events: Sequence[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...


class FhirRepositorySink:
    """A FHIR server (or Auditbox, or Aidbox) over HTTP."""

    def __init__(
        self,
        settings: RepositorySettings,
        session: aiohttp.ClientSession,
        tokens: TokenProvider | None = None,
    ) -> None:
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

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        if self._mode == "single":
            for done, event in enumerate(events):
                try:
                    await self._post(f"{self._base}/AuditEvent", orjson.dumps(event))
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
                        "fullUrl": f"{self._base}/AuditEvent/{e['id']}",
                        "resource": e,
                        "request": {"method": "PUT", "url": f"AuditEvent/{e['id']}"},
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
        return None


def _check_transaction_response(answer: bytes) -> None:
    try:
        bundle = orjson.loads(answer) if answer else {}
    except orjson.JSONDecodeError:
        return  # a 2xx without a readable body: the server took it
    for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
        status = str((entry.get("response") or {}).get("status", "200")).split(" ")[0]
        if status.isdigit() and int(status) >= 300:
            raise RepositoryRejected(int(status), orjson.dumps(entry)[:BODY_EXCERPT].decode())


class FileSink:
    """NDJSON, one event per line, appended and fsynced in one write per batch (a retry
    never leaves a half line)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def _write(self, data: bytes) -> None:
        # The events carry PHI: owner only (directories 0700, the file 0600), whatever
        # the umask.
        create_private_parents(self._path)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        data = b"".join(orjson.dumps(e) + b"\n" for e in events)
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise RepositoryUnavailable(f"cannot append to {self._path}: {exc}") from exc

    async def close(self) -> None:
        return None


def make_sink(settings: RepositorySettings, session: aiohttp.ClientSession) -> Sink:
    """The sink for ``settings.mode``."""
    assert settings.url is not None
    if settings.mode == "file":
        return FileSink(Path(settings.url.removeprefix("file://")))
    tokens = None
    if settings.auth.type == "oauth2_client_credentials":
        tokens = TokenProvider(settings.auth, session)
    return FhirRepositorySink(settings, session, tokens)
