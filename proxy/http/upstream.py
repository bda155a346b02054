"""The proxy's HTTP/1.1 client to its FHIR server: a pool of keep-alive connections,
each an asyncio protocol whose answers are parsed by httptools (llhttp, the parser
aiohttp and Node use).

One upstream, one origin, requests that are already checked and normalized: the client
needs none of a general client's work (cookies, redirects, proxies, URL building,
content decoding), and that work was a third of the proxy's CPU per request.

- A request is written in one ``write``: its head, then its body when it is bytes; a body
  that streams goes with ``Transfer-Encoding: chunked``, paced by the transport's flow
  control. ``Accept-Encoding: identity`` is sent: the proxy audits the bodies it reads.
- An answer's body is buffered up to :data:`HIGH_WATER` bytes, then the connection stops
  reading until the caller takes what arrived (memory stays bounded however large it is).
- One timer per request bounds the whole exchange (``timeout``): past it the connection
  is aborted and the waiting caller gets a ``TimeoutError``.
- A connection goes back to the pool only when its answer was read to its end and both
  sides keep it alive; one idle longer than ``keepalive_s`` is closed instead of reused (a
  server's keep-alive timeout, Node's 5 s, must not close it under a request). A request
  that meets a pooled connection the server had already closed, before any byte of an
  answer, is sent once more on a new connection when its method is idempotent.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HIGH_WATER = 64 * 1024
"""Bytes of an answer's body buffered before the connection stops reading."""


_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """The upstream could not be reached, or broke off or garbled its answer."""


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream could be made."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before its answer was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1."""


class _HeadersOnly(Exception):
    """Raised from the parser's callback to end the answer to a ``HEAD`` at its headers."""


class UpstreamResponse:
    """An answer of the upstream: status and headers once :meth:`UpstreamPool.request`
    returns, the body as it arrives (:meth:`read`, :meth:`read_chunk`). It is the
    httptools parser's protocol (its ``on_*`` callbacks)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_cut",
        "_done",
        "_error",
        "_head",
        "_informational",
        "_keep_alive",
        "_parser",
        "_raw_headers",
        "_received",
        "_waiter",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, head: bool) -> None:
        self._conn = conn
        self._head = head
        self._parser = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._informational = False
        self._keep_alive = False
        self._received = False
        self._cut = False
        """The request's body was not sent whole (the answer came first)."""
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None

    # -- the parser's callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._informational = True  # 100 Continue, 103 Early Hints: not the answer
            return
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw_headers
        )
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.status = status
        if self._head:
            raise _HeadersOnly
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._done = True
        self._wake()

    # -- what the connection tells it ----------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersOnly):
                self.content_length = 0
                self._done = True  # not kept alive: the parser stopped mid-message
                self._wake()
                return
            self.fail(UpstreamProtocolError(f"invalid HTTP answer ({type(exc).__name__})"))
            self._conn.abort()

    def lost(self, exc: BaseException | None) -> None:
        """The connection closed. An answer whose end is the connection's end is then
        complete; any other unfinished answer failed."""
        if self._done:
            return
        if (
            self.status
            and self.content_length is None
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
        ):
            self._done = True
            self._keep_alive = False
            self._wake()
            return
        reason = f": {exc}" if exc is not None else ""
        self.fail(UpstreamDisconnected(f"the upstream closed the connection{reason}"))

    def fail(self, exc: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._conn.loop.create_future()
        await waiter
        if self._error is not None:
            raise self._error

    # -- what the caller reads -----------------------------------------------------------

    async def _wait_head(self) -> None:
        while not self.status:
            await self._wait()

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last read (waiting for some), or ``b""``
        at the end of the body."""
        while not self._chunks:
            if self._done:
                return b""
            await self._wait()
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered > HIGH_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The rest of the body, whole."""
        length = self.content_length
        if self._done or (length is not None and length <= HIGH_WATER):
            # All of it fits in the buffer: no reading paused on the way.
            while not self._done:
                await self._wait()
            return await self.read_chunk()
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def iter_chunked(self) -> AsyncIterator[bytes]:
        """The rest of the body, as it arrives."""
        while chunk := await self.read_chunk():
            yield chunk

    @property
    def reusable(self) -> bool:
        return (
            self._done
            and self._keep_alive
            and self._error is None
            and not self._chunks
            and not self._cut
        )


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One connection to the upstream, carrying one exchange at a time."""

    __slots__ = ("_drain", "_paused", "closed", "idle_since", "loop", "response", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None:
            response.lost(exc)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            error = response._error if response is not None else None
            drain.set_exception(error or UpstreamDisconnected("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def check_open(self) -> None:
        """Raise :class:`UpstreamDisconnected` once the connection is closed (a write to
        it would raise ``RuntimeError``)."""
        if self.closed:
            raise UpstreamDisconnected("the upstream closed the connection")

    async def drain(self) -> None:
        self.check_open()
        if self._paused:
            self._drain = self.loop.create_future()
            await self._drain

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


Body = bytes | AsyncIterable[bytes] | None


class UpstreamPool:
    """Keep-alive connections to one origin (``http`` or ``https``), at most
    ``max_connections`` open at once (a request waits for one beyond that), each reused
    while it has been idle less than ``keepalive_s``."""

    def __init__(
        self,
        origin: URL,
        *,
        max_connections: int = 100,
        connect_timeout: float = 5.0,
        timeout: float = 60.0,
        keepalive_s: float = 4.0,
    ) -> None:
        assert origin.host is not None and origin.port is not None
        self._host = origin.host
        self._port = origin.port
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if origin.scheme == "https" else None
        )
        host = f"[{origin.host}]" if ":" in origin.host else origin.host
        self._host_header = (
            f"Host: {host}\r\n" if origin.is_default_port() else f"Host: {host}:{origin.port}\r\n"
        )
        self._connect_timeout = connect_timeout
        self.timeout = timeout
        self._keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._open: set[_Connection] = set()
        self._closed = False

    def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: Body = None
    ) -> _Exchange:
        """``async with pool.request(...) as answer``: the answer's status and headers
        have arrived; leaving the block releases (or closes) its connection. ``target``
        is the path and query as sent; ``headers`` must not hold ``Host``,
        ``Content-Length`` nor ``Transfer-Encoding``. Raises ``TimeoutError`` past the
        timeout and :class:`UpstreamError` for any other failure."""
        return _Exchange(self, method, target, headers, body)

    async def close(self) -> None:
        """Close every connection; requests still running fail."""
        self._closed = True
        for conn in list(self._open):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()

    # -- internals -------------------------------------------------------------------------

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: Body
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n", self._host_header]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif method in _BODY_EXPECTED:
            lines.append("Content-Length: 0\r\n")
        lines.append("Accept-Encoding: identity\r\n\r\n")
        text = "".join(lines)
        # Every line break is one this wrote: none came in with a name, value or target
        # (the listener's parser refuses them; this keeps that true whatever calls it).
        breaks = len(lines) + 1
        if text.count("\n") != breaks or text.count("\r") != breaks:
            raise UpstreamProtocolError("a line break in the request's target or headers")
        return text.encode("utf-8")

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except OSError as exc:
            raise UpstreamConnectError(
                f"cannot connect to {self._host}:{self._port}: {exc.strerror or exc}"
            ) from exc
        self._open.add(conn)
        return conn

    def _pooled(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive_s:
                return conn
            conn.abort()
            self._open.discard(conn)
        return None

    async def _send(self, exchange: _Exchange, deadline: float) -> UpstreamResponse:
        if self._closed:
            raise UpstreamDisconnected("the upstream client is closed")
        method, target, headers, body = exchange._args
        loop = asyncio.get_running_loop()
        head = self._head(method, target, headers, body)
        # A streamed body cannot be sent twice: it was consumed.
        retry = method in _IDEMPOTENT and (body is None or isinstance(body, bytes))
        while True:
            conn = self._pooled(loop.time())
            reused = conn is not None
            if conn is None:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connect(loop)
            response = exchange._response = UpstreamResponse(conn, method == "HEAD")
            conn.response = response
            transport = conn.transport
            assert transport is not None
            try:
                if isinstance(body, bytes):
                    transport.write(head + body if len(body) < 65536 else head)
                    if len(body) >= 65536:
                        transport.write(body)
                elif body is not None:
                    transport.write(head)
                    # A body that stalls is bounded by the exchange's deadline too.
                    async with asyncio.timeout_at(deadline):
                        async for chunk in body:
                            if response.status:
                                # Answered before the body was whole (a 413, a 401): RFC 9112
                                # §9.5, stop sending it; the connection ends with this answer.
                                response._cut = True
                                break
                            if chunk:
                                conn.check_open()
                                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                                await conn.drain()
                        else:
                            conn.check_open()
                            transport.write(b"0\r\n\r\n")
                else:
                    transport.write(head)
                await response._wait_head()
            except UpstreamDisconnected:
                if response.status and body is not None and not isinstance(body, bytes):
                    # It answered early, then closed while the body was being sent: the
                    # answer stands (read on as far as it arrived).
                    response._cut = True
                    return response
                exchange._response = None
                self._drop(conn)
                if reused and retry and not response._received:
                    continue  # the server had closed it while it was idle
                raise
            except BaseException:
                exchange._response = None
                self._drop(conn)
                raise
            return response

    def _release(self, response: UpstreamResponse) -> None:
        conn = response._conn
        conn.response = None
        if response.reusable and not conn.closed and not self._closed:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.response = None
        conn.abort()
        self._open.discard(conn)


class _Exchange:
    """``async with``: one request's connection slot, timer and connection."""

    __slots__ = ("_args", "_pool", "_response", "_slot", "_timer")

    def __init__(
        self,
        pool: UpstreamPool,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: Body,
    ) -> None:
        self._pool = pool
        self._args = (method, target, headers, body)
        self._response: UpstreamResponse | None = None
        """The answer in flight: awaited for its head, then read by the caller."""
        self._timer: asyncio.TimerHandle | None = None
        self._slot = False

    async def __aenter__(self) -> UpstreamResponse:
        pool = self._pool
        loop = asyncio.get_running_loop()
        # The timeout counts from here: waiting for a free connection is part of it.
        deadline = loop.time() + pool.timeout
        self._timer = loop.call_at(deadline, self._time_out)
        try:
            if pool._slots.locked():
                async with asyncio.timeout_at(deadline):
                    await pool._slots.acquire()
            else:
                await pool._slots.acquire()
            self._slot = True
            return await pool._send(self, deadline)
        except BaseException:
            self._end()
            raise

    def _time_out(self) -> None:
        """Past the deadline with an answer in flight: it fails with ``TimeoutError`` and
        its connection is aborted. (A wait for a slot or a connection has its own.)"""
        self._timer = None
        response = self._response
        if response is not None:
            response.fail(TimeoutError())
            response._conn.abort()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end()

    def _end(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        response, self._response = self._response, None
        if response is not None:
            self._pool._release(response)
        if self._slot:
            self._slot = False
            self._pool._slots.release()
