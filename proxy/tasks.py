"""A coroutine run in the background while a block runs: the long-lived loops of the
proxy's parts (flusher, maintenance, validation, metrics), each started with the part
that owns it and stopped with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from types import TracebackType
from typing import Any


class running:
    """Run ``coro`` as a task named ``name`` while the block runs; when the block ends,
    cancel it and wait until it has stopped (an error it ended with is raised then).

    A class, not ``contextlib.asynccontextmanager``: the cleanup contexts that use it are
    async generators that the event loop closes (``GeneratorExit`` at their ``yield``) when
    the proxy fails to start, and a generator-based context manager cannot await its
    task's end while that is thrown through it."""

    __slots__ = ("_coro", "_name", "_task")

    def __init__(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        self._coro = coro
        self._name = name
        self._task: asyncio.Task[object] | None = None

    async def __aenter__(self) -> asyncio.Task[object]:
        self._task = asyncio.create_task(self._coro, name=self._name)
        return self._task

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
