"""The admin listener: the admin application on aiohttp's HTTP server, with two guards
aiohttp lacks.

- A request head must arrive whole within ``admin.header_timeout_s`` of its first byte;
  past it the client is answered 408 and the connection closes. (aiohttp bounds only
  idle connections, by its keep-alive time.)
- A request aiohttp's parser refuses (a line past its limits, a forbidden byte, a body
  whose framing or encoding is broken, or a ``Content-Encoding`` it cannot decode) is
  answered 400 with an OperationOutcome naming only the kind of error, and logged at
  WARNING the same way: aiohttp's own answer and ERROR log quote the offending bytes,
  which may be a bearer token.

:class:`AdminListener` serves the application through aiohttp's public parts: an
``AppRunner`` runs its life cycle and makes its ``web.Server``, and the listening socket's
connections are :class:`AdminConnection`, aiohttp's ``RequestHandler`` with the guards.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
import orjson
from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web import BaseRequest, RequestPayloadError

from proxy.fhir.operation_outcome import FHIR_JSON, operation_outcome, outcome_response

log = logging.getLogger(__name__)

_HEAD_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: " + FHIR_JSON.encode() + b"\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
)
_HEAD_TIMED_OUT_BODY = orjson.dumps(
    operation_outcome("timeout", "The request head did not arrive in time.")
)


class _Heads:
    """Where the request heads begin and end in what a connection receives: an httptools
    parser over the same bytes aiohttp parses, with the callbacks the guard needs."""

    __slots__ = ("_connection", "_parser", "broken")

    def __init__(self, connection: AdminConnection) -> None:
        self._connection = connection
        self._parser = httptools.HttpRequestParser(self)
        self.broken = False
        """It could not follow (a parser error or an upgrade): aiohttp answers it."""

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.broken = True

    def on_message_begin(self) -> None:
        self._connection.head_began()

    def on_headers_complete(self) -> None:
        self._connection.head_arrived()


class AdminConnection(web.RequestHandler):
    """One client connection of the admin listener (see the module)."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads = _Heads(self)
        self._arrived = 0
        """Request heads that arrived whole."""
        self._answered = 0
        """Answers sent (or failed) for them."""

    def data_received(self, data: bytes) -> None:
        self._heads.feed(data)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def head_began(self) -> None:
        """The first byte of a request head arrived."""
        if self._head_timer is None:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self._header_timeout_s, self._head_late)

    def head_arrived(self) -> None:
        """A request head arrived whole."""
        self._arrived += 1
        self._cancel_head_timer()

    def log_access(
        self, request: BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        # aiohttp calls this once each answer is sent (or its sending failed).
        self._answered += 1
        super().log_access(request, response, time)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.info(
            "a request head to the admin listener from %s did not arrive within %g s: 408,"
            " connection closed",
            (transport.get_extra_info("peername") or ("unknown",))[0],
            self._header_timeout_s,
        )
        if self._answered < self._arrived:
            self.close()  # after the answers in progress; the late head is never read
            return
        transport.write(_HEAD_TIMED_OUT % (len(_HEAD_TIMED_OUT_BODY), _HEAD_TIMED_OUT_BODY))
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun when the request turned out malformed")
        reason = type(exc).__name__
        log.warning(
            "malformed HTTP request to the admin listener from %s: %s", request.remote, reason
        )
        if isinstance(exc, ContentEncodingError):
            response = outcome_response(
                400,
                "structure",
                "the request body could not be decoded by its Content-Encoding"
                " (gzip and deflate are supported); not processed",
            )
        else:
            response = outcome_response(
                400, "invalid", f"malformed HTTP request ({reason}); not processed"
            )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp logs a body it could not read (when it drains what the handler left) at
        # ERROR with the parser's message, which may quote the request's bytes.
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError | RequestPayloadError):
            log.warning("a malformed request body to the admin listener: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kwargs)


class AdminListener:
    """The admin application served on one address, its connections
    :class:`AdminConnection`: :meth:`start` runs the application's start-up and listens,
    :meth:`stop` stops listening, lets the answers in flight finish and runs its
    cleanup."""

    def __init__(self, app: web.Application, *, header_timeout_s: float) -> None:
        self._runner = web.AppRunner(app, handle_signals=False)
        self._header_timeout_s = header_timeout_s
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        runner = self._runner
        await runner.setup()
        try:
            manager = runner.server
            assert manager is not None
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: AdminConnection(
                    manager, loop=loop, header_timeout_s=self._header_timeout_s, access_log=None
                ),
                host,
                port,
            )
        except BaseException:
            await runner.cleanup()
            raise

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` it listens on."""
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._runner.cleanup()
        if server is not None:
            await server.wait_closed()
