"""The proxy listener's side of HTTP/1.1: the client connections, parsed by httptools
(llhttp, the parser aiohttp and Node use).

:class:`Listener` is the protocol factory aiohttp's runners serve (``run_app``,
``AppRunner``, ``TestServer``: :func:`serve_on` puts it in place of aiohttp's own server
for one application), so start-up, shutdown and the cleanup contexts stay aiohttp's. Each
connection is an :class:`HttpConnection`; its requests are answered one at a time, in
order (a pipelined request waits with reading paused). A request reaches the handler as a
:class:`ClientRequest` as soon as its head is parsed, in a task of its own; its body
arrives through :class:`RequestBody`, reading paused while more than
:data:`HIGH_WATER` bytes of it wait. The handler answers with a whole response (``status``,
``headers``, ``body``: an aiohttp ``web.Response`` or an :class:`Answer`) or streams one
through :meth:`ClientRequest.start`. A client that leaves does not cancel its handler: its
exchange is audited all the same.

A request the parser refuses (a forbidden byte, a head past the limits, a broken body
framing) is answered by the application's refusal hook, given only the peer and the
parser's category of error, never the request's bytes; the connection closes after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol

import httptools
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.fhir.operation_outcome import FHIR_JSON, operation_outcome

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
HIGH_WATER = 64 * 1024
"""Bytes of a request body received and not yet read at which reading pauses."""
KEEPALIVE_S = 75.0
"""An idle client connection is closed after this long (aiohttp's and nginx's default)."""
HEADER_TIMEOUT_S = 20.0
"""Time a request head may take to arrive whole, from its first byte: past it the client
is answered 408 and the connection closes (``listen.header_timeout_s``)."""
BODY_TIMEOUT_S = 60.0
"""Time a request body may go without a byte while its reader waits for one: past it the
read fails with :class:`BodyTimedOut` (``listen.body_timeout_s``, nginx's
``client_body_timeout``)."""


class Answer:
    """A whole answer: what a handler returns when it has built the body itself."""

    __slots__ = ("body", "headers", "keep_alive", "status")

    def __init__(
        self, status: int, headers: Mapping[str, str], body: bytes, keep_alive: bool = True
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class WholeAnswer(Protocol):
    """What the listener sends whole: an :class:`Answer` or an aiohttp ``web.Response``."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Any: ...
    @property
    def body(self) -> Any: ...
    @property
    def keep_alive(self) -> bool | None: ...


Handler = Callable[["ClientRequest"], Awaitable["WholeAnswer | StreamedAnswer"]]
RefusalHook = Callable[[str, int, str], Awaitable["WholeAnswer | StreamedAnswer"]]
"""Answers (and audits) a request the parser refused: ``(peer, status, reason)``."""


class BodyBrokenOff(ConnectionResetError):
    """A request's body did not arrive whole: the client left, or its framing broke."""


class BodyTimedOut(BodyBrokenOff):
    """A request's body stopped arriving: nothing for the listener's ``body_timeout_s``
    while the handler waited for it. The connection closes after the answer."""


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


class RequestBody:
    """The body of one request as it arrives: read with :meth:`read_chunk` (``b""`` at its
    end) or :meth:`iter_chunks`. Past :data:`HIGH_WATER` unread bytes the connection stops
    reading until the handler catches up."""

    __slots__ = ("_chunks", "_conn", "_eof", "_error", "_size", "_waiter")

    def __init__(self, conn: HttpConnection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > HIGH_WATER:
            self._conn.pause_body()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._error = exc
        self._wake()

    async def read_chunk(self) -> bytes:
        """The next part of the body as it arrived, or ``b""`` at its end. Raises
        :class:`BodyBrokenOff` when it cannot arrive whole, :class:`BodyTimedOut` when
        nothing of it arrived for the listener's ``body_timeout_s``."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            conn = self._conn
            self._waiter = waiter = conn.loop.create_future()
            timer = conn.loop.call_later(conn.listener.body_timeout_s, self._timed_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size <= HIGH_WATER // 2:
            self._conn.resume_body()
        return chunk

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter is self._waiter and not waiter.done():
            seconds = self._conn.listener.body_timeout_s
            self.fail(BodyTimedOut(f"no byte of the request body for {seconds:g} s"))


class ClientRequest:
    """One request from a client, its head parsed. ``raw_path`` and ``raw_query`` are the
    target as sent (percent-encoded, fragment dropped); header names and values are the
    bytes sent decoded as UTF-8, an undecodable byte carried as a lone surrogate."""

    __slots__ = (
        "_conn",
        "_streamed",
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
        self.body: RequestBody | None = None
        self.content_length: int | None = None
        self.expects_continue = False
        self.started = time.perf_counter()
        self._streamed: StreamedAnswer | None = None

    @property
    def local_address(self) -> str:
        """``host:port`` of the listener as this client connected to it (``[v6]:port``)."""
        return self._conn.local_host

    def start(
        self, status: int, headers: Mapping[str, str], length: int | None = None
    ) -> StreamedAnswer:
        """Send the head of an answer whose body follows through the returned writer;
        with ``length`` None it is sent chunked (close-delimited to an HTTP/1.0 client).
        To a client that has gone nothing is sent, and the first write raises."""
        streamed = StreamedAnswer(self._conn, self, status, headers, length)
        self._streamed = streamed
        return streamed


class StreamedAnswer:
    """An answer whose head is sent and whose body is written as it comes."""

    __slots__ = ("_chunked", "_conn", "_finished", "_no_body", "body_length", "status")

    def __init__(
        self,
        conn: HttpConnection,
        request: ClientRequest,
        status: int,
        headers: Mapping[str, str],
        length: int | None,
    ) -> None:
        self._conn = conn
        self.status = status
        self.body_length = 0
        self._finished = False
        self._no_body = _bodiless(request.method, status)
        self._chunked = length is None and not self._no_body and request.version == "1.1"
        if length is None and not self._chunked and not self._no_body:
            conn.close_after = True  # close-delimited
        conn.write_head(request, status, headers, length, chunked=self._chunked)

    async def write(self, chunk: bytes) -> None:
        """Write a part of the body, waiting while the client does not take it in.
        Raises ``ConnectionResetError`` once the client has gone."""
        if not chunk or self._no_body:
            return
        conn = self._conn
        conn.check_open()
        self.body_length += len(chunk)
        if self._chunked:
            conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))  # type: ignore[union-attr]
        else:
            conn.transport.write(chunk)  # type: ignore[union-attr]
        await conn.drain()

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._chunked:
            self._conn.check_open()
            self._conn.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    @property
    def finished(self) -> bool:
        return self._finished


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


class _Date:
    """The ``Date`` header line, made once a second."""

    second = -1
    line = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.line = f"Date: {formatdate(second, usegmt=True)}\r\n"
        return cls.line


def _encode_head(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


class HttpConnection(asyncio.Protocol):
    """One client connection of the proxy listener."""

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
        self._body_paused = False
        self._pipeline_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closed = False
        self._stopped_parsing = False
        """Nothing more is parsed: once what was parsed is answered, the connection closes."""
        self._refusal: tuple[int, str] | None = None
        """A refusal to answer once the requests parsed before it are answered."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
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
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(gone)
        self._drain = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

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
            # httptools re-raises what a callback raised as this error, the callback's
            # exception its context.
            cause = exc.__context__
            if isinstance(cause, ParserRefused):
                self._refuse(cause.status, cause.reason)
            else:
                log.error("a request head could not be taken in", exc_info=cause)
                self._refuse(400, "HttpParserCallbackError")
        except httptools.HttpParserError as exc:
            self._refuse(400, parser_error_reason(exc))

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
            raise ParserRefused(414, "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_size += size + 4
        if size > MAX_FIELD or self._head_size > MAX_HEAD:
            raise ParserRefused(431, "a header line is too long")
        self._raw_headers.append((name, value))
        if len(self._raw_headers) > MAX_HEADERS:
            raise ParserRefused(431, "too many header lines")

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
            request.body = RequestBody(self)
        expect = headers.get("Expect")
        if expect is not None and expect.lower() == "100-continue" and request.version == "1.1":
            request.expects_continue = True
        self._parsing = request
        if self._active is None:
            self._begin(request)
        else:
            self._pending.append(request)
            self._pipeline_paused = True
            self._pause()

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
        self._pause()
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

    def _pause(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def _resume(self) -> None:
        if (
            self.transport is not None
            and not self._closed
            and not self._body_paused
            and not self._pipeline_paused
        ):
            self.transport.resume_reading()

    def pause_body(self) -> None:
        if not self._body_paused:
            self._body_paused = True
            self._pause()

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            self._resume()

    async def drain(self) -> None:
        if self._write_paused and not self._closed:
            if self._drain is None:
                self._drain = self.loop.create_future()
            await self._drain
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
        answer: Any = None
        try:
            answer = await self.listener.handler(request)
        except Exception:
            log.exception("%s %s: the handler failed", request.method, request.raw_path)
        try:
            streamed = request._streamed
            if streamed is not None:
                if not streamed.finished:
                    self.close_after = True
                    if self.transport is not None:
                        self.transport.abort()
                status, size = streamed.status, streamed.body_length
            elif answer is None:
                status, size = 500, self._send_whole(request, _HANDLER_FAILED)
            else:
                status, size = answer.status, self._send_whole(request, answer)
        except ConnectionError:
            status, size = 499, 0
        except Exception:
            log.exception("%s %s: the answer could not be sent", request.method, request.raw_path)
            status, size = 500, 0
            self.close_after = True
            if self.transport is not None:
                self.transport.abort()
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

    def _send_whole(self, request: ClientRequest, answer: WholeAnswer) -> int:
        if self._closed or self.transport is None:
            return 0
        body = answer.body
        if body is None:
            body = b""
        elif not isinstance(body, bytes):
            body = bytes(body)
        if answer.keep_alive is False:
            self.close_after = True
        status = answer.status
        no_body = _bodiless(request.method, status)
        head = self.head_bytes(request, status, answer.headers, None if no_body else len(body))
        if no_body:
            self.transport.write(head)
            return 0
        self.transport.write(head + body)
        return len(body)

    def write_head(
        self,
        request: ClientRequest,
        status: int,
        headers: Mapping[str, str],
        length: int | None,
        *,
        chunked: bool,
    ) -> None:
        """Send the head of a streamed answer; nothing once the client has gone (the
        first write of the body says so)."""
        if self._closed or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(self.head_bytes(request, status, headers, length, chunked=chunked))

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
            lines.append(_Date.now())
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
        elif self._pipeline_paused:
            self._pipeline_paused = False
            self._resume()

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
            answer: Any = await self.listener.refuse(self.remote, status, reason)
        except Exception:
            log.exception("a malformed request could not be answered")
            answer = _HANDLER_FAILED
        with contextlib.suppress(ConnectionError):
            self._send_whole(request, answer)
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


_HANDLER_FAILED = Answer(
    500,
    {"Content-Type": FHIR_JSON},
    orjson.dumps(operation_outcome("exception", "The proxy failed to answer this request.")),
    keep_alive=False,
)
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_HEAD_TIMED_OUT = Answer(
    408,
    {"Content-Type": FHIR_JSON},
    orjson.dumps(operation_outcome("timeout", "The request head did not arrive in time.")),
    keep_alive=False,
)


# --- the listener --------------------------------------------------------------------------


class Listener:
    """The protocol factory of the proxy listener, with the parts of aiohttp's
    ``web.Server`` its runners call (``pre_shutdown``, ``shutdown``, ``connections``)."""

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

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's call)
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


def serve_on(
    app: Any,
    handler: Callable[[], Handler],
    refuse: Callable[[], RefusalHook],
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> None:
    """Make every server aiohttp builds for ``app`` (``run_app``, ``AppRunner``,
    ``TestServer``) a :class:`Listener` calling ``handler()``'s result (looked up once
    start-up has run). aiohttp has no public seam for a protocol of one's own, so this
    replaces ``Application._make_handler`` (aiohttp is pinned; the suite runs through it)."""

    def make_handler(*, loop: asyncio.AbstractEventLoop | None = None, **_: Any) -> Listener:
        return Listener(
            handler(),
            refuse(),
            loop=loop,
            header_timeout_s=header_timeout_s,
            body_timeout_s=body_timeout_s,
        )

    app._make_handler = make_handler


def listen_hosts(host: str) -> list[str]:
    """The addresses a listener configured with ``host`` binds: ``::`` is every address of
    both families, as a Linux socket bound to ``::`` would take (asyncio binds ``::`` for
    IPv6 alone), so ``0.0.0.0`` and ``::``, or ``0.0.0.0`` alone on a kernel without IPv6.
    Any other host is bound as given."""
    if host != "::":
        return [host]
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        log.warning("no IPv6 on this host: listening on IPv4 only")
        return ["0.0.0.0"]
    return ["0.0.0.0", "::"]
