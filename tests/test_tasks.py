"""``proxy.tasks.running``: a part's background loop runs while its block runs, is
cancelled and awaited at the block's end, and stops cleanly also when the event loop
closes the cleanup context around it (a proxy that fails to start)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.tasks import running


async def _forever(ticks: list[int]) -> None:
    while True:
        ticks.append(1)
        await asyncio.sleep(0.001)


async def test_the_loop_runs_in_the_block_and_is_stopped_at_its_end() -> None:
    ticks: list[int] = []
    async with running(_forever(ticks), "ticker") as task:
        await asyncio.sleep(0.02)
        assert task.get_name() == "ticker" and not task.done()
    assert task.cancelled()
    seen = len(ticks)
    await asyncio.sleep(0.01)
    assert seen > 1 and len(ticks) == seen, "it ran, then stopped"


async def test_an_error_the_loop_ended_with_is_raised_at_the_block_s_end() -> None:
    async def broken() -> None:
        raise ValueError("the loop broke")

    with pytest.raises(ValueError, match="the loop broke"):
        async with running(broken(), "broken"):
            await asyncio.sleep(0.01)


def test_a_cleanup_context_left_at_its_yield_closes_without_an_error() -> None:
    """As aiohttp leaves the contexts already started when a later one fails at start-up:
    the loop's ``shutdown_asyncgens`` closes them (``GeneratorExit`` at the ``yield``)."""
    ticks: list[int] = []
    reported: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[object]] = []

    async def cleanup_ctx() -> AsyncIterator[None]:
        async with running(_forever(ticks), "ticker") as task:
            tasks.append(task)
            yield

    started: list[AsyncIterator[None]] = []  # kept, as aiohttp keeps it, until the loop ends

    async def start() -> None:
        started.append(cleanup_ctx())
        await started[0].__anext__()
        await asyncio.sleep(0.01)
        raise RuntimeError("a later part failed to start")

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        with pytest.raises(RuntimeError, match="failed to start"):
            loop.run_until_complete(start())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    assert reported == []
    assert tasks[0].cancelled()
