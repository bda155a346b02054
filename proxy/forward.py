"""The reverse-proxy handler: forward, audit, persist, and only then release the response.

Order of work for one request (DESIGN.md, invariants 1-3):

1. classify the request and read the caller's identity (never keeping the token);
   before a DELETE of a resource that can belong to a patient, read it to learn whose it is;
2. for a state-changing request, commit an intent record before forwarding;
3. forward upstream, buffering the response up to ``buffer_limit_bytes`` (its first
   :data:`SPILL_AT` bytes in memory, the rest in a temporary file);
4. build the AuditEvents and commit them with fsync (group commit, completing the intent);
5. release the response. If 2 or 4 fail, the client gets an OperationOutcome instead
   (503, or 507 when the store is full) and the upstream body is discarded.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import telemetry
from proxy.audit.balp import AuditContext, build_events, intent_summary, new_event_id
from proxy.audit.identity import JwksCache, identity_from_headers
from proxy.exchange import Exchange
from proxy.fhir.compartment import PATIENT_PATHS
from proxy.fhir.interaction import Interaction, InteractionKind, classify, parse_json_object
from proxy.fhir.operation_outcome import FHIR_JSON, outcome_response
from proxy.fhir.patients import patients_in_resource
from proxy.settings import Settings
from proxy.store.queue import AuditQueue, StoreError, StoreFull

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 connection-specific headers, never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed by aiohttp for the hop it writes, or pinned to the upstream's own address.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    """What the handler needs from the settings, computed once."""

    upstream_origin: URL
    """``scheme://host:port`` of the upstream."""
    upstream_base: str
    """The upstream base URL as a string without trailing slash (to rewrite ``Location``)."""
    base_path: str
    """The FHIR base path (``/fhir``), served unchanged by the proxy."""
    buffer_limit: int
    timeout: aiohttp.ClientTimeout
    trusted_proxies: tuple[Network, ...]
    read_before_delete: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> ForwardConfig:
        upstream = URL(settings.upstream.url)
        return cls(
            upstream_origin=upstream.origin(),
            upstream_base=str(upstream).rstrip("/"),
            base_path=upstream.path.rstrip("/"),
            buffer_limit=settings.audit.buffer_limit_bytes,
            timeout=aiohttp.ClientTimeout(
                total=settings.upstream.timeout_s, connect=settings.upstream.connect_timeout_s
            ),
            trusted_proxies=tuple(
                ipaddress.ip_network(n, strict=False) for n in settings.audit.trusted_proxies
            ),
            read_before_delete=settings.audit.read_before_delete,
        )


def client_address(peer: str | None, forwarded_for: str | None, trusted: Iterable[Network]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy, in which case the
    right-most ``X-Forwarded-For`` hop that is not itself a trusted proxy."""
    nets = tuple(trusted)

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in nets)

    address = peer or "unknown"
    if not forwarded_for or not is_trusted(address):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        address = hop
        if not is_trusted(hop):
            break
    return address


def relative_path(raw_path: str, base_path: str) -> str | None:
    """The path below the FHIR base without leading slash, or None when outside the base."""
    if raw_path == base_path or raw_path == base_path + "/":
        return ""
    if base_path and not raw_path.startswith(base_path + "/"):
        return None
    return raw_path[len(base_path) + 1 :] if base_path else raw_path.lstrip("/")


def _upstream_headers(request: web.Request, request_id: str) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | {
        t.strip().lower() for t in request.headers.get("Connection", "").split(",") if t.strip()
    }
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in drop
    )
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.headers.get("X-Forwarded-Proto", request.scheme)
    headers["X-Forwarded-Host"] = request.headers.get("X-Forwarded-Host", request.host)
    headers["X-Request-Id"] = request_id
    return headers


def _client_headers(
    upstream: CIMultiDictProxy[str], request_id: str, cfg: ForwardConfig, public_base: str
) -> CIMultiDict[str]:
    drop = _RESPONSE_DROP | {
        t.strip().lower() for t in upstream.get("Connection", "").split(",") if t.strip()
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lname = name.lower()
        if lname in drop:
            continue
        if lname in ("location", "content-location") and value.startswith(cfg.upstream_base):
            # Like nginx's proxy_redirect: the client must not be sent around the proxy.
            value = public_base + value[len(cfg.upstream_base) :]
        headers.add(name, value)
    headers["X-Request-Id"] = request_id
    return headers


SPILL_AT = 64 * 1024
"""Bytes of one response body held in memory while its audit commits; the rest waits in
an anonymous temporary file, as nginx's proxy buffering does, so that hundreds of large
answers at once do not each hold their whole body in memory."""


class _HeldBody:
    """A response body waiting for its audit: its first :data:`SPILL_AT` bytes in memory,
    the rest in a temporary file (created on the first byte past that)."""

    __slots__ = ("_head", "file", "size")

    def __init__(self) -> None:
        self._head: list[bytes] = []
        self.file: BinaryIO | None = None
        self.size = 0

    def add(self, chunk: bytes) -> None:
        if self.file is None and self.size + len(chunk) <= SPILL_AT:
            self._head.append(chunk)
        else:
            if self.file is None:
                self.file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the handler)
            self.file.write(chunk)
        self.size += len(chunk)

    def value(self) -> bytes:
        """The whole body, read back from the file if it spilled."""
        head = b"".join(self._head)
        if self.file is None:
            return head
        self.file.seek(0)
        return head + self.file.read()

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces of at most 64 KiB past the memory part, for writing."""
        yield from self._head
        if self.file is not None:
            self.file.seek(0)
            while block := self.file.read(65536):
                yield block

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


async def _prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    async for chunk in rest:
        yield chunk


_PRE_READ_DROP = (
    "Content-Type",
    "Content-Length",
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "If-None-Exist",
    "Prefer",
)
"""Headers of the DELETE that must not shape the read made before it."""


def _deletes_a_patients_resource(interaction: Interaction) -> bool:
    """A DELETE of one resource whose type can belong to a patient. A Patient's own
    delete names the patient in its URL; a conditional delete names no single resource."""
    return (
        interaction.kind is InteractionKind.DELETE
        and not interaction.conditional
        and interaction.resource_id is not None
        and interaction.resource_type != "Patient"
        and interaction.resource_type in PATIENT_PATHS
    )


@functools.cache
def _requests_counter(kind: str, status_class: int) -> Any:
    """The request counter's child for a kind and status class, looked up once:
    ``labels()`` costs a lock and a few dict operations on every request."""
    return telemetry.REQUESTS.labels(kind=kind, status_class=f"{status_class}xx")


@functools.cache
def _events_counter(outcome: str) -> Any:
    return telemetry.EVENTS_BUILT.labels(outcome=outcome)


class ForwardHandler:
    """The aiohttp handler for every path of the proxy listener."""

    def __init__(
        self,
        *,
        cfg: ForwardConfig,
        settings: Settings,
        ctx: AuditContext,
        session: aiohttp.ClientSession,
        queue: AuditQueue,
        jwks: JwksCache | None,
        intents_in_flight: set[int],
        on_events: Any = None,
    ) -> None:
        self._cfg = cfg
        self._identity_settings = settings.audit.identity
        self._ctx = ctx
        self._session = session
        self._queue = queue
        self._jwks = jwks
        self._in_flight = intents_in_flight
        self._on_events = on_events

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = datetime.now(UTC)
        # A UUIDv7 from pooled entropy: uuid4 costs a getrandom call per request.
        request_id = request.headers.get("X-Request-Id") or new_event_id()
        headers = {k.lower(): v for k, v in request.headers.items()}
        public_base = f"{request.scheme}://{request.host}{self._cfg.base_path}"
        path = relative_path(request.rel_url.raw_path, self._cfg.base_path)
        body, body_stream = await self._read_request_body(request)

        ex = Exchange(
            request_id=request_id,
            method=request.method.upper(),
            path=path if path is not None else request.rel_url.raw_path,
            query_string=request.rel_url.raw_query_string,
            request_headers=headers,
            client_address=client_address(
                request.remote, request.headers.get("X-Forwarded-For"), self._cfg.trusted_proxies
            ),
            started_at=started,
            base_url=public_base,
            request_body=body,
            request_content_type=request.headers.get("Content-Type", ""),
        )
        try:
            ex.interaction = classify(ex.method, ex.path, ex.query_string, headers, body)
            if path is None:
                ex.interaction = Interaction(
                    kind=InteractionKind.UNKNOWN,
                    method=ex.method,
                    detail=f"path outside the FHIR base {self._cfg.base_path or '/'}",
                )
            keys = self._jwks.keys() if self._jwks is not None else None
            ex.identity = identity_from_headers(headers, self._identity_settings, keys)
        except Exception:
            log.exception("classification failed for %s %s", ex.method, ex.path)
            telemetry.AUDIT_FAILURES.labels(reason="classify").inc()
            return outcome_response(
                500, "exception", "The request could not be classified for audit."
            )

        if self._cfg.read_before_delete and _deletes_a_patients_resource(ex.interaction):
            # Before the intent, so an outcome-unknown event names the patient too.
            ex.prior_patients = await self._patients_before_delete(request, ex)
        if ex.interaction.is_write:
            failure = await self._record_intent(ex)
            if failure is not None:
                return failure
        try:
            return await self._forward(request, ex, body, body_stream, public_base)
        finally:
            if ex.intent_id is not None:
                self._in_flight.discard(ex.intent_id)

    async def _patients_before_delete(self, request: web.Request, ex: Exchange) -> tuple[str, ...]:
        """The patients of the resource about to be deleted, read from the upstream with
        the caller's own headers (so the server applies the caller's access rights). Any
        failure (not found, forbidden, unreachable, not JSON) means no patient is known;
        the DELETE goes ahead either way. The resource itself is not kept."""
        assert ex.interaction is not None
        url = self._cfg.upstream_origin.join(URL(request.rel_url.raw_path, encoded=True))
        headers = _upstream_headers(request, ex.request_id)
        for name in _PRE_READ_DROP:
            headers.pop(name, None)
        headers["Accept"] = FHIR_JSON
        try:
            async with self._session.get(
                url, headers=headers, allow_redirects=False, timeout=self._cfg.timeout
            ) as upstream:
                if upstream.status != 200:
                    log.debug("read before delete of %s: HTTP %s", ex.path, upstream.status)
                    return ()
                body, complete = await self._read_up_to_limit(upstream)
                if not complete:
                    return ()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.debug("read before delete of %s failed: %s", ex.path, exc)
            return ()
        resource = parse_json_object(body)
        if resource is None or resource.get("resourceType") != ex.interaction.resource_type:
            return ()
        return patients_in_resource(resource)

    async def _read_request_body(self, request: web.Request) -> tuple[bytes | None, Any]:
        """Buffer the request body up to the limit. A larger body streams on to the upstream
        (the head already read, then the rest) and is audited from the URL and headers.
        Returns ``(body, None)`` when buffered, ``(None, stream)`` when streaming."""
        if not request.body_exists:
            return None, None
        limit = self._cfg.buffer_limit
        length = request.content_length
        if length is not None and length > limit:
            return None, request.content.iter_chunked(65536)
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return None, _prepend(b"".join(chunks), request.content.iter_chunked(65536))
        return b"".join(chunks), None

    async def _record_intent(self, ex: Exchange) -> web.Response | None:
        try:
            ex.intent_id = await self._queue.record_intent(intent_summary(ex))
        except StoreError as exc:
            return self._fail_closed(exc, "intent")
        self._in_flight.add(ex.intent_id)
        return None

    def _fail_closed(self, exc: Exception, stage: str) -> web.Response:
        full = isinstance(exc, StoreFull)
        reason = "store_full" if full else "store_error"
        telemetry.AUDIT_FAILURES.labels(reason=reason).inc()
        log.error("audit %s could not be persisted (%s): failing the request closed", stage, exc)
        return outcome_response(
            507 if full else 503,
            "transient",
            "The audit record could not be persisted"
            + (" (audit store full)" if full else "")
            + "; the request was not completed.",
            headers={"Retry-After": "5"},
        )

    async def _forward(
        self,
        request: web.Request,
        ex: Exchange,
        body: bytes | None,
        body_stream: Any,
        public_base: str,
    ) -> web.StreamResponse:
        url = self._cfg.upstream_origin.join(URL(request.rel_url.raw_path_qs, encoded=True))
        data: Any = body_stream if body_stream is not None else body
        t0 = time.perf_counter()
        try:
            async with self._session.request(
                ex.method,
                url,
                headers=_upstream_headers(request, ex.request_id),
                data=data,
                allow_redirects=False,
                timeout=self._cfg.timeout,
            ) as upstream:
                telemetry.UPSTREAM_SECONDS.observe(time.perf_counter() - t0)
                ex.status = upstream.status
                ex.response_headers = {k.lower(): v for k, v in upstream.headers.items()}
                client_headers = _client_headers(
                    upstream.headers, ex.request_id, self._cfg, public_base
                )
                held, complete = await self._hold_body(upstream)
                try:
                    if complete and held.file is None:
                        body = held.value()
                        ex.response_body = body
                        return await self._audited_response(ex, client_headers, body)
                    if complete:
                        ex.response_body = held.value()  # for the audit, dropped once built
                        return await self._audited_held(request, ex, client_headers, held)
                    ex.response_streamed = True
                    return await self._audited_stream(request, ex, client_headers, held, upstream)
                finally:
                    held.close()
        except TimeoutError:
            return await self._upstream_failure(ex, 504, "timeout", "upstream timed out")
        except aiohttp.ClientError as exc:
            return await self._upstream_failure(
                ex, 502, "transient", f"upstream unreachable: {exc}"
            )

    async def _read_up_to_limit(self, upstream: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """Read the body unless it is larger than the buffer limit; then return what was read."""
        limit = self._cfg.buffer_limit
        length = upstream.content_length
        if length is not None:
            if length > limit:
                return b"", False
            return await upstream.read(), True  # one await for a body of known size
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await upstream.content.read(65536)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(chunks), False

    async def _hold_body(self, upstream: aiohttp.ClientResponse) -> tuple[_HeldBody, bool]:
        """Hold the body for the audit unless it is larger than the buffer limit; then
        return what was held so far, and ``False``."""
        limit = self._cfg.buffer_limit
        length = upstream.content_length
        held = _HeldBody()
        if length is not None and length > limit:
            return held, False
        if length is not None and length <= SPILL_AT:
            held.add(await upstream.read())  # one await for a small body of known size
            return held, True
        while chunk := await upstream.content.read(65536):
            held.add(chunk)
            if held.size > limit:
                return held, False
        return held, True

    async def _persist(self, ex: Exchange) -> web.Response | None:
        """Build and commit the events; an OperationOutcome response when that fails."""
        ex.finished_at = datetime.now(UTC)
        try:
            events = build_events(ex, self._ctx, ex.finished_at)
            # Parsed bodies do not wait for the commit: hundreds of large answers at once
            # would each hold their parse in memory.
            ex.drop_parsed()
        except Exception:
            log.exception("AuditEvent could not be built for %s %s", ex.method, ex.path)
            telemetry.AUDIT_FAILURES.labels(reason="build").inc()
            return outcome_response(
                500,
                "exception",
                "The audit record could not be built; the request was not completed.",
            )
        try:
            await self._queue.append(events, complete_intent=ex.intent_id)
        except StoreError as exc:
            return self._fail_closed(exc, "event")
        for event in events:
            _events_counter(str(event.get("outcome", "?"))).inc()
        if self._on_events is not None:
            self._on_events(events)
        assert ex.interaction is not None
        _requests_counter(ex.interaction.kind.value, (ex.status or 0) // 100).inc()
        return None

    async def _audited_response(
        self, ex: Exchange, headers: CIMultiDict[str], body: bytes
    ) -> web.StreamResponse:
        failure = await self._persist(ex)
        if failure is not None:
            return failure
        assert ex.status is not None
        return web.Response(status=ex.status, headers=headers, body=body)

    async def _audited_held(
        self, request: web.Request, ex: Exchange, headers: CIMultiDict[str], held: _HeldBody
    ) -> web.StreamResponse:
        """A whole body that spilled to its temporary file: audited from the whole body,
        then sent from memory and the file."""
        failure = await self._persist(ex)
        if failure is not None:
            return failure
        assert ex.status is not None
        response = web.StreamResponse(status=ex.status, headers=headers)
        response.content_length = held.size
        try:
            await response.prepare(request)
            for chunk in held.chunks():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            # The client left; its exchange is already audited as the upstream answered.
            log.debug("%s %s: the client went away during the answer", ex.method, ex.path)
        return response

    async def _audited_stream(
        self,
        request: web.Request,
        ex: Exchange,
        headers: CIMultiDict[str],
        held: _HeldBody,
        upstream: aiohttp.ClientResponse,
    ) -> web.StreamResponse:
        # Invariant 1: a body too large to buffer is audited from its head before its first byte.
        failure = await self._persist(ex)
        if failure is not None:
            return failure
        assert ex.status is not None
        response = web.StreamResponse(status=ex.status, headers=headers)
        try:
            await response.prepare(request)
            for chunk in held.chunks():
                await response.write(chunk)
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the client left (audited already, as above)
            log.debug("%s %s: the client went away during the answer", ex.method, ex.path)
        return response

    async def _upstream_failure(
        self, ex: Exchange, status: int, code: str, error: str
    ) -> web.StreamResponse:
        log.warning("%s %s: %s", ex.method, ex.path, error)
        ex.status = status
        ex.error = error
        ex.response_headers = {"content-type": FHIR_JSON}
        ex.response_body = None
        failure = await self._persist(ex)
        if failure is not None:
            return failure
        return outcome_response(
            status,
            code,
            f"The FHIR server could not be reached: {error}",
            headers={"X-Request-Id": ex.request_id},
        )
