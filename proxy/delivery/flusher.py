"""The flusher: drains the queue to the repository in order, at least once.

Every ``flush_interval_ms`` (sooner while a full batch is waiting) it claims up to
``batch_count`` pending events and sends them. A 2xx acknowledges them. A 5xx, timeout or
connection error holds them back with exponential backoff from ``flush_interval_ms`` up to
``max_flush_interval_ms`` (invariant 6). A 4xx rejection is bisected: halves are resent,
left before right, until the events the repository refuses are isolated and moved to the
dead-letter state with its answer; the rest flow on in order.

A held event's ``retry_at`` in the store is never further than ``max_flush_interval_ms``
from the failure that set it. The first flush after start and the shutdown drain ignore
the stored backoff (the backoff belongs to the process that failed, not to the next one),
so nothing an earlier process stored can keep the queue waiting.

With the shard's log (:class:`~proxy.log.shipping.LogShipping`), each event leaves with its
place in the log, and after a round that delivered, the checkpoints whose events have all
left follow as resources of their own: the sink sends what it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy import telemetry
from proxy.delivery.sink import (
    DeliveryError,
    PartialDelivery,
    RepositoryBase,
    RepositoryRejected,
    RepositoryUnavailable,
    Sink,
)
from proxy.log.shipping import LogShipping
from proxy.store.faces import Claims, StoreError
from proxy.store.records import QueuedEvent

log = logging.getLogger(__name__)

_ANY_RETRY_AT = datetime.max.replace(tzinfo=UTC)
"""A claim cutoff no stored ``retry_at`` passes: claims what is pending, backoff ignored."""


def _as_stored(item: QueuedEvent) -> dict[str, Any]:
    return item.event


class Flusher:
    """Ships one queue's events to one sink."""

    def __init__(
        self,
        queue: Claims,
        sink: Sink,
        settings: RepositoryBase,
        *,
        rng: random.Random | None = None,
        log_shipping: LogShipping | None = None,
    ) -> None:
        self._queue = queue
        self._log = log_shipping
        self._sink = sink
        self._batch = settings.batch_count
        self._interval = settings.flush_interval_ms / 1000
        self._max_interval = max(settings.max_flush_interval_ms / 1000, self._interval)
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self.failures = 0
        """Consecutive failed attempts (resets on success)."""
        self._dead_in_round = 0

    def wake(self) -> None:
        """Flush now rather than at the next interval."""
        self._wake.set()

    def backoff_s(self) -> float:
        """The wait after ``failures`` consecutive failures: exponential, capped, with
        "equal jitter" (half fixed, half random) so retries spread but never collapse to 0."""
        growth = 2.0 ** max(self.failures - 1, 0)
        ceiling = min(self._max_interval, self._interval * growth)
        jitter: float = self._rng.uniform(0, ceiling / 2)
        return ceiling / 2 + jitter

    async def run(self) -> None:
        """Flush until cancelled. Never dies of an error: it logs and backs off. The first
        flush ignores the backoff stored by an earlier process (a restart retries at once)."""
        first = True
        while True:
            delay = self._interval
            try:
                delivered = await self.flush_once(ignore_backoff=first)
                first = False
                if self.failures:
                    delay = self.backoff_s()
                elif delivered >= self._batch:
                    delay = 0  # a full batch went out: more may be waiting
            except StoreError as exc:
                log.warning("flusher cannot read the store: %s", exc)
                self.failures += 1
                delay = self.backoff_s()
            except Exception:
                log.exception("flusher failed; backing off")
                self.failures += 1
                delay = self.backoff_s()
            self._wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            else:
                await asyncio.sleep(0)

    async def flush_once(self, now: datetime | None = None, *, ignore_backoff: bool = False) -> int:
        """Send one batch; returns how many events the repository acknowledged. With
        ``ignore_backoff`` the events held back by an earlier failure are sent too; a
        failure holds them back from ``now`` either way."""
        now = now or datetime.now(UTC)
        batch = await self._queue.claim(self._batch, _ANY_RETRY_AT if ignore_backoff else now)
        if not batch:
            await self._ship_checkpoints(now)
            return 0
        settled: set[int] = set()  # acknowledged or dead-lettered in this round
        self._dead_in_round = 0
        try:
            delivered = await self._send_or_isolate(batch, settled)
        except RepositoryUnavailable as exc:
            self.failures += 1
            remaining = [q.seq for q in batch if q.seq not in settled]
            retry_at = now + timedelta(seconds=self.backoff_s())
            await self._queue.nack(remaining, str(exc), retry_at)
            telemetry.DELIVERIES.labels(result="retry").inc()
            log.warning(
                "repository unavailable (%s); %d event(s) retry after %s",
                exc,
                len(remaining),
                retry_at.isoformat(timespec="seconds"),
            )
            return len(settled) - self._dead_in_round
        self.failures = 0
        await self._ship_checkpoints(now)
        return delivered

    async def _ship_checkpoints(self, now: datetime) -> None:
        """Send the checkpoints due, in one batch; a refusal is kept with the checkpoint
        (not retried), an outage leaves them for the next round."""
        if self._log is None:
            return
        due = await self._log.documents(now)
        if not due:
            return
        sizes = [size for size, _ in due]
        try:
            await self._sink.send([document for _, document in due])
        except RepositoryRejected as exc:
            log.error("repository refused checkpoints %s: %s", sizes, str(exc)[:300])
            await self._log.tlog.checkpoints_shipped(sizes, now, str(exc)[:4096])
        except DeliveryError as exc:
            log.warning("checkpoints %s not shipped, retried later: %s", sizes, exc)
        else:
            await self._log.tlog.checkpoints_shipped(sizes, now)

    async def _send_or_isolate(self, batch: Sequence[QueuedEvent], settled: set[int]) -> int:
        try:
            shipped = self._log.resource if self._log is not None else _as_stored
            await self._sink.send([shipped(q) for q in batch])
        except PartialDelivery as partial:
            done = batch[: partial.delivered]
            await self._ack(done, settled)
            if isinstance(partial.cause, RepositoryRejected):
                rest = batch[partial.delivered :]
                return len(done) + await self._isolate(rest, partial.cause, settled)
            raise partial.cause from None
        except RepositoryRejected as rejection:
            return await self._isolate(batch, rejection, settled)
        await self._ack(batch, settled)
        return len(batch)

    async def _isolate(
        self, batch: Sequence[QueuedEvent], rejection: RepositoryRejected, settled: set[int]
    ) -> int:
        telemetry.DELIVERIES.labels(result="rejected").inc()
        if len(batch) == 1:
            (event,) = batch
            await self._queue.dead_letter([event.seq], str(rejection))
            settled.add(event.seq)
            self._dead_in_round += 1
            telemetry.EVENTS_DEAD.inc()
            log.error("repository rejected AuditEvent %s: %s", event.event_id, str(rejection)[:300])
            return 0
        middle = len(batch) // 2
        left = await self._send_or_isolate(batch[:middle], settled)
        return left + await self._send_or_isolate(batch[middle:], settled)

    async def _ack(self, batch: Sequence[QueuedEvent], settled: set[int]) -> None:
        if not batch:
            return
        acked_at = datetime.now(UTC)
        await self._queue.ack([q.seq for q in batch], acked_at)
        settled.update(q.seq for q in batch)
        now = acked_at.timestamp()
        for q in batch:
            if q.recorded_ts > 0:  # 0.0: no parseable recorded time
                telemetry.DELIVERY_LAG.observe(max(0.0, now - q.recorded_ts))
        telemetry.DELIVERIES.labels(result="ok").inc()
        telemetry.EVENTS_DELIVERED.inc(len(batch))

    async def drain(self, timeout_s: float) -> int:
        """For shutdown: send what is pending, backoff ignored, until the queue is empty,
        the repository fails, or ``timeout_s`` passes. Returns events delivered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delivered = 0
        while loop.time() < deadline:
            failures = self.failures
            try:
                sent = await asyncio.wait_for(
                    self.flush_once(ignore_backoff=True), max(deadline - loop.time(), 0.01)
                )
            except TimeoutError:
                break
            delivered += sent
            if sent == 0 or self.failures > failures:
                break
        return delivered
