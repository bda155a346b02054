"""Forwarding: the handler of every request of the proxy listener.

It turns each request into an :class:`~proxy.exchange.Exchange` (header values and the
path checked and normalized once, at the boundary), reads the request body, forwards it
through the :class:`~proxy.http.transport.Transport` with the headers a proxy sets, holds
the answer (up to ``buffer_limit_bytes``, within a memory budget:
:mod:`proxy.http.buffering`) and releases it to the client only once
:class:`~proxy.audit.pipeline.AuditPipeline` has made its audit durable. What is audited,
and when the client gets an OperationOutcome instead, is the pipeline's.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import telemetry
from proxy.audit.ids import new_event_id
from proxy.audit.pipeline import AuditFailure, AuditPipeline, ReadResource
from proxy.exchange import Exchange
from proxy.fhir.interaction import (
    CREDENTIAL_PARAMS,
    credential_params,
    redact_query,
    redact_text,
)
from proxy.fhir.operation_outcome import FHIR_JSON, operation_outcome
from proxy.http.buffering import HeldBody, MemoryBudget, Prepended, hold_body, read_up_to_limit
from proxy.http.flow import BodyBrokenOff, BodyTimedOut
from proxy.http.listener import ClientRequest
from proxy.http.response import Response
from proxy.http.transport import Transport, UpstreamAnswer, UpstreamError, UpstreamRequest
from proxy.settings import Settings

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
# Written by the upstream client for the hop it makes (the body it sends, identity
# encoding, the upstream's own address); ``Expect`` was answered here.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding"}

_FORM = "application/x-www-form-urlencoded"

FHIR_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""The methods of the FHIR REST API (with HEAD and OPTIONS, which HTTP gives every
resource). Any other (TRACE, which would echo the request's credentials back, CONNECT,
WebDAV's PROPFIND...) is answered 405, audited, and never forwarded."""
_ALLOW = ", ".join(FHIR_METHODS)

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
    """``audit.buffer_limit_bytes``: the largest body held for its audit; a larger one
    is audited from its head and streamed."""
    buffer_memory: int
    """``audit.buffer_memory_bytes``: what all held answers may take in memory together."""
    trusted_proxies: tuple[Network, ...]
    """Peers whose ``X-Forwarded-For`` is believed."""
    read_before_delete: bool
    """``audit.read_before_delete``: read a resource before forwarding its DELETE."""
    redact_params: frozenset[str] = CREDENTIAL_PARAMS
    """Parameter names (lower case) whose values are never recorded."""
    outside_base: tuple[str, ...] = ()
    """Path prefixes outside the base that are forwarded all the same."""
    public_url: str | None = None
    """``listen.public_url`` without a trailing slash: the FHIR base clients reach."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ForwardConfig:
        upstream = URL(settings.upstream.url)
        return cls(
            upstream_origin=upstream.origin(),
            upstream_base=str(upstream).rstrip("/"),
            base_path=upstream.path.rstrip("/"),
            buffer_limit=settings.audit.buffer_limit_bytes,
            buffer_memory=settings.audit.buffer_memory_bytes,
            trusted_proxies=tuple(
                ipaddress.ip_network(n, strict=False) for n in settings.audit.trusted_proxies
            ),
            read_before_delete=settings.audit.read_before_delete,
            redact_params=credential_params(settings.audit.redact_params),
            outside_base=tuple(p.rstrip("/") for p in settings.audit.forward_outside_base),
            public_url=(settings.listen.public_url or "").rstrip("/") or None,
        )

    def public_base(self, request: ClientRequest) -> str:
        """The FHIR base as the client reaches it: ``public_url``, else the address it
        connected to; never its ``Host`` header, so no client can point another's
        ``Location`` elsewhere."""
        if self.public_url is not None:
            return self.public_url
        return f"{request.scheme}://{request.local_address}{self.base_path}"

    def forwards_outside_base(self, path: str) -> bool:
        """Whether ``path`` (normalized, outside the base) is in ``forward_outside_base``."""
        return any(path == p or path.startswith(p + "/") for p in self.outside_base if p)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Iterable[Network]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy, in which case the
    right-most ``X-Forwarded-For`` hop that is not itself a trusted proxy. Hops that are not
    IP addresses are skipped (and counted in ``fhir_audit_forwarded_for_invalid``): a
    trusted proxy passes on whatever its client wrote there."""
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
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            telemetry.FORWARDED_FOR_INVALID.inc()
            continue
        address = hop
        if not is_trusted(hop):
            break
    return address


class PathRefused(ValueError):
    """A request path that cannot be normalized to one unambiguous resource path."""


_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_AMBIGUOUS = frozenset({"%2F", "%5C", "%00"})
"""Escapes a server may decode into a path separator (or a string end) after the proxy
classified the path without one."""


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalize_path(raw_path: str) -> str:
    """The one form of a raw (percent-encoded) request path that is both classified and
    forwarded: RFC 3986 §6.2.2 normalization (escapes of unreserved characters decoded, so
    ``%2e`` is a dot and ``%64`` a ``d``; other escapes upper-cased), empty segments
    dropped, dot-segments removed (§5.2.4, never climbing above the root). Raises
    :class:`PathRefused` for an encoded slash, backslash or NUL, a raw backslash, or
    characters that are not valid UTF-8."""
    try:
        raw_path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRefused("the path is not valid UTF-8") from None
    if "\\" in raw_path:
        raise PathRefused("the path holds a backslash")
    path = _PERCENT.sub(_decode_unreserved, raw_path) if "%" in raw_path else raw_path
    if any(escape in path for escape in _AMBIGUOUS):
        raise PathRefused("the path holds an encoded slash, backslash or NUL")
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def relative_path(raw_path: str, base_path: str) -> str | None:
    """The path below the FHIR base without leading slash, or None when outside the base."""
    if raw_path == base_path or raw_path == base_path + "/":
        return ""
    if base_path and not raw_path.startswith(base_path + "/"):
        return None
    return raw_path[len(base_path) + 1 :] if base_path else raw_path.lstrip("/")


def _upstream_headers(request: ClientRequest, request_id: str) -> CIMultiDict[str]:
    incoming = request.headers
    connection = incoming.get("Connection")
    drop = _REQUEST_DROP
    if connection:
        drop = drop | {t.strip().lower() for t in connection.split(",") if t.strip()}
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in incoming.items() if k.lower() not in drop
    )
    peer = request.remote or ""
    prior = incoming.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = incoming.get("X-Forwarded-Proto", request.scheme)
    headers["X-Forwarded-Host"] = incoming.get("X-Forwarded-Host", request.host)
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


_HOST = re.compile(r"(?:[A-Za-z0-9\-._~%!$&'()*+,;=]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
"""RFC 3986 ``host[:port]``: a reg-name or IPv4 address, or a bracketed IPv6 literal."""

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")


def _recordable(value: str) -> str:
    """``value`` itself when it is valid UTF-8 (the usual case, checked cheaply), else a
    copy with each undecodable byte (carried by aiohttp as a lone surrogate) replaced by
    U+FFFD, which JSON and the store accept."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def resource_reader(cfg: ForwardConfig, transport: Transport) -> ReadResource:
    """A reader of the resource an exchange addresses, from the upstream, with the
    headers its request is forwarded with (so the server applies the caller's access
    rights) minus those that would shape the read (preconditions, body headers); it gives
    None on any failure (not found, forbidden, unreachable, larger than the buffer
    limit)."""

    async def read(ex: Exchange, forwarded: Mapping[str, str]) -> bytes | None:
        headers = CIMultiDict(forwarded)
        for name in _PRE_READ_DROP:
            headers.pop(name, None)
        headers["Accept"] = FHIR_JSON
        try:
            with telemetry.upstream_span("GET", cfg.upstream_origin, headers) as span:
                upstream = await transport.handle(
                    UpstreamRequest(method="GET", target=ex.upstream_path, headers=headers.items())
                )
                try:
                    span.answered(upstream.status)
                    if upstream.status != 200:
                        log.debug("read of %s: HTTP %s", ex.path, upstream.status)
                        return None
                    body, complete = await read_up_to_limit(upstream, cfg.buffer_limit)
                    return body if complete else None
                finally:
                    upstream.close()
        except (TimeoutError, UpstreamError) as exc:
            log.debug("read of %s failed: %s", ex.path, exc)
            return None

    return read


class _HeldThenRest:
    """An answer's body for the client: what was held for its audit, then (when it was
    too large to hold) the rest as the upstream sends it. Closing it lets go of both."""

    __slots__ = ("_held", "_held_chunks", "_rest")

    def __init__(self, held: HeldBody, rest: UpstreamAnswer | None) -> None:
        self._held = held
        self._held_chunks: Iterator[bytes] = held.chunks()
        self._rest = rest

    def __aiter__(self) -> _HeldThenRest:
        return self

    async def __anext__(self) -> bytes:
        chunk = next(self._held_chunks, None)
        if chunk is not None:
            return chunk
        if self._rest is not None:
            chunk = await self._rest.body.read_chunk()
            if chunk:
                return chunk
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._held.close()
        if self._rest is not None:
            self._rest.close()


class ForwardHandler:
    """The handler of every request of the proxy listener (:mod:`proxy.http.listener`)."""

    def __init__(
        self, *, cfg: ForwardConfig, transport: Transport, pipeline: AuditPipeline
    ) -> None:
        self._cfg = cfg
        self._transport = transport
        self._pipeline = pipeline
        self.budget = MemoryBudget(cfg.buffer_memory)
        """Memory of the answers waiting for their audit, across requests."""

    async def __call__(self, request: ClientRequest) -> Response:
        pipeline = self._pipeline
        ex, refusal = self._exchange_of(request, datetime.now(UTC))
        pipeline.started(ex)
        if refusal is not None:
            return await self._refuse(ex, *refusal)
        try:
            body, body_stream = await self._read_request_body(request)
        except BodyBrokenOff as exc:
            return await self._body_failed(ex, exc)
        if body is not None:
            ex.request_body = self._recorded_body(body, ex.request_content_type)
        failure = pipeline.admit(ex)
        if failure is not None:
            return _failed_closed(failure)
        headers = _upstream_headers(request, ex.request_id)
        try:
            failure = await pipeline.before_forward(ex, headers)
            if failure is not None:
                return _failed_closed(failure)
            return await self._forward(
                request, ex, body_stream if body_stream is not None else body, headers
            )
        finally:
            pipeline.finished(ex)

    def _exchange_of(
        self, request: ClientRequest, started: datetime
    ) -> tuple[Exchange, tuple[int, str, str] | None]:
        """The exchange as it may be recorded, made once at the boundary: header values
        and the path valid UTF-8 (or the request refused), the path normalized, the query
        redacted. Returns the refusal ``(status, issue code, diagnostics)`` for a request
        that must not be forwarded."""
        refusal: tuple[int, str, str] | None = None
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            clean = _recordable(value)
            if clean is not value and refusal is None:
                refusal = (400, "invalid", f"the {name[:64]} header is not valid UTF-8")
            headers[_recordable(name).lower()] = clean
        request_id = headers.get("x-request-id") or new_event_id()
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = new_event_id()
            if refusal is None:
                refusal = (400, "invalid", "X-Request-Id must be 1-200 printable ASCII characters")
        method = request.method.upper()
        if method not in FHIR_METHODS and refusal is None:
            refusal = (
                405,
                "not-supported",
                f"{_recordable(method)[:32]} is not a method of the FHIR REST API;"
                " the request was not forwarded",
            )
        raw_path = request.raw_path
        try:
            normalized = normalize_path(raw_path)
        except PathRefused as exc:
            normalized = _recordable(raw_path)[:2048]
            refusal = refusal or (400, "invalid", f"{exc}; the request was not forwarded")
        path = relative_path(normalized, self._cfg.base_path)
        if path is None:
            path = normalized  # an absolute path marks it as outside the base
            if refusal is None and not self._cfg.forwards_outside_base(normalized):
                refusal = (
                    404,
                    "not-found",
                    f"{normalized[:200]} is outside the FHIR base {self._cfg.base_path or '/'}",
                )
        raw_query = request.raw_query
        query = _recordable(raw_query)
        if query is not raw_query and refusal is None:
            refusal = (400, "invalid", "the query string is not valid UTF-8")
        host = headers.get("host") or request.host
        if not _HOST.fullmatch(host):
            host = "invalid-host"
            if refusal is None:
                refusal = (400, "invalid", "the Host header is not a host name or address")
        ex = Exchange(
            request_id=request_id,
            method=_recordable(method)[:32],
            path=path,
            query_string=redact_query(query, self._cfg.redact_params),
            request_headers=headers,
            client_address=client_address(
                request.remote, headers.get("x-forwarded-for"), self._cfg.trusted_proxies
            ),
            started_at=started,
            base_url=f"{request.scheme}://{host}{self._cfg.base_path}",
            request_content_type=headers.get("content-type", ""),
            upstream_path=normalized,
        )
        return ex, refusal

    def _recorded_body(self, body: bytes, content_type: str) -> bytes:
        """The request body as it may be recorded: a form body with its credential
        parameters redacted (latin-1 maps every byte to one character and back)."""
        if not content_type.lower().startswith(_FORM):
            return body
        return redact_query(body.decode("latin-1"), self._cfg.redact_params).encode("latin-1")

    async def _refuse(self, ex: Exchange, status: int, code: str, diagnostics: str) -> Response:
        """Answer ``status`` with an OperationOutcome, without forwarding, and audit it."""
        self._pipeline.refused(ex, diagnostics)
        body = orjson.dumps(operation_outcome(code, diagnostics))
        ex.status = status
        ex.response_headers = {"content-type": FHIR_JSON}
        ex.response_body = body
        failure = await self._pipeline.persist(ex)
        if failure is not None:
            return _failed_closed(failure)
        headers = {"Content-Type": FHIR_JSON, "X-Request-Id": ex.request_id}
        if status == 405:
            headers["Allow"] = _ALLOW
        return Response(status=status, headers=headers, body=body)

    async def _body_failed(self, ex: Exchange, exc: BodyBrokenOff) -> Response:
        """Answer and audit a request whose body did not arrive whole before anything was
        forwarded: 408 when it stopped arriving, else 400. The interaction is classified
        from the head, so the event says what was attempted."""
        if self._pipeline.admit(ex) is not None:
            ex.interaction = None  # unclassifiable: recorded as unknown, as a refusal is
        if isinstance(exc, BodyTimedOut):
            status, code = 408, "timeout"
        else:
            status, code = 400, "incomplete"
        log.info("%s %s: %s", ex.method, ex.path, exc)
        return await self._refuse(ex, status, code, f"{exc}; the request was not forwarded")

    async def refuse_malformed(self, remote: str, status: int, reason: str) -> Response:
        """Answer and audit a request the listener's HTTP parser refused. Nothing of the
        raw request is known or kept but its peer: ``reason`` is the parser's category of
        error, never the offending bytes (they may be a credential)."""
        ex = Exchange(
            request_id=new_event_id(),
            method="UNKNOWN",
            path="",
            query_string="",
            request_headers={},
            client_address=remote or "unknown",
            started_at=datetime.now(UTC),
            base_url=self._cfg.base_path,
        )
        log.warning("malformed HTTP request from %s refused: %s", ex.client_address, reason)
        return await self._refuse(
            ex, status, "invalid", f"malformed HTTP request ({reason}); not forwarded"
        )

    async def _read_request_body(
        self, request: ClientRequest
    ) -> tuple[bytes | None, AsyncIterable[bytes] | None]:
        """Buffer the request body up to the limit. A larger body streams on to the upstream
        (the head already read, then the rest) and is audited from the URL and headers.
        Returns ``(body, None)`` when buffered, ``(None, stream)`` when streaming."""
        content = request.body
        if content is None:
            return None, None
        limit = self._cfg.buffer_limit
        length = request.content_length
        if length is not None and length > limit:
            return None, content
        chunks: list[bytes] = []
        size = 0
        while chunk := await content.read_chunk():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return None, Prepended(b"".join(chunks), content)
        return b"".join(chunks), None

    async def _forward(
        self,
        request: ClientRequest,
        ex: Exchange,
        body: bytes | AsyncIterable[bytes] | None,
        headers: CIMultiDict[str],
    ) -> Response:
        # What is forwarded is what was classified: the normalized path, the query as sent.
        query = request.raw_query
        target = ex.upstream_path + (f"?{query}" if query else "")
        t0 = time.perf_counter()
        try:
            with telemetry.upstream_span(ex.method, self._cfg.upstream_origin, headers) as span:
                upstream = await self._transport.handle(
                    UpstreamRequest(
                        method=ex.method, target=target, headers=headers.items(), body=body
                    )
                )
                held: HeldBody | None = None
                handed_over = False
                try:
                    telemetry.UPSTREAM_SECONDS.observe(time.perf_counter() - t0)
                    span.answered(upstream.status)
                    ex.status = upstream.status
                    ex.response_headers = {k.lower(): v for k, v in upstream.headers.items()}
                    client_headers = _client_headers(
                        upstream.headers, ex.request_id, self._cfg, self._cfg.public_base(request)
                    )
                    held, complete = await hold_body(upstream, self._cfg.buffer_limit, self.budget)
                    if complete:
                        upstream.close()  # read to its end: its connection is free
                        if held.file is None:
                            ex.response_body = held.value()
                            return await self._audited(ex, client_headers, ex.response_body)
                        response = await self._audited_held(ex, client_headers, held)
                    else:
                        ex.response_streamed = True
                        response = await self._audited_stream(ex, client_headers, held, upstream)
                    # A streamed answer owns the held body and the upstream's answer now:
                    # the listener closes it once sent.
                    handed_over = response.stream is not None
                    return response
                finally:
                    if not handed_over:
                        if held is not None:
                            held.close()
                        upstream.close()
        except BodyBrokenOff as exc:
            # The client's body broke off (or stopped) while it streamed upstream: the
            # server got a request cut short (its connection is dropped, so it never sees
            # the end).
            timed_out = isinstance(exc, BodyTimedOut)
            return await self._upstream_failure(
                ex,
                408 if timed_out else 400,
                "timeout" if timed_out else "incomplete",
                f"the request body did not arrive whole ({exc})",
                told="The request was not forwarded whole",
            )
        except TimeoutError:
            return await self._upstream_failure(ex, 504, "timeout", "upstream timed out")
        except UpstreamError as failed:  # (one name per type: mypyc types a name once)
            # An error may quote what was sent, query included.
            reason = redact_text(str(failed), self._cfg.redact_params)
            return await self._upstream_failure(
                ex, 502, "transient", f"upstream unreachable: {reason}"
            )

    async def _audited(self, ex: Exchange, headers: CIMultiDict[str], body: bytes) -> Response:
        """A whole body held in memory: audited, then sent whole."""
        failure = await self._pipeline.persist(ex)
        if failure is not None:
            return _failed_closed(failure)
        assert ex.status is not None
        return Response(status=ex.status, headers=headers, body=body)

    async def _audited_held(
        self, ex: Exchange, headers: CIMultiDict[str], held: HeldBody
    ) -> Response:
        """A whole body that spilled to its temporary file: audited from the whole body,
        then sent from memory and the file. The whole body is read back only for the
        build, one large body at a time (see :meth:`AuditPipeline.persist`)."""
        failure = await self._pipeline.persist(ex, held_response=held)
        if failure is not None:
            return _failed_closed(failure)
        assert ex.status is not None
        return Response(
            status=ex.status, headers=headers, stream=_HeldThenRest(held, None), length=held.size
        )

    async def _audited_stream(
        self, ex: Exchange, headers: CIMultiDict[str], held: HeldBody, upstream: UpstreamAnswer
    ) -> Response:
        """A body too large to hold: audited from its head before its first byte is sent
        (invariant 1), then sent as it comes."""
        failure = await self._pipeline.persist(ex)
        if failure is not None:
            return _failed_closed(failure)
        assert ex.status is not None
        return Response(status=ex.status, headers=headers, stream=_HeldThenRest(held, upstream))

    async def _upstream_failure(
        self,
        ex: Exchange,
        status: int,
        code: str,
        error: str,
        *,
        told: str = "The FHIR server could not be reached",
    ) -> Response:
        """Audit and answer an exchange that ended without the upstream's answer."""
        log.warning("%s %s: %s", ex.method, ex.path, error)
        ex.status = status
        ex.error = error
        ex.response_headers = {"content-type": FHIR_JSON}
        ex.response_body = None
        failure = await self._pipeline.persist(ex)
        if failure is not None:
            return _failed_closed(failure)
        return Response.outcome(
            status, code, f"{told}: {error}", headers={"X-Request-Id": ex.request_id}
        )


def _failed_closed(failure: AuditFailure) -> Response:
    """The answer to an exchange whose audit failed: its OperationOutcome, never the
    upstream's answer."""
    headers = (
        {"Retry-After": str(failure.retry_after_s)} if failure.retry_after_s is not None else None
    )
    return Response.outcome(failure.status, failure.code, failure.diagnostics, headers=headers)
