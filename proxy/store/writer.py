"""The commit engine: appends made durable by group commit, on a writer thread.

One dedicated thread with its own ``sqlite3`` connection commits. Appends collect on the
event loop while the writer is busy; when it is free, everything collected is handed over
at once and committed in one transaction (a few multi-row statements, one fsync), and one
callback into the loop releases all their callers. Durability per event gets cheaper as
load rises: two thread hand-overs per commit, not two per append.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue as thread_queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from proxy import telemetry
from proxy.store.codec import BodyCodec
from proxy.store.records import Capture, EventRow

_EVENT_ARITY = 14
_BODY: Final = 8
"""Where the body is in an :data:`EventRow`: JSON from the event loop, a zstd frame once
the writer has compressed it."""
_ROWS_PER_STATEMENT = 256
"""Rows per multi-row INSERT: 256 x 14 parameters stays far below SQLite's 32766 limit."""
_ROW_OVERHEAD = 300
"""Bytes a row takes beside its body (columns and three index entries), overestimated."""


@functools.cache
def _insert_events_sql(n_rows: int) -> str:
    values = ",".join(["(" + ", ".join("?" * _EVENT_ARITY) + ")"] * n_rows)
    return (
        "INSERT INTO events (event_id, recorded, recorded_ts, action, outcome, subtypes,"
        " patients, user_id, body, terms, type_code, entity_types, request_id, updated_ts)"
        f" VALUES {values}"
    )


class StoreError(Exception):
    """The audit could not be made durable (the client gets 503)."""


class StoreFull(StoreError):
    """``max_bytes`` is reached or the disk is full (the client gets 507)."""


@dataclass(eq=False)
class Append:
    """One caller's share of a group commit."""

    rows: list[EventRow]
    complete_intent: int | None
    intent: bytes | None
    future: asyncio.Future[int | None] = field(repr=False)
    capture: Capture | None = None


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in pages that hold data (free pages are reused before the file grows)."""
    page_size, pages, free = conn.execute(
        "SELECT page_size, page_count, freelist_count"
        " FROM pragma_page_size, pragma_page_count, pragma_freelist_count"
    ).fetchone()
    return int(page_size * (pages - free))


_SHM_BUDGET = 128 * 1024
"""Room kept for the WAL's shared-memory index (32 KiB per 4,096 WAL frames)."""


def wal_budget(max_bytes: int) -> int:
    """Bytes of ``max_bytes`` kept for the write-ahead log: an eighth, between 256 KiB
    and 64 MiB. The WAL is checkpointed when it holds half of it
    (``wal_autocheckpoint``) and truncated back to it (``journal_size_limit``)."""
    return min(64 * 1024 * 1024, max(256 * 1024, max_bytes // 8))


def database_budget(max_bytes: int) -> int:
    """Bytes the database's pages may use so that database, WAL and shared-memory index
    together stay under ``max_bytes``."""
    return max(0, max_bytes - wal_budget(max_bytes) - _SHM_BUDGET)


def is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


class CommitEngine:
    """Group commits of appends, intents and captures on one writer thread."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        codec: BodyCodec,
        *,
        max_bytes: int,
        batch_max: int,
    ) -> None:
        self._wconn = conn
        self._codec = codec
        """Compresses bodies on the writer thread."""
        self._max_bytes = max_bytes
        self._db_budget = database_budget(max_bytes)
        self._batch_max = batch_max
        self._loop = asyncio.get_running_loop()
        self._inbox: thread_queue.SimpleQueue[list[Append] | None] = thread_queue.SimpleQueue()
        self._pending: list[Append] = []
        """Appends waiting for the writer (event loop thread only)."""
        self._writer_busy = False
        """A batch is with the writer thread (event loop thread only)."""
        self._kick_scheduled = False
        self._kick_at = 1
        """Pending appends that start a commit without waiting for the loop iteration."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False
        self._used_estimate = 0
        """Bytes in use as last measured, plus what was committed since (writer only)."""
        self._commits_since_measure = 256
        self.commits = 0
        """Group commits done (tests and the benchmark read it)."""
        self.commit_seconds = 0.0
        """Time the writer spent committing (the benchmark reads it)."""
        self._writer = threading.Thread(
            target=self._write_loop, name="audit-store-writer", daemon=True
        )
        self._writer.start()

    async def close(self) -> None:
        """Commit what was accepted, checkpoint the WAL, stop the writer."""
        if self.closed:
            return
        self.closed = True
        while self._pending or self._writer_busy:  # appends already accepted still commit
            await self._idle.wait()
            if self._pending and not self._writer_busy:
                self._kick()
        self._inbox.put(None)
        await asyncio.to_thread(self._writer.join)

    async def submit(self, item: Append) -> int | None:
        """Return once ``item`` is committed: its intent id, or None."""
        if self.closed:
            raise StoreError("the audit store is closed")
        self._pending.append(item)
        self._hand_over()
        return await item.future

    def _hand_over(self) -> None:
        """On the event loop, with appends pending: start a commit now if ``_kick_at`` of
        them are waiting, else at the end of this loop iteration at the latest, so every
        append made by the callbacks now ready joins the same commit. A busy writer takes
        everything pending when it is done."""
        if self._writer_busy:
            return
        if len(self._pending) >= self._kick_at:
            self._kick()
        elif not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        """On the event loop: give the writer everything pending (up to ``batch_max`` rows).
        Batching happens here, not per item across threads: each hand-over between the
        loop and the writer thread costs a GIL round trip, so there are two per commit
        rather than two per append."""
        self._kick_scheduled = False
        if self._writer_busy or not self._pending:
            return
        size = 0
        take = 0
        for item in self._pending:
            size += len(item.rows) + 1
            take += 1
            if size >= self._batch_max:
                break
        batch, self._pending = self._pending[:take], self._pending[take:]
        self._writer_busy = True
        self._idle.clear()
        self._inbox.put(batch)

    def _committed(self, batch: list[Append], results: list[int | Exception | None]) -> None:
        """On the event loop: release the batch's callers, then hand over the next one."""
        self._writer_busy = False
        self._resolve(batch, results)
        # The callers just released are about to append again (under load they are most
        # of the traffic). Start the next commit once half as many are waiting, rather
        # than at the end of the loop iteration: the writer commits one half while the
        # loop serves the other, so the disk does not wait for the loop (64 writers:
        # alternating commits of 32, ~1.3x the appends/s of serial commits of 64 in
        # bench/bench_store.py). Under light load the threshold is 1: no waiting.
        self._kick_at = max(1, len(batch) // 2)
        if self._pending:
            self._hand_over()
        else:
            self._idle.set()

    def _write_loop(self) -> None:
        """The writer thread: commit each batch it is given in one transaction."""
        while True:
            batch = self._inbox.get()
            if batch is None:
                break
            t0 = time.perf_counter()
            try:
                results = self._commit_batch(batch)
            except BaseException as exc:  # never leave callers hanging
                results = [StoreError(f"audit store write failed: {exc}")] * len(batch)
            spent = time.perf_counter() - t0
            self.commit_seconds += spent
            telemetry.STORE_COMMIT_SECONDS.observe(spent)
            telemetry.STORE_COMMIT_SIZE.observe(sum(len(i.rows) + 1 for i in batch))
            try:
                self._loop.call_soon_threadsafe(self._committed, batch, results)
            except RuntimeError:  # the loop is gone (interpreter shutdown)
                return
        with contextlib.suppress(sqlite3.Error):
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._wconn.close()

    @staticmethod
    def _resolve(batch: list[Append], results: list[int | Exception | None]) -> None:
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _commit_batch(self, batch: list[Append]) -> list[int | Exception | None]:
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

    def _transaction(self, batch: list[Append]) -> list[int | None]:
        """One transaction for the batch, in as few statements as possible: the sqlite3
        module gives up and retakes the GIL around every statement step, and each retake
        waits for the busy event loop thread, so per-row statements made commits of 32
        events take 3 ms instead of 1 (bench/bench_store.py)."""
        conn = self._wconn
        rows: list[Any] = [value for item in batch for row in item.rows for value in row]
        # Compressed here, off the event loop (10-30 us per body there, cold zstd tables),
        # all in one call that lets go of the GIL once, and put back in place by one
        # slice assignment: Python work on this thread holds the GIL the loop needs.
        frames = self._codec.compress_many(rows[_BODY::_EVENT_ARITY])
        rows[_BODY::_EVENT_ARITY] = frames
        n_rows = len(rows) // _EVENT_ARITY
        intents = [i.intent for i in batch if i.intent is not None]
        done = [i.complete_intent for i in batch if i.complete_intent is not None]
        captures = [self._capture_row(i.capture) for i in batch if i.capture is not None]
        incoming = sum(map(len, frames)) + _ROW_OVERHEAD * n_rows
        incoming += sum(len(i) + 50 for i in intents)
        incoming += sum(len(c[2] or b"") + len(c[3] or b"") + 80 for c in captures)
        try:
            # Intents count too: a write whose intent fits no more must not be forwarded.
            if (n_rows or intents) and not self._has_room(incoming):
                raise StoreFull(f"audit store is full (max_bytes={self._max_bytes})")
            if not intents and not done and not captures and n_rows <= _ROWS_PER_STATEMENT:
                # The common batch, events only: one statement is its own transaction
                # (autocommit), so the writer retakes the GIL once, not three times.
                conn.execute(_insert_events_sql(n_rows), rows)
                self._used_estimate += incoming
                return [None] * len(batch)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for offset in range(0, n_rows, _ROWS_PER_STATEMENT):
                    chunk = rows[
                        offset * _EVENT_ARITY : (offset + _ROWS_PER_STATEMENT) * _EVENT_ARITY
                    ]
                    conn.execute(_insert_events_sql(len(chunk) // _EVENT_ARITY), chunk)
                if captures:
                    conn.executemany(
                        "INSERT OR REPLACE INTO captures (request_id, created_at, request,"
                        " response) VALUES (?, ?, ?, ?)",
                        captures,
                    )
                if done:
                    marks = ",".join("?" * len(done))
                    conn.execute(f"DELETE FROM intents WHERE id IN ({marks})", done)
                first_intent = 0
                if intents:
                    now = time.time()
                    values = ",".join(["(?, ?)"] * len(intents))
                    args = [v for summary in intents for v in (now, summary)]
                    cur = conn.execute(
                        f"INSERT INTO intents (created_at, summary) VALUES {values}", args
                    )
                    # Rowids of one multi-row insert in an exclusive transaction are
                    # consecutive (max(rowid) + 1 each), so the first is derived.
                    assert cur.lastrowid is not None
                    first_intent = cur.lastrowid - len(intents) + 1
                conn.execute("COMMIT")
                self._used_estimate += incoming
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if is_full(exc):
                raise StoreFull(f"audit store disk is full: {exc}") from exc
            raise StoreError(f"audit store write failed: {exc}") from exc
        results: list[int | None] = []
        for item in batch:
            if item.intent is not None:
                results.append(first_intent)
                first_intent += 1
            else:
                results.append(None)
        return results

    def _capture_row(self, capture: Capture) -> tuple[str, float, bytes | None, bytes | None]:
        """On the writer thread: a capture as its row, bodies compressed."""
        request, response = (
            None if body is None else self._codec.compress_many([body])[0]
            for body in (capture.request, capture.response)
        )
        return capture.request_id, time.time(), request, response

    def _has_room(self, incoming: int) -> bool:
        """Whether ``incoming`` bytes fit under ``max_bytes``. Far from the limit, the pages
        in use are read from SQLite only every 256 commits and a running estimate is used
        in between (a statement per commit is a GIL round trip for the writer); within
        10% of the limit they are read before every commit, as a full store needs."""
        self._commits_since_measure += 1
        if (
            self._commits_since_measure >= 256
            or self._used_estimate + incoming > self._db_budget * 0.9
        ):
            self._used_estimate = used_bytes(self._wconn)
            self._commits_since_measure = 0
        return self._used_estimate + incoming <= self._db_budget
