"""The proxy's HTTP/1.1 client to its FHIR server, the :class:`~proxy.http.transport.Transport`
a running proxy forwards through: a pool of keep-alive connections, each an asyncio
protocol whose answers are parsed by httptools (llhttp, the parser aiohttp and Node use).

It serves one origin with requests that are already checked and normalized, so it does
none of a general client's work (cookies, redirects, proxies, URL building, content
decoding).

- A request is written in one ``write``: its head, then its body when it is bytes; a body
  that streams goes with ``Transfer-Encoding: chunked``, paced by the transport's flow
  control. ``Accept-Encoding: identity`` is sent: the proxy audits the bodies it reads.
- An answer's body arrives through an :class:`~proxy.http.flow.IncomingBody`: past
  :data:`~proxy.http.flow.HIGH_WATER` unread bytes the connection stops reading until the
  caller takes them.
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
import ssl
from collections.abc import AsyncIterable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.http.flow import FlowControl, IncomingBody
from proxy.http.transport import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamRequest,
)

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})
_WRITE_APART = 65536
"""A body at least this long is written after its head, not joined to it."""


class _HeadersOnly(Exception):
    """Raised from the parser's callback to end the answer to a ``HEAD`` at its headers."""


class UpstreamResponse:
    """An answer of the upstream: status and headers once :meth:`UpstreamPool.handle`
    returns, the body as it arrives (:attr:`body`). It is the httptools parser's protocol
    (its ``on_*`` callbacks). :meth:`close` ends its exchange."""

    __slots__ = (
        "_conn",
        "_cut",
        "_error",
        "_head",
        "_head_waiter",
        "_headers_only",
        "_informational",
        "_keep_alive",
        "_lease",
        "_parser",
        "_raw_headers",
        "_received",
        "body",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, lease: _Lease, head: bool) -> None:
        self._conn = conn
        self._lease = lease
        self._head = head
        self._headers_only = False
        """The answer to a HEAD ended at its headers (the parser stopped there)."""
        self._parser = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._keep_alive = False
        self._received = False
        self._cut = False
        """The request's body was not sent whole (the answer came first)."""
        self._error: BaseException | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None
        self.body = IncomingBody(conn.flow)

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
            # The parser is stopped: an answer to HEAD has no body, whatever its
            # Content-Length says. (Noted here, not read from the error's context.)
            self._headers_only = True
            raise _HeadersOnly
        self._wake_head()

    def on_body(self, body: bytes) -> None:
        self.body.feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        self.body.feed_eof()

    # -- what the connection tells it ----------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._headers_only:
                self.content_length = 0
                self.body.feed_eof()  # not kept alive: the parser stopped mid-message
                self._wake_head()
                return
            self.fail(UpstreamProtocolError(f"invalid HTTP answer ({type(exc).__name__})"))
            self._conn.abort()

    def lost(self, exc: BaseException | None) -> None:
        """The connection closed. An answer whose end is the connection's end is then
        complete; any other unfinished answer failed."""
        if self.body.complete:
            return
        if (
            self.status
            and self.content_length is None
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
        ):
            self._keep_alive = False
            self.body.feed_eof()
            return
        reason = f": {exc}" if exc is not None else ""
        self.fail(UpstreamDisconnected(f"the upstream closed the connection{reason}"))

    def fail(self, exc: BaseException) -> None:
        """The answer cannot arrive whole: its head, or the rest of its body, fails with
        ``exc``."""
        if self._error is None and not self.body.complete:
            self._error = exc
            self.body.fail(exc)
            self._wake_head()

    def _wake_head(self) -> None:
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_head(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            if self.body.complete:
                raise UpstreamProtocolError("the answer ended before its head")
            waiter = self._head_waiter = self._conn.loop.create_future()
            await waiter

    # -- what the caller does ------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        return self.body.at_eof and self._keep_alive and self._error is None and not self._cut

    def close(self) -> None:
        """End the exchange: its connection goes back to the pool if the answer was read
        to its end, else it is closed; the deadline and the connection slot are let go."""
        self._lease.end()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One connection to the upstream, carrying one exchange at a time."""

    __slots__ = ("closed", "flow", "idle_since", "loop", "response", "transport")

    flow: FlowControl
    """Its flow control, both ways (from ``connection_made`` on)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.flow = FlowControl(self.transport, self.loop)

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
        error = response._error if response is not None else None
        self.flow.connection_lost(
            error or UpstreamDisconnected("the upstream closed the connection")
        )

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def check_open(self) -> None:
        """Raise :class:`UpstreamDisconnected` once the connection is closed (a write to
        it would raise ``RuntimeError``)."""
        if self.closed:
            raise UpstreamDisconnected("the upstream closed the connection")

    async def drain(self) -> None:
        self.check_open()
        await self.flow.drain()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


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

    async def handle(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send ``request``; the answer once its status and headers have arrived. The
        contract is :class:`proxy.http.transport.Transport`'s: close the answer when done
        with it; ``TimeoutError`` past ``timeout`` (counted from this call, waiting for a
        free connection included, up to the answer's close); :class:`UpstreamError` for
        any other failure."""
        loop = asyncio.get_running_loop()
        lease = _Lease(self, loop, loop.time() + self.timeout)
        try:
            await lease.take_slot()
            return await self._send(request, lease)
        except BaseException:
            lease.end()
            raise

    async def close(self) -> None:
        """Close every connection; requests still running fail."""
        self._closed = True
        for conn in list(self._open):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()

    # -- internals -------------------------------------------------------------------------

    def _head(self, request: UpstreamRequest) -> bytes:
        method, body = request.method, request.body
        lines = [f"{method} {request.target} HTTP/1.1\r\n", self._host_header]
        lines += [f"{name}: {value}\r\n" for name, value in request.headers]
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

    async def _send(self, request: UpstreamRequest, lease: _Lease) -> UpstreamResponse:
        if self._closed:
            raise UpstreamDisconnected("the upstream client is closed")
        method, body = request.method, request.body
        loop = lease.loop
        head = self._head(request)
        # A streamed body cannot be sent twice: it was consumed.
        retry = method in _IDEMPOTENT and (body is None or isinstance(body, bytes))
        while True:
            conn = self._pooled(loop.time())
            reused = conn is not None
            if conn is None:
                async with asyncio.timeout_at(lease.deadline):
                    conn = await self._connect(loop)
            response = lease.response = UpstreamResponse(conn, lease, method == "HEAD")
            conn.response = response
            transport = conn.transport
            assert transport is not None
            try:
                if isinstance(body, bytes):
                    if len(body) < _WRITE_APART:
                        transport.write(head + body)
                    else:
                        transport.write(head)
                        transport.write(body)
                elif body is not None:
                    transport.write(head)
                    await self._send_stream(conn, response, body, lease.deadline)
                else:
                    transport.write(head)
                await response._wait_head()
            except UpstreamDisconnected:
                if response.status and body is not None and not isinstance(body, bytes):
                    # It answered early, then closed while the body was being sent: the
                    # answer stands (read on as far as it arrived).
                    response._cut = True
                    return response
                lease.response = None
                self._drop(conn)
                if reused and retry and not response._received:
                    continue  # the server had closed it while it was idle
                raise
            except BaseException:
                lease.response = None
                self._drop(conn)
                raise
            return response

    @staticmethod
    async def _send_stream(
        conn: _Connection, response: UpstreamResponse, body: AsyncIterable[bytes], deadline: float
    ) -> None:
        """Send a streamed body chunked, as fast as the server takes it; a body that
        stalls is bounded by the exchange's deadline too."""
        transport = conn.transport
        assert transport is not None
        async with asyncio.timeout_at(deadline):
            async for chunk in body:
                if response.status:
                    # Answered before the body was whole (a 413, a 401): RFC 9112 §9.5,
                    # stop sending it; the connection ends with this answer.
                    response._cut = True
                    return
                if chunk:
                    conn.check_open()
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await conn.drain()
            conn.check_open()
            transport.write(b"0\r\n\r\n")

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


class _Lease:
    """One request's hold on the pool, from :meth:`UpstreamPool.handle` to the answer's
    close: its connection slot, its deadline and the answer in flight."""

    __slots__ = ("_pool", "_slot", "_timer", "deadline", "loop", "response")

    def __init__(
        self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> None:
        self._pool = pool
        self.loop = loop
        self.deadline = deadline
        self.response: UpstreamResponse | None = None
        """The answer in flight: awaited for its head, then read by the caller."""
        self._slot = False
        self._timer: asyncio.TimerHandle | None = loop.call_at(deadline, self._time_out)

    async def take_slot(self) -> None:
        """Wait for a free connection slot (the deadline counts)."""
        slots = self._pool._slots
        if slots.locked():
            async with asyncio.timeout_at(self.deadline):
                await slots.acquire()
        else:
            await slots.acquire()
        self._slot = True

    def _time_out(self) -> None:
        """Past the deadline with an answer in flight: it fails with ``TimeoutError`` and
        its connection is aborted. (A wait for a slot or a connection has its own.)"""
        self._timer = None
        response = self.response
        if response is not None:
            response.fail(TimeoutError())
            response._conn.abort()

    def end(self) -> None:
        """Let go of the slot, the timer and the answer's connection (idempotent)."""
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        response, self.response = self.response, None
        if response is not None:
            self._pool._release(response)
        if self._slot:
            self._slot = False
            self._pool._slots.release()
