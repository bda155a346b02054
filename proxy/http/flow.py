"""Flow control of one connection, both ways, shared by the listener's client connections
and the upstream client's connections (as uvicorn's protocols share one ``FlowControl``).

- :class:`FlowControl`: the connection's reading is paused while any hold on it stands
  (a body held past its high-water mark, a pipelined request waiting its turn) and
  resumed when the last is let go; a writer waits in :meth:`FlowControl.drain` while the
  transport's write buffer is past its own high-water mark.
- :class:`IncomingBody`: a message body as it arrives, for one reader. What arrived and
  was not read yet is held; past :data:`HIGH_WATER` bytes of it the connection stops
  reading until the reader takes them, so memory stays bounded however large it is.
"""

from __future__ import annotations

import asyncio
from collections import deque

HIGH_WATER = 64 * 1024
"""Bytes of a body received and not yet read at which its connection stops reading."""

BODY_HOLD = 1
"""A hold on reading: a body's unread bytes are past :data:`HIGH_WATER`."""
PIPELINE_HOLD = 2
"""A hold on reading: a request waits for the answers before it (the listener)."""
STOP_HOLD = 4
"""A hold on reading that is never let go: nothing more is to be read."""


class BodyBrokenOff(Exception):
    """A body did not arrive whole: its sender left, or its framing broke."""


class BodyTimedOut(BodyBrokenOff):
    """A body stopped arriving: no byte of it for its idle timeout while its reader
    waited for one."""


class FlowControl:
    """The flow control of one connection (see the module). Its owner passes on the
    protocol's ``pause_writing``, ``resume_writing`` and ``connection_lost``."""

    __slots__ = ("_drain", "_holds", "_lost", "_transport", "_write_paused", "loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self.loop = loop
        self._holds = 0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._lost = False

    def hold_reading(self, hold: int) -> None:
        """Take ``hold`` (one of the ``*_HOLD`` bits): reading pauses with the first."""
        if not self._holds and not self._lost:
            self._transport.pause_reading()
        self._holds |= hold

    def release_reading(self, hold: int) -> None:
        """Let go of ``hold``: reading resumes when no other stands."""
        if self._holds & hold:
            self._holds &= ~hold
            if not self._holds and not self._lost:
                self._transport.resume_reading()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is full. Raises what
        :meth:`connection_lost` was given once the connection is gone."""
        if self._write_paused and not self._lost:
            if self._drain is None:
                self._drain = self.loop.create_future()
            await self._drain

    def connection_lost(self, error: BaseException) -> None:
        """The connection is gone: a writer waiting in :meth:`drain` gets ``error``."""
        self._lost = True
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(error)


class IncomingBody:
    """A message body as it arrives on a connection, for one reader (see the module):
    :meth:`read_chunk` (``b""`` at its end), :meth:`read` or ``async for``. With
    ``idle_timeout_s``, a read that waits that long without a byte fails with
    :class:`BodyTimedOut`."""

    __slots__ = ("_chunks", "_eof", "_error", "_flow", "_idle_timeout_s", "_size", "_waiter")

    def __init__(self, flow: FlowControl, *, idle_timeout_s: float | None = None) -> None:
        self._flow = flow
        self._idle_timeout_s = idle_timeout_s
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- what the connection tells it ------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > HIGH_WATER:
            self._flow.hold_reading(BODY_HOLD)
        self._wake()

    def feed_eof(self) -> None:
        """All of it arrived."""
        self._eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """It cannot arrive whole: once what arrived is read, reads raise ``error`` (the
        first failure given; none once all of it arrived)."""
        if self._error is None and not self._eof:
            self._error = error
            self._wake()

    @property
    def complete(self) -> bool:
        """All of it arrived (it may not be read yet)."""
        return self._eof

    @property
    def at_eof(self) -> bool:
        """All of it arrived and was read."""
        return self._eof and not self._chunks

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- what the reader takes -------------------------------------------------------------

    async def read_chunk(self) -> bytes:
        """What arrived since the last read (waiting for some), or ``b""`` at the end.
        Raises what :meth:`fail` was given once what arrived before it is read."""
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._arrival()
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._size > HIGH_WATER:
            self._flow.release_reading(BODY_HOLD)
        self._size = 0
        return data

    async def read(self) -> bytes:
        """The rest of the body, whole."""
        data = await self.read_chunk()
        if not data or self.at_eof:
            return data
        parts = [data]
        while data := await self.read_chunk():
            parts.append(data)
        return b"".join(parts)

    def __aiter__(self) -> IncomingBody:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read_chunk()
        if not data:
            raise StopAsyncIteration
        return data

    async def _arrival(self) -> None:
        waiter = self._waiter = self._flow.loop.create_future()
        timeout = self._idle_timeout_s
        if timeout is None:
            await waiter
            return
        timer = self._flow.loop.call_later(timeout, self._idle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    def _idle(self, waiter: asyncio.Future[None]) -> None:
        if waiter is self._waiter and not waiter.done():
            self.fail(BodyTimedOut(f"no byte of the request body for {self._idle_timeout_s:g} s"))
