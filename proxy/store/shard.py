"""One store file as the implementations of the store's faces share it.

A :class:`Shard` holds the commit engine (appends, intents and captures, made durable by
the writer process) and a second connection for everything else: reads, and the
bookkeeping of delivery, which runs on a thread of its own so that it never blocks the
event loop; WAL lets it read while the writer commits. Each face's implementation is a
:class:`ShardPart` over one shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from proxy.store.codec import BodyCodec, CodecError
from proxy.store.database import is_full
from proxy.store.engine import CommitEngine
from proxy.store.faces import StoreError, StoreFull
from proxy.store.fans import fan_of, rows_for
from proxy.store.records import EventStatus, QueuedEvent, member_id
from proxy.store.tables import StoredRow

T = TypeVar("T")


class Shard:
    """The engine and the reading connection of one store file."""

    def __init__(
        self, engine: CommitEngine, reader_conn: sqlite3.Connection, codec: BodyCodec
    ) -> None:
        self.engine = engine
        """Commits appends, intents and captures (tests and the benchmark read its
        counters)."""
        self.conn = reader_conn
        """Only ever used on :attr:`executor`'s thread (:meth:`run`)."""
        self.codec = codec
        """Decodes on the reader thread and the event loop (the writer has its own)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-store-read")
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Finish pending appends, stop the writer (it checkpoints the WAL) and close."""
        if self.engine.closed:
            return
        await self.engine.close()
        await self._loop.run_in_executor(self._executor, self.conn.close)
        self._executor.shutdown(wait=True)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the connection's thread; an SQLite error as :class:`StoreError`
        (:class:`StoreFull` when the disk is full)."""
        try:
            return await self._loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            if is_full(exc):
                raise StoreFull(f"audit store disk is full: {exc}") from exc
            raise StoreError(f"audit store failed: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction on the connection (inside :meth:`run`)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    async def write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """``sql`` once for each of ``rows``, in one transaction."""
        if not rows:
            return

        def write() -> None:
            with self.transaction():
                self.conn.executemany(sql, rows)

        await self.run(write)

    async def update_events(self, sql: str, seqs: Sequence[int], *values: Any) -> None:
        """Run ``sql`` (ending in ``seq = ?``) with ``values`` for each event of ``seqs``,
        on the rows that hold them (fan-out rows only partly named are split first)."""
        if not seqs:
            return

        def write() -> None:
            with self.transaction():
                rows = rows_for(self.conn, self.codec, seqs)
                self.conn.executemany(sql, [(*values, s) for s in rows])

        await self.run(write)

    def events(self, row: StoredRow, *, damaged_ok: bool = False) -> list[QueuedEvent]:
        """The events of a row (several for a fan-out's). A body that cannot be decoded is
        a StoreError, except where ``damaged_ok`` (the dead-letter list, where such events
        are kept): there each record carries only its event's id, and ``last_error`` says
        why."""
        fan = row.fan
        events: list[tuple[str, dict[str, Any]]]
        try:
            if fan is None:
                events = [(row.event_id, self.codec.decode(row.body))]
            else:
                fanned = fan_of(row.event_id, row.patients, self.codec.decompress(row.body))
                events = [
                    (member, orjson.loads(json)) for member, json in map(fanned.event, range(fan))
                ]
        except (CodecError, ValueError) as exc:
            if not damaged_ok:
                raise StoreError(f"audit event {row.event_id}: {exc}") from exc
            ids = (
                [row.event_id] if fan is None else [member_id(row.event_id, n) for n in range(fan)]
            )
            events = [(i, {"resourceType": "AuditEvent", "id": i}) for i in ids]
        status = EventStatus(row.status)
        next_at = row.next_attempt_at
        next_attempt_at = datetime.fromtimestamp(next_at, UTC) if next_at is not None else None
        return [
            QueuedEvent(
                seq=seq,
                event_id=member,
                event=event,
                status=status,
                attempts=row.attempts,
                next_attempt_at=next_attempt_at,
                last_error=row.last_error,
                recorded=row.recorded,
                recorded_ts=row.recorded_ts,
                leaf=None if row.leaf is None else row.leaf + n,
            )
            for n, (seq, (member, event)) in enumerate(zip(row.seqs, events, strict=True))
        ]


class ShardPart:
    """Base of the face implementations: each works on one :class:`Shard`."""

    def __init__(self, shard: Shard) -> None:
        self._shard = shard
