"""A coroutine run in the background while a block runs: the long-lived loops of the
proxy's parts (flusher, maintenance, validation, metrics), each started with the part
that owns it and stopped with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, object], name: str) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` as a task named ``name`` while the block runs; when the block ends,
    cancel it and wait until it has stopped (an error it ended with is raised then)."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
