"""The admin listener's connections: aiohttp's HTTP server with two guards it lacks.

- A request head must arrive whole within ``admin.header_timeout_s`` of its first byte;
  past it the client is answered 408 and the connection closes. (aiohttp bounds only
  idle connections, by its keep-alive time.)
- A request aiohttp's parser refuses (a line past its limits, a forbidden byte, a body
  whose framing or encoding is broken, or a ``Content-Encoding`` it cannot decode) is
  answered 400 with an OperationOutcome naming only the kind of error, and logged at
  WARNING the same way: aiohttp's own answer and ERROR log quote the offending bytes,
  which may be a bearer token.

:func:`guard` puts them in place for every server aiohttp builds for the admin app.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from proxy.fhir.operation_outcome import FHIR_JSON, operation_outcome, outcome_response

log = logging.getLogger(__name__)

_HEAD_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: " + FHIR_JSON.encode() + b"\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
)
_HEAD_TIMED_OUT_BODY = orjson.dumps(
    operation_outcome("timeout", "The request head did not arrive in time.")
)


class AdminConnection(RequestHandler):
    """One client connection of the admin listener (see the module)."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        """The body of the last request whose head arrived: while it is still arriving,
        what comes is body, not the next head."""

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self._body is None or self._body.is_eof()):
            self._head_timer = self._loop.call_later(self._header_timeout_s, self._head_late)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            # A head arrived whole. (Bytes of another head after it in the same read are
            # bounded by aiohttp's keep-alive time, not by this timer.)
            self._cancel_head_timer()
            if self._messages:
                self._body = self._messages[-1][1]

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

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
        if self._request_in_progress or self._messages:
            self.close()  # after the answer in progress; the late head is never read
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


class AdminServer(web.Server):
    """aiohttp's server, making :class:`AdminConnection` connections."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s

    def __call__(self) -> RequestHandler:
        return AdminConnection(
            self, loop=self._loop, header_timeout_s=self._header_timeout_s, **self._kwargs
        )


def guard(app: web.Application, *, header_timeout_s: float) -> None:
    """Make every server aiohttp builds for ``app`` an :class:`AdminServer`. aiohttp has
    no public seam for its connection class, so this wraps ``Application._make_handler``
    (aiohttp is pinned; the suite runs through it), as :func:`proxy.http.listener.serve_on`
    replaces it for the proxy listener."""
    made = app._make_handler

    def make_handler(**kwargs: Any) -> web.Server:
        server = made(**kwargs)
        return AdminServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            header_timeout_s=header_timeout_s,
            **server._kwargs,
        )

    app._make_handler = make_handler  # type: ignore[method-assign]
