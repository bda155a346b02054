"""Holding bodies while their audit commits, within a bounded memory budget.

No byte of an answer reaches the client before its audit is durable, so every answer
waits. What waits is held as nginx's proxy buffering holds it: a small answer in memory
while the budget shared by all requests (``audit.buffer_memory_bytes``) has room, anything
larger than :data:`SPILL_AT`, or arriving when the budget is spent, in an anonymous
temporary file. Memory therefore stays bounded however many large answers are in flight.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import BinaryIO

from proxy.http.transport import UpstreamAnswer

SPILL_AT = 64 * 1024
"""The largest body held in memory; a larger one waits in its temporary file."""

CHUNK = 64 * 1024
"""Bytes read or written at a time."""


class MemoryBudget:
    """Bytes of held bodies in memory, across all requests of one proxy (event loop only)."""

    __slots__ = ("limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        """The most held in memory at once (for ``/metrics`` and the tests)."""

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        if self.used > self.peak:
            self.peak = self.used
        return True

    def give(self, n: int) -> None:
        self.used -= n


class HeldBody:
    """A response body waiting for its audit: in memory while it is at most
    :data:`SPILL_AT` bytes and the budget has room, else wholly in a temporary file
    (created on the first byte that does not fit). :meth:`close` gives the memory back."""

    __slots__ = ("_budget", "_head", "_in_memory", "file", "size")

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self._head: list[bytes] = []
        self._in_memory = 0
        self.file: BinaryIO | None = None
        self.size = 0

    def add(self, chunk: bytes) -> None:
        if (
            self.file is None
            and self.size + len(chunk) <= SPILL_AT
            and self._budget.take(len(chunk))
        ):
            self._head.append(chunk)
            self._in_memory += len(chunk)
        else:
            if self.file is None:
                self.file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
                self.file.writelines(self._head)
                self._release_memory()
            self.file.write(chunk)
        self.size += len(chunk)

    def value(self) -> bytes:
        """The whole body (read back from the file if it spilled)."""
        if self.file is None:
            return b"".join(self._head)
        self.file.seek(0)
        return self.file.read()

    def reader(self) -> BinaryIO:
        """The body as a file positioned at its start (read by one reader at a time)."""
        if self.file is None:
            return io.BytesIO(b"".join(self._head))
        self.file.seek(0)
        return self.file

    def head(self, n: int) -> bytes:
        """The body's first ``n`` bytes."""
        return self.reader().read(n)

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces of at most :data:`CHUNK` bytes, for writing."""
        if self.file is None:
            yield from self._head
            return
        self.file.seek(0)
        while block := self.file.read(CHUNK):
            yield block

    def _release_memory(self) -> None:
        self._budget.give(self._in_memory)
        self._in_memory = 0
        self._head = []

    def close(self) -> None:
        self._release_memory()
        if self.file is not None:
            self.file.close()


async def hold_body(
    upstream: UpstreamAnswer, limit: int, budget: MemoryBudget
) -> tuple[HeldBody, bool]:
    """Hold ``upstream``'s body for the audit unless it is larger than ``limit``; then
    return what was held so far, and ``False`` (the rest streams on)."""
    length = upstream.content_length
    held = HeldBody(budget)
    if length is not None and length > limit:
        return held, False
    if length is not None and length <= SPILL_AT:
        held.add(await upstream.body.read())
        return held, True
    while chunk := await upstream.body.read_chunk():
        held.add(chunk)
        if held.size > limit:
            return held, False
    return held, True


async def read_up_to_limit(upstream: UpstreamAnswer, limit: int) -> tuple[bytes, bool]:
    """Read the body unless it is larger than ``limit``; then return what was read."""
    length = upstream.content_length
    if length is not None:
        if length > limit:
            return b"", False
        return await upstream.body.read(), True
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await upstream.body.read_chunk()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), False


class Prepended:
    """``head``, then the chunks of ``rest``: a request body whose first part was read
    before it turned out too large to hold."""

    __slots__ = ("_head", "_rest")

    def __init__(self, head: bytes, rest: AsyncIterable[bytes]) -> None:
        self._head: bytes | None = head
        self._rest: AsyncIterator[bytes] = aiter(rest)

    def __aiter__(self) -> Prepended:
        return self

    async def __anext__(self) -> bytes:
        head = self._head
        if head is not None:
            self._head = None
            return head
        return await anext(self._rest)
