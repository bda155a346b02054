"""The delivery face of one store file (:class:`~proxy.store.faces.DeliveryQueue`): claim,
acknowledge, retry, dead letters and pruning, as bookkeeping on the shard's second
connection. The events of a fan-out row share their state until an update names only
some of them (:func:`~proxy.store.fans.rows_for`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from proxy.store.faces import DeliveryQueue, StoreError
from proxy.store.fans import rows_for
from proxy.store.log import record_pruned
from proxy.store.records import QueuedEvent
from proxy.store.shard import ShardPart
from proxy.store.tables import STORED, StoredRow, stored_rows

log = logging.getLogger(__name__)


class ShardDelivery(ShardPart, DeliveryQueue):
    """Delivery bookkeeping of one store file."""

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        shard = self._shard

        def read() -> list[StoredRow]:
            return stored_rows(
                shard.conn.execute(
                    f"SELECT {STORED} FROM events WHERE status = 'pending' ORDER BY seq LIMIT ?",
                    (limit,),
                )
            )

        cutoff = now.timestamp()
        out: list[QueuedEvent] = []
        for row in await shard.run(read):
            next_at = row.next_attempt_at
            if (next_at is not None and next_at > cutoff) or len(out) >= limit:
                break
            try:
                out.extend(shard.events(row))
            except StoreError as exc:  # a damaged body must not stall delivery behind it
                log.error(
                    "audit event %s cannot be read, moved to dead-letter: %s", row.event_id, exc
                )
                await self.dead_letter(list(row.seqs), str(exc))
        return out[:limit]

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        await self._shard.update_events(
            "UPDATE events SET status = 'delivered', delivered_at = ?, last_error = NULL"
            " WHERE seq = ?",
            seqs,
            now.timestamp(),
        )

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        await self._shard.update_events(
            "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
            " WHERE seq = ? AND status = 'pending'",
            seqs,
            retry_at.timestamp(),
            error[:4096],
        )

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        await self._shard.update_events(
            "UPDATE events SET status = 'dead', attempts = attempts + 1, last_error = ?"
            " WHERE seq = ?",
            seqs,
            error[:4096],
        )

    async def requeue_dead(self, seqs: Sequence[int] | None = None) -> int:
        shard = self._shard
        conn = shard.conn

        def write() -> int:
            with shard.transaction():
                if seqs is None:
                    requeued: int = conn.execute(
                        "SELECT COALESCE(SUM(COALESCE(fan, 1)), 0) FROM events"
                        " WHERE status = 'dead'"
                    ).fetchone()[0]
                    conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead'"
                    )
                    return requeued
                requeued = 0
                for s in rows_for(conn, shard.codec, seqs):
                    for (events,) in conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead' AND seq = ? RETURNING COALESCE(fan, 1)",
                        (s,),
                    ):
                        requeued += events
                return requeued

        return await shard.run(write)

    async def prune(self, now: datetime, retention: timedelta) -> int:
        """:meth:`DeliveryQueue.prune`: SQLite reuses the freed pages, and the size check
        counts only pages in use, so a full store recovers."""
        cutoff = (now - retention).timestamp()
        shard = self._shard
        conn = shard.conn

        def write() -> int:
            with shard.transaction():
                deleted = conn.execute(
                    "DELETE FROM events WHERE status = 'delivered' AND delivered_at < ?"
                    " RETURNING leaf, COALESCE(fan, 1), leaf_hashes",
                    (cutoff,),
                ).fetchall()
                record_pruned(conn, [(leaf, n, h) for leaf, n, h in deleted if leaf is not None])
                # Captured bodies are kept as long as delivered events are, and for as
                # long as an event of their exchange is undelivered (those are few: the
                # status index finds them).
                conn.execute(
                    "DELETE FROM captures WHERE created_at < ? AND request_id NOT IN"
                    " (SELECT request_id FROM events WHERE status IN ('pending', 'dead')"
                    " AND request_id IS NOT NULL)",
                    (cutoff,),
                )
                return sum(n for _, n, _ in deleted)

        return await shard.run(write)

    async def oldest_pending_recorded(self) -> float | None:
        conn = self._shard.conn

        def read() -> float | None:
            row = conn.execute(
                "SELECT recorded_ts FROM events WHERE status = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
            return float(row[0]) if row else None

        return await self._shard.run(read)
