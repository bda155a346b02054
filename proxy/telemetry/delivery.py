"""Delivery timing: how long the repository takes to answer each batch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from proxy.telemetry.metrics import DELIVERY_SECONDS

if TYPE_CHECKING:
    from proxy.delivery.sink import Sink


class TimedSink:
    """A sink that records how long the repository takes to answer each batch."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        result = "error"
        try:
            await self._sink.send(events)
            result = "ok"
        finally:
            DELIVERY_SECONDS.labels(result=result).observe(time.perf_counter() - t0)

    async def close(self) -> None:
        await self._sink.close()
