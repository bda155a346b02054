"""The durable write-ahead queue: SQLite in WAL mode with ``synchronous=FULL``.

Appends are group-committed: one writer coroutine drains every append waiting at that
moment into one transaction and one fsync, then releases all their callers. Durability
per event gets cheaper as load rises (DESIGN.md invariant 4).

The writer is a dedicated thread with its own ``sqlite3`` connection, fed by a thread-safe
inbox: it takes whatever appends are waiting the moment it is free, so the next batch
fills while the current one is in fsync, and each commit resolves its callers with one
callback into the event loop. Reads and delivery bookkeeping (claim, ack, search) run on a
second connection on a second thread; WAL lets them read while the writer commits.
aiosqlite, which DESIGN.md first named, hops to its thread per statement and only
completes a batch when the event loop gets round to it; measured at 64 concurrent writers
that halved throughput, so the queue owns its two threads instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue as thread_queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy import telemetry
from proxy.store.records import (
    EventQuery,
    EventStatus,
    Intent,
    QueuedEvent,
    QueueStats,
)
from proxy.store.schema import migrate

log = logging.getLogger(__name__)

T = TypeVar("T")

_EVENT_COLUMNS = "seq, event_id, body, status, attempts, next_attempt_at, last_error, recorded"
_INSERT_EVENT = (
    "INSERT INTO events (event_id, recorded, recorded_ts, action, outcome, subtypes, patients,"
    " user_id, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class StoreError(Exception):
    """The audit could not be made durable (the client gets 503)."""


class StoreFull(StoreError):
    """``max_bytes`` is reached or the disk is full (the client gets 507)."""


EventRow = tuple[str, str, float, str | None, str | None, str, str, str | None, bytes]


def _timestamp(value: str) -> float:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _joined(values: Sequence[str]) -> str:
    """``|a|b|``: searchable with ``LIKE '%|a|%'``."""
    return "|" + "".join(f"{v}|" for v in values) if values else "|"


def event_row(event: dict[str, Any]) -> EventRow:
    """The columns the queue indexes, read from an R4 or R5 AuditEvent."""
    recorded = str(event.get("recorded", ""))
    outcome = event.get("outcome")
    if isinstance(outcome, dict):  # R5: outcome.code.code
        outcome = outcome.get("code", {}).get("code")
    subtype_codings = event.get("subtype")
    if subtype_codings is None:  # R5: code.coding
        subtype_codings = event.get("code", {}).get("coding", [])
    subtypes = [str(c["code"]) for c in subtype_codings if isinstance(c, dict) and "code" in c]
    patients: list[str] = []
    r5_patient = event.get("patient")
    if isinstance(r5_patient, dict) and r5_patient.get("reference"):
        patients.append(str(r5_patient["reference"]))
    for entity in event.get("entity", []):
        role = entity.get("role", {})
        codes = [role.get("code")] + [c.get("code") for c in role.get("coding", [])]
        reference = entity.get("what", {}).get("reference")
        if "1" in codes and reference and reference not in patients:
            patients.append(str(reference))
    user: str | None = None
    for agent in event.get("agent", []):
        if agent.get("requestor"):
            who = agent.get("who", {})
            user = (
                who.get("identifier", {}).get("value") or who.get("reference") or who.get("display")
            )
            break
    return (
        str(event["id"]),
        recorded,
        _timestamp(recorded),
        event.get("action"),
        str(outcome) if outcome is not None else None,
        _joined(subtypes),
        _joined(patients),
        user,
        orjson.dumps(event),
    )


@dataclass(eq=False)
class _Append:
    """One caller's share of a group commit."""

    rows: list[EventRow]
    complete_intent: int | None
    intent: bytes | None
    future: asyncio.Future[int | None] = field(repr=False)


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in pages that hold data (free pages are reused before the file grows)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(page_size * (pages - free))


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


class AuditQueue:
    """The queue. Open it with :meth:`open`; one instance per store file."""

    def __init__(
        self,
        writer_conn: sqlite3.Connection,
        reader_conn: sqlite3.Connection,
        *,
        max_bytes: int,
        batch_max: int,
    ) -> None:
        self._wconn = writer_conn
        self._conn = reader_conn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-store-read")
        self._max_bytes = max_bytes
        self._batch_max = batch_max
        self._loop = asyncio.get_running_loop()
        self._inbox: thread_queue.SimpleQueue[_Append | None] = thread_queue.SimpleQueue()
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_loop, name="audit-store-writer", daemon=True
        )
        self._writer.start()
        self.commits = 0
        """Group commits done (tests and the benchmark read it)."""

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int, commit_batch_max: int = 512) -> AuditQueue:
        """Open (creating and migrating) the store at ``path`` and start the writer."""
        path = Path(path)
        try:
            writer = await asyncio.to_thread(cls._connect, path, True)
            reader = await asyncio.to_thread(cls._connect, path, False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the audit store at {path}: {exc}") from exc
        return cls(writer, reader, max_bytes=max_bytes, batch_max=commit_batch_max)

    @staticmethod
    def _connect(path: Path, migrate_schema: bool) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=67108864")
        if migrate_schema:
            migrate(conn)
        return conn

    async def close(self) -> None:
        """Finish pending appends, checkpoint the WAL and close."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        await asyncio.to_thread(self._writer.join)
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    # --- appends (group commit) -------------------------------------------------------

    async def append(
        self, events: Sequence[dict[str, Any]], *, complete_intent: int | None = None
    ) -> None:
        """Return once ``events`` (and the completion of ``complete_intent``) are committed
        with fsync. Raises :class:`StoreFull` or :class:`StoreError`."""
        try:
            rows = [event_row(e) for e in events]
        except (TypeError, KeyError, orjson.JSONEncodeError) as exc:
            raise StoreError(f"event cannot be stored: {exc}") from exc
        await self._submit(_Append(rows, complete_intent, None, self._loop.create_future()))

    async def record_intent(self, summary: dict[str, Any]) -> int:
        """Commit an intent (before forwarding a write); returns its id."""
        item = _Append([], None, orjson.dumps(summary), self._loop.create_future())
        intent_id = await self._submit(item)
        assert intent_id is not None
        return intent_id

    async def _submit(self, item: _Append) -> int | None:
        if self._closed:
            raise StoreError("the audit store is closed")
        self._inbox.put(item)
        return await item.future

    def _write_loop(self) -> None:
        """The writer thread: drain the inbox into one transaction, commit, release."""
        stopping = False
        while not stopping:
            first = self._inbox.get()
            if first is None:
                break
            batch = [first]
            size = len(first.rows) + 1
            while size < self._batch_max:
                try:
                    nxt = self._inbox.get_nowait()
                except thread_queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
                size += len(nxt.rows) + 1
            t0 = time.perf_counter()
            try:
                results = self._commit_batch(batch)
            except BaseException as exc:  # never leave callers hanging
                results = [StoreError(f"audit store write failed: {exc}")] * len(batch)
            telemetry.STORE_COMMIT_SECONDS.observe(time.perf_counter() - t0)
            telemetry.STORE_COMMIT_SIZE.observe(size)
            try:
                self._loop.call_soon_threadsafe(self._resolve, batch, results)
            except RuntimeError:  # the loop is gone (interpreter shutdown)
                return
        with contextlib.suppress(sqlite3.Error):
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._wconn.close()

    @staticmethod
    def _resolve(batch: list[_Append], results: list[int | Exception | None]) -> None:
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _commit_batch(self, batch: list[_Append]) -> list[int | Exception | None]:
        """On the writer thread: one transaction for the whole batch. If it fails for a
        reason one caller brought (a duplicate id), each caller is retried alone."""
        try:
            results = self._transaction(batch)
            self.commits += 1
            return list(results)
        except StoreError as exc:
            if isinstance(exc, StoreFull) or len(batch) == 1:
                return [exc] * len(batch)
        out: list[int | Exception | None] = []
        for item in batch:
            try:
                out.extend(self._transaction([item]))
                self.commits += 1
            except StoreError as exc:
                out.append(exc)
        return out

    def _transaction(self, batch: list[_Append]) -> list[int | None]:
        conn = self._wconn
        rows = [row for item in batch for row in item.rows]
        incoming = sum(len(r[8]) + 200 for r in rows) + sum(
            len(i.intent) + 50 for i in batch if i.intent is not None
        )
        if rows and _used_bytes(conn) + incoming > self._max_bytes:
            raise StoreFull(f"audit store is full (max_bytes={self._max_bytes})")
        results: list[int | None] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    conn.executemany(_INSERT_EVENT, rows)
                done = [(i.complete_intent,) for i in batch if i.complete_intent is not None]
                if done:
                    conn.executemany("DELETE FROM intents WHERE id = ?", done)
                now = time.time()
                for item in batch:
                    if item.intent is not None:
                        cur = conn.execute(
                            "INSERT INTO intents (created_at, summary) VALUES (?, ?)",
                            (now, item.intent),
                        )
                        results.append(cur.lastrowid)
                    else:
                        results.append(None)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if _is_full(exc):
                raise StoreFull(f"audit store disk is full: {exc}") from exc
            raise StoreError(f"audit store write failed: {exc}") from exc
        return results

    # --- intents ----------------------------------------------------------------------

    async def orphan_intents(self) -> list[Intent]:
        """Intents never completed, oldest first."""

        def read() -> list[tuple[int, float, bytes]]:
            return self._conn.execute(
                "SELECT id, created_at, summary FROM intents ORDER BY id"
            ).fetchall()

        return [
            Intent(id=i, created_at=datetime.fromtimestamp(ts, UTC), summary=orjson.loads(s))
            for i, ts, s in await self._guarded(read)
        ]

    # --- delivery bookkeeping ---------------------------------------------------------

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        """The oldest pending events, in queue order, stopping at the first one whose
        backoff has not expired (delivery stays in order)."""

        def read() -> list[tuple[Any, ...]]:
            return self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'pending'"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()

        cutoff = now.timestamp()
        out: list[QueuedEvent] = []
        for row in await self._guarded(read):
            if row[5] is not None and row[5] > cutoff:
                break
            out.append(self._queued(row))
        return out

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        """Mark delivered (the repository answered 2xx)."""
        await self._write_many(
            "UPDATE events SET status = 'delivered', delivered_at = ?, last_error = NULL"
            " WHERE seq = ?",
            [(now.timestamp(), s) for s in seqs],
        )

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        """Count a failed attempt and hold the events back until ``retry_at``."""
        await self._write_many(
            "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
            " WHERE seq = ? AND status = 'pending'",
            [(retry_at.timestamp(), error[:4096], s) for s in seqs],
        )

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        """Set aside events the repository rejected, with its answer."""
        await self._write_many(
            "UPDATE events SET status = 'dead', attempts = attempts + 1, last_error = ?"
            " WHERE seq = ?",
            [(error[:4096], s) for s in seqs],
        )

    async def requeue_dead(self, seqs: Sequence[int] | None = None) -> int:
        """Dead events back to pending (all of them when ``seqs`` is None)."""

        def write() -> int:
            with self._tx():
                if seqs is None:
                    cur = self._conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead'"
                    )
                    return cur.rowcount
                return sum(
                    self._conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead' AND seq = ?",
                        (s,),
                    ).rowcount
                    for s in seqs
                )

        result: int = await self._guarded(write)
        return result

    async def list_dead(self, limit: int = 100) -> list[QueuedEvent]:
        def read() -> list[tuple[Any, ...]]:
            return self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'dead' ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()

        return [self._queued(r) for r in await self._guarded(read)]

    async def prune(self, now: datetime, retention: timedelta) -> int:
        """Delete delivered events older than ``retention``. SQLite reuses the freed pages,
        and the size check counts only pages in use, so a full store recovers."""
        cutoff = (now - retention).timestamp()

        def write() -> int:
            with self._tx():
                cur = self._conn.execute(
                    "DELETE FROM events WHERE status = 'delivered' AND delivered_at < ?", (cutoff,)
                )
                return cur.rowcount

        result: int = await self._guarded(write)
        return result

    # --- reads for the admin API --------------------------------------------------------

    async def get_event(self, event_id: str) -> QueuedEvent | None:
        def read() -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
            return row

        row = await self._guarded(read)
        return self._queued(row) if row is not None else None

    async def search(self, query: EventQuery) -> tuple[list[QueuedEvent], int]:
        """A page of matching events and the total number matching."""
        where: list[str] = []
        args: list[Any] = []
        if query.patient:
            where.append("patients LIKE ?")
            args.append(f"%|{query.patient}|%")
        if query.subtype:
            where.append("subtypes LIKE ?")
            args.append(f"%|{query.subtype}|%")
        for column, value in (
            ("user_id", query.user),
            ("action", query.action),
            ("outcome", query.outcome),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.date_from is not None:
            where.append("recorded_ts >= ?")
            args.append(query.date_from.timestamp())
        if query.date_to is not None:
            where.append("recorded_ts < ?")
            args.append(query.date_to.timestamp())
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "DESC" if query.newest_first else "ASC"

        def read() -> tuple[list[tuple[Any, ...]], int]:
            total = self._conn.execute(f"SELECT COUNT(*) FROM events {clause}", args).fetchone()[0]
            rows = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events {clause}"
                f" ORDER BY recorded_ts {order}, seq {order} LIMIT ? OFFSET ?",
                [*args, query.limit, query.offset],
            ).fetchall()
            return rows, total

        rows, total = await self._guarded(read)
        return [self._queued(r) for r in rows], total

    async def stats(self) -> QueueStats:
        def read() -> QueueStats:
            counts = dict(
                self._conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status").fetchall()
            )
            intents = self._conn.execute("SELECT COUNT(*) FROM intents").fetchone()[0]
            return QueueStats(
                pending=counts.get("pending", 0),
                delivered=counts.get("delivered", 0),
                dead=counts.get("dead", 0),
                intents=intents,
                size_bytes=_used_bytes(self._conn),
            )

        result: QueueStats = await self._guarded(read)
        return result

    # --- plumbing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Any:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    async def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return

        def write() -> None:
            with self._tx():
                self._conn.executemany(sql, rows)

        await self._guarded(write)

    async def _guarded(self, fn: Any) -> Any:
        try:
            return await self._run(fn)
        except sqlite3.Error as exc:
            if _is_full(exc):
                raise StoreFull(f"audit store disk is full: {exc}") from exc
            raise StoreError(f"audit store failed: {exc}") from exc

    @staticmethod
    def _queued(row: tuple[Any, ...]) -> QueuedEvent:
        seq, event_id, body, status, attempts, next_at, error, recorded = row
        return QueuedEvent(
            seq=seq,
            event_id=event_id,
            event=orjson.loads(body),
            status=EventStatus(status),
            attempts=attempts,
            next_attempt_at=datetime.fromtimestamp(next_at, UTC) if next_at is not None else None,
            last_error=error,
            recorded=recorded,
        )
