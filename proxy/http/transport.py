"""The seam between forwarding and the client of the FHIR server: one method,
:meth:`Transport.handle`, as httpx's ``handle_async_request``. The pool of connections
(:class:`proxy.http.upstream.UpstreamPool`) is the transport a running proxy uses;
:class:`MockTransport`, beside the contract, answers from a function in the same process,
so the forwarding and audit pipeline can be tested without a server.

Contract of :meth:`Transport.handle`:

- it returns once the answer's status and headers have arrived; its body then arrives
  through :attr:`UpstreamAnswer.body`;
- the caller must call :meth:`UpstreamAnswer.close` once done with the answer, read to its
  end or not (in a ``finally``): that ends the exchange (a connection goes back to its
  pool only when the answer was read to its end);
- ``TimeoutError``: the exchange took longer than the transport's timeout, which counts
  from the call and bounds the body's reading too (a read past it raises it);
- :class:`UpstreamError`: the server could not be reached, or broke off or garbled its
  answer (a read of the body may raise it too);
- a request body that is a stream and raises is passed on as it was raised (the
  forwarding handler's :class:`~proxy.http.flow.BodyBrokenOff`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy


class UpstreamError(Exception):
    """The upstream could not be reached, or broke off or garbled its answer."""


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream could be made."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before its answer was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1."""


Body = bytes | AsyncIterable[bytes] | None
"""A request body: whole, streamed (sent chunked), or none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamRequest:
    """One request to the FHIR server."""

    method: str
    target: str
    """The path and query as sent (``/fhir/Patient?name=x``)."""
    headers: Iterable[tuple[str, str]]
    """Sent as given; never ``Host``, ``Content-Length`` nor ``Transfer-Encoding``, which
    the transport writes. Iterated once."""
    body: Body = None


class BodyReader(Protocol):
    """An answer's body as it arrives (:class:`proxy.http.flow.IncomingBody`)."""

    async def read_chunk(self) -> bytes:
        """What arrived since the last read (waiting for some); ``b""`` at the end."""
        ...

    async def read(self) -> bytes:
        """The rest of the body, whole."""
        ...


class UpstreamAnswer(Protocol):
    """An answer of the FHIR server, its head arrived."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None:
        """``Content-Length`` when the server sent a valid one."""
        ...

    @property
    def body(self) -> BodyReader: ...

    def close(self) -> None:
        """End the exchange (see the module); once is enough, more is harmless."""
        ...


class Transport(Protocol):
    """What forwarding sends its requests through (see the module for the contract)."""

    async def handle(self, request: UpstreamRequest) -> UpstreamAnswer: ...


# --- the test double ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MockAnswer:
    """What a :class:`MockTransport`'s function answers."""

    status: int = 200
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    body: bytes = b""
    chunks: Sequence[bytes] | None = None
    """The body in these parts, as they would arrive (instead of ``body``)."""
    breaks_after: int | None = None
    """Raise :class:`UpstreamDisconnected` after this many parts of the body."""
    content_length: bool = True
    """Say the body's length in the head (else it is as if sent chunked)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SentRequest:
    """A request as a :class:`MockTransport` received it, its body read whole."""

    method: str
    target: str
    headers: CIMultiDictProxy[str]
    body: bytes | None


MockHandler = Callable[[SentRequest], Awaitable[MockAnswer]]


class _MockBody:
    __slots__ = ("_answer", "_at")

    def __init__(self, answer: MockAnswer) -> None:
        self._answer = answer
        self._at = 0

    async def read_chunk(self) -> bytes:
        answer = self._answer
        parts = answer.chunks if answer.chunks is not None else (answer.body,)
        if answer.breaks_after is not None and self._at >= answer.breaks_after:
            raise UpstreamDisconnected("the upstream closed the connection (mock)")
        while self._at < len(parts):
            part = parts[self._at]
            self._at += 1
            if part:
                await asyncio.sleep(0)  # as if it arrived
                return part
        return b""

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)


class _MockResponse:
    __slots__ = ("body", "closed", "content_length", "headers", "status")

    def __init__(self, answer: MockAnswer) -> None:
        self.status = answer.status
        headers = answer.headers.items() if isinstance(answer.headers, Mapping) else answer.headers
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        whole = b"".join(answer.chunks) if answer.chunks is not None else answer.body
        self.content_length = len(whole) if answer.content_length else None
        self.body = _MockBody(answer)
        self.closed = False

    def close(self) -> None:
        self.closed = True


class MockTransport:
    """A transport that answers every request with ``handler``'s :class:`MockAnswer`, in
    this process (as httpx's ``MockTransport``). It reads a streamed request body whole
    first; ``handler`` may raise ``TimeoutError`` or an :class:`UpstreamError` to fail
    the exchange. :attr:`sent` holds every request, :attr:`open` the answers not closed."""

    def __init__(self, handler: MockHandler) -> None:
        self._handler = handler
        self.sent: list[SentRequest] = []
        self._answers: list[_MockResponse] = []

    async def handle(self, request: UpstreamRequest) -> UpstreamAnswer:
        body = request.body
        if body is not None and not isinstance(body, bytes):
            body = b"".join([chunk async for chunk in body])
        sent = SentRequest(
            method=request.method,
            target=request.target,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
        )
        self.sent.append(sent)
        response = _MockResponse(await self._handler(sent))
        self._answers.append(response)
        return response

    @property
    def open(self) -> int:
        """Answers handed out and not closed (a leak, once every request is answered)."""
        return sum(not answer.closed for answer in self._answers)
