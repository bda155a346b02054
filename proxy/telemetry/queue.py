"""The store's figures as metrics: its group commits, and the queue-depth gauges, read
through callables and protocols: telemetry imports nothing of the store."""

from __future__ import annotations

from typing import Protocol

from proxy.telemetry.metrics import (
    QUEUE_DEPTH,
    QUEUE_OLDEST_AGE,
    STORE_COMMIT_SECONDS,
    STORE_COMMIT_SIZE,
)


def observe_store_commit(seconds: float, records: int) -> None:
    """Record one group commit of the store: the writer's time on it and the records it
    wrote (the store's commit engine calls this, as ``app.py`` wires it)."""
    STORE_COMMIT_SECONDS.observe(seconds)
    STORE_COMMIT_SIZE.observe(records)


class QueueDepth(Protocol):
    """What the queue gauges read: the counts of the store's ``stats()``."""

    @property
    def pending(self) -> int: ...
    @property
    def delivered(self) -> int: ...
    @property
    def dead(self) -> int: ...
    @property
    def oldest_pending_recorded(self) -> float | None:
        """``recorded`` (POSIX time) of the oldest undelivered event, or None."""


def set_queue_gauges(stats: QueueDepth, now: float) -> None:
    """Set the queue-depth and oldest-pending-age gauges from one ``stats()`` read;
    ``now`` is POSIX time."""
    for status in ("pending", "delivered", "dead"):
        QUEUE_DEPTH.labels(status=status).set(getattr(stats, status))
    oldest = stats.oldest_pending_recorded
    QUEUE_OLDEST_AGE.set(0.0 if oldest is None else max(0.0, now - oldest))
