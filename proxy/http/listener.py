"""The proxy listener's side of HTTP/1.1: the client connections, parsed by httptools
(llhttp, the parser aiohttp and Node use).

:class:`Listener` is the protocol factory of the listening sockets
(:class:`proxy.http.server.Server` binds them). Each connection is an
:class:`HttpConnection`; its requests are answered one at a time, in order (a pipelined
request waits with reading paused). A request reaches the handler as a
:class:`ClientRequest` as soon as its head is parsed, in a task of its own; its body
arrives through an :class:`~proxy.http.flow.IncomingBody`, reading paused while more than
:data:`~proxy.http.flow.HIGH_WATER` bytes of it wait. The handler answers with a
:class:`~proxy.http.response.Response`, its body whole or streamed. A client that leaves
does not cancel its handler: its exchange is audited all the same.

A request the parser refuses (a forbidden byte, a head past the limits, a broken body
framing) is answered by the refusal hook, given only the peer and the parser's category of
error, never the request's bytes; the connection closes after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.flow import (
    PIPELINE_HOLD,
    STOP_HOLD,
    BodyBrokenOff,
    FlowControl,
    IncomingBody,
)
from proxy.http.response import BodyStream, Response

log = logging.getLogger(__name__)
access_log = logging.getLogger("proxy.access")

MAX_LINE = 8190
"""The longest request target, in bytes (aiohttp's limit): longer is answered 414."""
MAX_FIELD = 8190
"""The longest header name or value: longer is answered 431."""
MAX_HEAD = 65536
"""All header lines together: more is answered 431."""
MAX_HEADERS = 128
"""Header lines in one request: more is answered 431."""
KEEPALIVE_S = 75.0
"""An idle client connection is closed after this long (aiohttp's and nginx's default)."""
HEADER_TIMEOUT_S = 20.0
"""Time a request head may take to arrive whole, from its first byte: past it the client
is answered 408 and the connection closes (``listen.header_timeout_s``)."""
BODY_TIMEOUT_S = 60.0
"""Time a request body may go without a byte while its reader waits for one: past it the
read fails with :class:`~proxy.http.flow.BodyTimedOut` (``listen.body_timeout_s``, nginx's
``client_body_timeout``)."""


Handler = Callable[["ClientRequest"], Awaitable[Response]]
RefusalHook = Callable[[str, int, str], Awaitable[Response]]
"""Answers (and audits) a request the parser refused: ``(peer, status, reason)``."""


class ParserRefused(Exception):
    """A request head past the listener's limits."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_PLAIN_WORDS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")


def parser_error_reason(exc: BaseException) -> str:
    """A description of a parser error that cannot hold the request's bytes: the error's
    class, and its message only when that is plain words (llhttp's fixed reasons, such
    as ``Invalid header value char``), 80 characters at most."""
    first = str(exc).strip().split("\n", 1)[0].rstrip(":").strip()
    kind = type(exc).__name__
    if first and len(first) <= 80 and first[0].isalpha() and set(first) <= _PLAIN_WORDS:
        return f"{kind}: {first}"
    return kind


# --- the request as the handler sees it ----------------------------------------------------


class ClientRequest:
    """One request from a client, its head parsed. ``raw_path`` and ``raw_query`` are the
    target as sent (percent-encoded, fragment dropped); header names and values are the
    bytes sent decoded as UTF-8, an undecodable byte carried as a lone surrogate."""

    __slots__ = (
        "_conn",
        "body",
        "content_length",
        "expects_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "raw_path",
        "raw_query",
        "remote",
        "scheme",
        "started",
        "version",
    )

    def __init__(
        self,
        conn: HttpConnection,
        method: str,
        raw_path: str,
        raw_query: str,
        version: str,
        headers: CIMultiDictProxy[str],
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.raw_query = raw_query
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.remote = conn.remote
        self.scheme = "http"
        self.host = headers.get("Host") or conn.local_host
        self.body: IncomingBody | None = None
        self.content_length: int | None = None
        self.expects_continue = False
        self.started = time.perf_counter()

    @property
    def local_address(self) -> str:
        """``host:port`` of the listener as this client connected to it (``[v6]:port``)."""
        return self._conn.local_host


# --- the connection ------------------------------------------------------------------------

_STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus if s.value >= 100
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _status_line(status: int) -> str:
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status\r\n"


def _bodiless(method: str, status: int) -> bool:
    """Whether an answer has no body whatever its headers say (RFC 9112 §6.3)."""
    return method == "HEAD" or status in (204, 304) or status < 200


class _DateLine:
    """The ``Date`` header line, made once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._line = f"Date: {formatdate(second, usegmt=True)}\r\n"
        return self._line


_DATE = _DateLine()


def _encode_head(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


class HttpConnection(asyncio.Protocol):
    """One client connection of the proxy listener."""

    flow: FlowControl
    """Its flow control, both ways (from ``connection_made`` on)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.remote = "unknown"
        self.local_host = "localhost"
        self.close_after = False
        """Close once the request being answered is answered."""
        self.idle_since = self.loop.time()
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: ClientRequest | None = None
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._in_head = False
        """A request's head has begun to arrive and is not whole yet."""
        self.head_started = 0.0
        """When the head being received began to arrive (``loop.time()``), while
        ``_in_head``: the listener's sweep answers 408 to one not whole in time."""
        self._active: ClientRequest | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: deque[ClientRequest] = deque()
        self._closed = False
        self._stopped_parsing = False
        """Nothing more is parsed: once what was parsed is answered, the connection closes."""
        self._refusal: tuple[int, str] | None = None
        """A refusal to answer once the requests parsed before it are answered."""
        self._head_refused: ParserRefused | None = None
        """The limit a parser callback found passed, while the parser unwinds."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.flow = FlowControl(self.transport, self.loop)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0])
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple) and len(sock) >= 2:
            host = str(sock[0])
            self.local_host = f"[{host}]:{sock[1]}" if ":" in host else f"{host}:{sock[1]}"
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.listener.connections.discard(self)
        gone = BodyBrokenOff("the client closed the connection")
        for request in (self._parsing, self._active):
            if request is not None and request.body is not None:
                request.body.fail(gone)
        self._pending.clear()
        self.flow.connection_lost(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._stopped_parsing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (or CONNECT): the request itself is answered as any other (the
            # header is hop-by-hop, never forwarded); what follows it is not HTTP.
            self._stop_parsing()
        except httptools.HttpParserCallbackError as exc:
            # httptools re-raises what a callback raised as this error. Which limit was
            # passed is kept here, not read from the error's context (compiled by mypyc,
            # the callback's exception is not always that context).
            refused, self._head_refused = self._head_refused, None
            if refused is not None:
                self._refuse(refused.status, refused.reason)
            else:
                log.error("a request head could not be taken in", exc_info=exc.__context__)
                self._refuse(400, "HttpParserCallbackError")
        except httptools.HttpParserError as malformed:  # (one name per type, for mypyc)
            self._refuse(400, parser_error_reason(malformed))

    def eof_received(self) -> bool | None:
        """The client closed its side: nothing follows. A body still arriving never
        will; an answer being made is still sent (a half-closed client may wait for it)."""
        self.close_after = True
        request = self._parsing
        if request is not None and request.body is not None:
            request.body.fail(BodyBrokenOff("the client closed the connection"))
        return True if self._active is not None else None

    # parser callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._raw_headers = []
        self._head_size = 0
        self.head_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            self._refuse_head(414, "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_size += size + 4
        if size > MAX_FIELD or self._head_size > MAX_HEAD:
            self._refuse_head(431, "a header line is too long")
        self._raw_headers.append((name, value))
        if len(self._raw_headers) > MAX_HEADERS:
            self._refuse_head(431, "too many header lines")

    def _refuse_head(self, status: int, reason: str) -> None:
        """Stop the parser at a head past the listener's limits (see data_received)."""
        refused = self._head_refused = ParserRefused(status, reason)
        raise refused

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        target = self._url.decode("utf-8", "surrogateescape")
        if "#" in target:
            target = target.split("#", 1)[0]
        if not target.startswith("/") and "://" in target:
            # absolute-form: the path and query of the URL
            scheme_end = target.index("://") + 3
            slash = target.find("/", scheme_end)
            target = target[slash:] if slash >= 0 else "/"
        path, _, query = target.partition("?")
        headers = CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in self._raw_headers
        )
        request = ClientRequest(
            self,
            parser.get_method().decode("ascii"),
            path,
            query,
            parser.get_http_version(),
            CIMultiDictProxy(headers),
            parser.should_keep_alive(),
        )
        length = headers.get("Content-Length")
        if length is not None:
            request.content_length = int(length)  # llhttp has checked it is digits
        if request.content_length or "Transfer-Encoding" in headers:
            request.body = IncomingBody(self.flow, idle_timeout_s=self.listener.body_timeout_s)
        expect = headers.get("Expect")
        if expect is not None and expect.lower() == "100-continue" and request.version == "1.1":
            request.expects_continue = True
        self._parsing = request
        if self._active is None:
            self._begin(request)
        else:
            self._pending.append(request)
            self.flow.hold_reading(PIPELINE_HOLD)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None and request.body is not None:
            request.body.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if request is not None and request.body is not None:
            request.body.feed_eof()

    # a head that does not arrive

    def head_late(self, horizon: float) -> bool:
        """Whether a head is arriving that began before ``horizon`` (``loop.time()``)."""
        return self._in_head and self.head_started < horizon and not self._closed

    def head_timed_out(self) -> None:
        """Answer 408 to a head not whole in time, and close. Nothing of it was
        identified (no request line and headers to audit): it is logged, not audited.
        Behind a request still being answered, the connection closes after that answer."""
        if not self._in_head or self._closed:
            return
        self._in_head = False
        self._stopped_parsing = True
        self.close_after = True
        self.flow.hold_reading(STOP_HOLD)
        log.info(
            "a request head from %s did not arrive within %g s: 408, connection closed",
            self.remote,
            self.listener.header_timeout_s,
        )
        if self._active is None and self.transport is not None:
            request = ClientRequest(self, "GET", "", "", "1.1", _NO_HEADERS, keep_alive=False)
            with contextlib.suppress(ConnectionError):
                self._send_whole(request, _HEAD_TIMED_OUT)
            self.transport.close()

    # flow control

    async def drain(self) -> None:
        """Wait while the client does not take in what was written. Raises
        ``ConnectionResetError`` once it has gone."""
        await self.flow.drain()
        self.check_open()

    def check_open(self) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")

    # answering

    def _begin(self, request: ClientRequest) -> None:
        self._active = request
        if request.expects_continue and self.transport is not None:
            self.transport.write(_CONTINUE)
        self._task = self.loop.create_task(self._answer(request))

    async def _answer(self, request: ClientRequest) -> None:
        response: Response | None = None
        try:
            response = await self.listener.handler(request)
        except Exception:
            log.exception("%s %s: the handler failed", request.method, request.raw_path)
        if response is None:
            response = _HANDLER_FAILED
        status, size = response.status, 0
        try:
            if response.stream is None:
                size = self._send_whole(request, response)
            else:
                size = await self._send_streamed(request, response, response.stream)
        except ConnectionError:
            status = 499
        except Exception:
            log.exception("%s %s: the answer could not be sent", request.method, request.raw_path)
            status = 500
            self._cut_short()
        if access_log.isEnabledFor(logging.DEBUG):
            access_log.debug(
                '%s "%s %s" %s %s %.3fs',
                request.remote,
                request.method,
                request.raw_path,
                status,
                size,
                time.perf_counter() - request.started,
            )
        self._finished(request)

    def _send_whole(self, request: ClientRequest, response: Response) -> int:
        """Send ``response`` (its :attr:`~Response.body`); the bytes of body sent."""
        if self._closed or self.transport is None:
            return 0
        if not response.keep_alive:
            self.close_after = True
        body = response.body
        status = response.status
        no_body = _bodiless(request.method, status)
        head = self.head_bytes(request, status, response.headers, None if no_body else len(body))
        if no_body:
            self.transport.write(head)
            return 0
        self.transport.write(head + body)
        return len(body)

    async def _send_streamed(
        self, request: ClientRequest, response: Response, stream: BodyStream
    ) -> int:
        """Send the head of ``response``, then its stream as it comes, waiting while the
        client does not take it in; the bytes of body sent. A stream that raises cuts the
        answer short. The stream is closed in every case."""
        try:
            if not response.keep_alive:
                self.close_after = True
            status, length = response.status, response.length
            no_body = _bodiless(request.method, status)
            chunked = length is None and not no_body and request.version == "1.1"
            if length is None and not chunked and not no_body:
                self.close_after = True  # close-delimited
            self.check_open()
            transport = self.transport
            assert transport is not None
            transport.write(
                self.head_bytes(request, status, response.headers, length, chunked=chunked)
            )
            if no_body:
                return 0
            sent = 0
            try:
                async for chunk in stream:
                    if not chunk:
                        continue
                    self.check_open()
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    sent += len(chunk)
                    await self.drain()
            except ConnectionError:
                raise
            except Exception as exc:
                log.warning(
                    "%s %s: the answer was cut short after %d bytes of its body: %s",
                    request.method,
                    request.raw_path,
                    sent,
                    exc or type(exc).__name__,
                )
                self._cut_short()
                return sent
            if chunked:
                self.check_open()
                transport.write(b"0\r\n\r\n")
            return sent
        finally:
            await stream.aclose()

    def _cut_short(self) -> None:
        """End an answer that cannot be completed: the client must not take it for whole."""
        self.close_after = True
        if self.transport is not None:
            self.transport.abort()

    def head_bytes(
        self,
        request: ClientRequest,
        status: int,
        headers: Mapping[str, str],
        length: int | None,
        *,
        chunked: bool = False,
    ) -> bytes:
        """The status line and header block of an answer to ``request``: ``headers`` as
        given, then ``Date`` (unless given), the framing and ``Connection``."""
        lines = [_status_line(status)]
        has_date = False
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n")
            if not has_date and len(name) == 4 and name.lower() == "date":
                has_date = True
        if not has_date:
            lines.append(_DATE.now())
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        keep = request.keep_alive and not self._last_answer()
        if not keep:
            self.close_after = True
            lines.append("Connection: close\r\n")
        elif request.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # No header may add or end a line (a value from anywhere but the upstream's
        # parsed answer could carry one): each line holds exactly one CR and one LF.
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("a header name or value holds a line break")
        return _encode_head(text)

    def _finished(self, request: ClientRequest) -> None:
        self._active = None
        self._task = None
        self.idle_since = self.loop.time()
        if request.body is not None and not request.body.at_eof:
            # The handler did not read the whole body: what follows it cannot be parsed
            # as the next request before the rest arrives; close instead.
            self.close_after = True
        if self._closed:
            return
        if self.close_after or self.listener.closing:
            if self.transport is not None:
                self.transport.close()
            return
        if self._pending:
            self._begin(self._pending.popleft())
        elif self._refusal is not None:
            self._begin_refusal(*self._refusal)
        elif self._stopped_parsing:
            if self.transport is not None:
                self.transport.close()
        else:
            self.flow.release_reading(PIPELINE_HOLD)

    def _last_answer(self) -> bool:
        """Whether the answer being sent is the last on this connection."""
        return (
            self.close_after
            or self.listener.closing
            or (self._stopped_parsing and not self._pending and self._refusal is None)
        )

    def _stop_parsing(self) -> None:
        self._stopped_parsing = True
        request = self._parsing
        self._parsing = None
        if request is not None and request.body is not None:
            request.body.feed_eof()
        if self._active is None and self.transport is not None:
            self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a request the parser refused (after the requests parsed before it),
        then close: nothing after it on this connection can be framed."""
        self._stopped_parsing = True
        request = self._parsing
        self._parsing = None
        if request is not None and request.body is not None:
            # The head was whole and its handler runs or waits: its body broke off.
            request.body.fail(BodyBrokenOff(f"the request body is malformed ({reason})"))
            return
        if self._active is not None:
            self._refusal = (status, reason)
            return
        self._begin_refusal(status, reason)

    def _begin_refusal(self, status: int, reason: str) -> None:
        self._refusal = None
        self.close_after = True
        request = ClientRequest(self, "GET", "", "", "1.1", _NO_HEADERS, keep_alive=False)
        self._active = request
        self._task = self.loop.create_task(self._answer_refusal(request, status, reason))

    async def _answer_refusal(self, request: ClientRequest, status: int, reason: str) -> None:
        try:
            response = await self.listener.refuse(self.remote, status, reason)
        except Exception:
            log.exception("a malformed request could not be answered")
            response = _HANDLER_FAILED
        if response.stream is not None:  # a refusal is answered whole
            await response.stream.aclose()
        with contextlib.suppress(ConnectionError):
            self._send_whole(request, response)
        self._active = None
        if self.transport is not None:
            self.transport.close()

    # shutdown

    @property
    def idle(self) -> bool:
        return self._active is None and self._parsing is None and not self._in_head

    def close_if_idle(self) -> bool:
        if self.idle and self.transport is not None:
            self.transport.close()
            return True
        return False

    @property
    def answering(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_answered(self) -> None:
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()


_HANDLER_FAILED = Response.outcome(
    500, "exception", "The proxy failed to answer this request.", keep_alive=False
)
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_HEAD_TIMED_OUT = Response.outcome(
    408, "timeout", "The request head did not arrive in time.", keep_alive=False
)


# --- the listener --------------------------------------------------------------------------


class Listener:
    """The protocol factory of the proxy listener's sockets: a connection each, answered
    by ``handler``. Its server stops it in two steps: :meth:`pre_shutdown` once the
    sockets are closed, :meth:`shutdown` to let the answers in flight finish."""

    def __init__(
        self,
        handler: Handler,
        refuse: RefusalHook,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        keepalive_s: float = KEEPALIVE_S,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.refuse = refuse
        self.loop = loop or asyncio.get_running_loop()
        self.keepalive_s = keepalive_s
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._sweep_every_s = min(keepalive_s, header_timeout_s) / 4
        self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep)

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def _sweep(self) -> None:
        """Answer 408 to the heads not whole ``header_timeout_s`` after they began, and
        close the connections idle past ``keepalive_s`` (one timer for all of them)."""
        now = self.loop.time()
        idle_horizon = now - self.keepalive_s
        head_horizon = now - self.header_timeout_s
        for conn in list(self.connections):
            if conn.head_late(head_horizon):
                conn.head_timed_out()
            elif conn.idle_since < idle_horizon and conn._active is None:
                conn.close_after = True
                if conn.transport is not None:
                    conn.transport.close()
        if not self.closing:
            self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep)

    def pre_shutdown(self) -> None:
        """The listening sockets are closed: no new request starts; idle connections close."""
        self.closing = True
        self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close_after = True
            conn.close_if_idle()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (a grace, not a deadline)
        """Let the requests being answered finish, for ``timeout`` seconds at most; then
        cancel what is left and close every connection."""
        self.pre_shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                # Answers begun during the grace (their head was arriving) count too.
                while busy := [c.wait_answered() for c in self.connections if c.answering]:
                    await asyncio.gather(*busy, return_exceptions=True)
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()
