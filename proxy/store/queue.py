"""The durable write-ahead queue: SQLite in WAL mode with ``synchronous=FULL``.

:class:`AuditQueue` is the store as the rest of the proxy sees it: appends and intents
(made durable by :class:`~proxy.store.writer.CommitEngine`), delivery bookkeeping (claim,
ack, retry, dead letters, pruning) and the reads of the admin API (their SQL is in
:mod:`proxy.store.search`). Every method names and returns events, not rows: a row may
hold several (:mod:`proxy.store.fans`). Reads and bookkeeping run on a second connection on
a second thread; WAL lets them read while the writer commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy.store.codec import BodyCodec, CodecError
from proxy.store.fans import fan_of, lookup_ids, rows_for
from proxy.store.index import event_row
from proxy.store.records import (
    Capture,
    Cursor,
    EventPage,
    EventQuery,
    EventRow,
    EventStatus,
    FanOut,
    Intent,
    QueuedEvent,
    QueueStats,
    SortKey,
    member_id,
)
from proxy.store.search import SearchSql
from proxy.store.writer import (
    Append,
    CommitEngine,
    CommitReport,
    StoreError,
    StoreFull,
    is_full,
    used_bytes,
)
from proxy.store.writer_process import connect, load_codec

log = logging.getLogger(__name__)

T = TypeVar("T")

_EVENT_COLUMNS = (
    "seq, event_id, body, status, attempts, next_attempt_at, last_error, recorded, recorded_ts,"
    " fan, patients"
)
_EVENT_COLUMNS_E = ", ".join(f"e.{c.strip()}" for c in _EVENT_COLUMNS.split(","))


class AuditQueue:
    """The queue. Open it with :meth:`open`; one instance per store file."""

    def __init__(
        self, engine: CommitEngine, reader_conn: sqlite3.Connection, codec: BodyCodec
    ) -> None:
        self._conn = reader_conn
        self._codec = codec
        """Decodes on the reader thread and the event loop (the engine has its own use)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-store-read")
        self._loop = asyncio.get_running_loop()
        self._engine = engine
        self.refusing: str | None = None
        """Why the last append or intent failed (``store full``, or the error), until one
        succeeds again: the store is failing requests closed (readiness reads it)."""

    @property
    def commits(self) -> int:
        """Group commits done (tests and the benchmark read it)."""
        return self._engine.commits

    @property
    def commit_seconds(self) -> float:
        """Time the writer spent committing (the benchmark reads it)."""
        return self._engine.commit_seconds

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        max_bytes: int,
        commit_batch_max: int = 512,
        create: bool = True,
        start_writer: bool = True,
        on_commit: CommitReport | None = None,
    ) -> AuditQueue:
        """Open (creating and migrating) the store at ``path`` and start the writer.
        With ``create=False`` (commands that only read or tidy a store) a missing store is
        a :class:`StoreError` instead of a new empty one; with ``start_writer=False`` the
        writer process starts at the first append, if one comes. ``on_commit`` is told of
        every group commit (the proxy's metrics)."""
        path = Path(path)
        if not create and not path.is_file():
            raise StoreError(
                f"no audit store at {path}: check store.path in the configuration given with"
                " -c/--config (or $FHIR_AUDIT_CONFIG)"
            )
        try:
            setup = await asyncio.to_thread(connect, path, True, max_bytes)
            try:
                codec = await asyncio.to_thread(load_codec, setup)
            finally:
                setup.close()
            reader = await asyncio.to_thread(connect, path, False, max_bytes)
        except (OSError, sqlite3.Error, RuntimeError) as exc:  # RuntimeError: schema too new
            raise StoreError(f"cannot open the audit store at {path}: {exc}") from exc
        try:
            engine = await CommitEngine.start(
                path,
                max_bytes=max_bytes,
                batch_max=commit_batch_max,
                start_writer=start_writer,
                on_commit=on_commit,
            )
        except BaseException:
            reader.close()
            raise
        return cls(engine, reader, codec)

    async def close(self) -> None:
        """Finish pending appends, checkpoint the WAL and close."""
        if self._engine.closed:
            return
        await self._engine.close()
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    # --- appends (the commit engine makes them durable) ---------------------------------

    async def append(
        self, events: Sequence[dict[str, Any]], *, complete_intent: int | None = None
    ) -> None:
        """Return once ``events`` (and the completion of ``complete_intent``) are committed
        with fsync. Raises :class:`StoreFull` or :class:`StoreError`."""
        try:
            rows = [event_row(e) for e in events]
        except (TypeError, KeyError, orjson.JSONEncodeError) as exc:
            raise StoreError(f"event cannot be stored: {exc}") from exc
        await self.append_rows(rows, complete_intent=complete_intent)

    async def append_rows(
        self,
        rows: Sequence[EventRow | FanOut],
        *,
        complete_intent: int | None = None,
        capture: Capture | None = None,
    ) -> None:
        """:meth:`append` for events whose rows the builder already made; ``capture``
        (the exchange's bodies) is committed with them."""
        await self._tracked(
            Append(list(rows), complete_intent, None, self._loop.create_future(), capture)
        )

    async def record_intent(self, summary: dict[str, Any]) -> int:
        """Commit an intent (before forwarding a write); returns its id."""
        item = Append([], None, orjson.dumps(summary), self._loop.create_future())
        intent_id = await self._tracked(item)
        assert intent_id is not None
        return intent_id

    async def _tracked(self, item: Append) -> int | None:
        """Submit, and keep :attr:`refusing` up to date."""
        try:
            result = await self._engine.submit(item)
        except StoreFull:
            self.refusing = "store full"
            raise
        except StoreError as exc:
            self.refusing = str(exc)[:200]
            raise
        self.refusing = None
        return result

    # --- intents ----------------------------------------------------------------------

    async def orphan_intents(self) -> list[Intent]:
        """Intents never completed, oldest first."""

        def read() -> list[tuple[int, float, bytes, str | None]]:
            return self._conn.execute(
                "SELECT id, created_at, summary, reason FROM intents ORDER BY id"
            ).fetchall()

        return [
            Intent(
                id=i,
                created_at=datetime.fromtimestamp(ts, UTC),
                summary=orjson.loads(s),
                reason=reason,
            )
            for i, ts, s, reason in await self._guarded(read)
        ]

    async def note_intent_reasons(self, reasons: Mapping[int, str]) -> None:
        """Keep why these intents were abandoned (by id), so a restart does not forget it;
        a reason already noted stays."""
        await self._write_many(
            "UPDATE intents SET reason = ? WHERE id = ? AND reason IS NULL",
            [(why, intent_id) for intent_id, why in reasons.items()],
        )

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
            if (row[5] is not None and row[5] > cutoff) or len(out) >= limit:
                break
            try:
                out.extend(self._events(row))
            except StoreError as exc:  # a damaged body must not stall delivery behind it
                log.error("audit event %s cannot be read, moved to dead-letter: %s", row[1], exc)
                await self.dead_letter(_seqs_of(row), str(exc))
        return out[:limit]

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        """Mark delivered (the repository answered 2xx)."""
        await self._update_events(
            "UPDATE events SET status = 'delivered', delivered_at = ?, last_error = NULL"
            " WHERE seq = ?",
            seqs,
            now.timestamp(),
        )

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        """Count a failed attempt and hold the events back until ``retry_at``."""
        await self._update_events(
            "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
            " WHERE seq = ? AND status = 'pending'",
            seqs,
            retry_at.timestamp(),
            error[:4096],
        )

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        """Set aside events the repository rejected, with its answer."""
        await self._update_events(
            "UPDATE events SET status = 'dead', attempts = attempts + 1, last_error = ?"
            " WHERE seq = ?",
            seqs,
            error[:4096],
        )

    async def requeue_dead(self, seqs: Sequence[int] | None = None) -> int:
        """Dead events back to pending (all of them when ``seqs`` is None)."""

        def write() -> int:
            with self._tx():
                if seqs is None:
                    requeued: int = self._conn.execute(
                        "SELECT COALESCE(SUM(COALESCE(fan, 1)), 0) FROM events"
                        " WHERE status = 'dead'"
                    ).fetchone()[0]
                    self._conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead'"
                    )
                    return requeued
                requeued = 0
                for s in rows_for(self._conn, self._codec, seqs):
                    for (events,) in self._conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead' AND seq = ? RETURNING COALESCE(fan, 1)",
                        (s,),
                    ):
                        requeued += events
                return requeued

        result: int = await self._guarded(write)
        return result

    async def list_dead(self, limit: int = 100) -> list[QueuedEvent]:
        def read() -> list[tuple[Any, ...]]:
            return self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'dead' ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()

        found = [e for r in await self._guarded(read) for e in self._events(r, damaged_ok=True)]
        return found[:limit]

    async def prune(self, now: datetime, retention: timedelta) -> int:
        """Delete delivered events older than ``retention``. SQLite reuses the freed pages,
        and the size check counts only pages in use, so a full store recovers."""
        cutoff = (now - retention).timestamp()

        def write() -> int:
            with self._tx():
                cur = self._conn.execute(
                    "DELETE FROM events WHERE status = 'delivered' AND delivered_at < ?", (cutoff,)
                )
                # Captured bodies are kept as long as delivered events are, and for as
                # long as an event of their exchange is undelivered (those are few: the
                # status index finds them).
                self._conn.execute(
                    "DELETE FROM captures WHERE created_at < ? AND request_id NOT IN"
                    " (SELECT request_id FROM events WHERE status IN ('pending', 'dead')"
                    " AND request_id IS NOT NULL)",
                    (cutoff,),
                )
                return cur.rowcount

        result: int = await self._guarded(write)
        return result

    # --- reads for the admin API --------------------------------------------------------

    async def get_capture(self, request_id: str) -> Capture | None:
        """The bodies captured for the exchange ``request_id``, or None."""

        def read() -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = self._conn.execute(
                "SELECT request, response FROM captures WHERE request_id = ?", (request_id,)
            ).fetchone()
            return row

        row = await self._guarded(read)
        if row is None:
            return None
        request, response = (None if b is None else self._codec.decompress(b) for b in row)
        return Capture(request_id, request, response)

    async def get_event(self, event_id: str) -> QueuedEvent | None:
        def read() -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
            if row is None and (held := lookup_ids(event_id)) is not None:
                row = self._conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ? AND fan > ?", held
                ).fetchone()
            return row

        row = await self._guarded(read)
        if row is None:
            return None
        return next((e for e in self._events(row) if e.event_id == event_id), None)

    async def search(self, query: EventQuery) -> tuple[list[QueuedEvent], int]:
        """A page of matching events and the total number matching."""
        page = await self.search_page(query)
        return page.items, page.total if page.total is not None else len(page.items)

    async def search_page(self, query: EventQuery) -> EventPage:
        """A page of matching events in the query's order, with keyset paging (``after``,
        ``before``). A patient, entity, agent, address or resource type filter walks the
        ``event_terms`` index in date order; a date range walks ``events_recorded``.
        SQL pages over rows; a fan-out row's events are then taken one by one (those
        its patient filters name, those past the cursor), so every row fetched gives
        at least one event but may give several: ``limit + 1 + offset`` rows suffice."""
        sql = SearchSql(query)
        reverse = query.before is not None
        descending = query.newest_first != reverse
        order = "DESC" if descending else "ASC"
        cursor = query.before if reverse else query.after
        count_clause = f"WHERE {' AND '.join(sql.where)}" if sql.where else ""

        def read() -> tuple[list[tuple[tuple[Any, ...], list[int]]], int | None]:
            where, args = list(sql.where), list(sql.args)
            if cursor is not None:
                condition, bound = sql.after(self._row_bound(cursor, descending), descending)
                where.append(condition)
                args.extend(bound)
            clause = f"WHERE {' AND '.join(where)}" if where else ""
            select = (
                f"SELECT {_EVENT_COLUMNS_E} FROM {sql.source} {clause}"
                f" ORDER BY {sql.order.format(order=order)} LIMIT ?"
            )
            fetch = query.offset + query.limit + 1
            while True:
                rows = self._conn.execute(select, [*args, fetch]).fetchall()
                picks = self._matching(rows, query, cursor, descending)
                if sum(len(k) for _, k in picks) > query.limit or len(rows) < fetch:
                    break
                fetch *= 2  # rows whose events all failed a patient filter
            total: int | None = None
            if query.count_total:
                count, count_args = sql.count()
                total = self._conn.execute(
                    f"SELECT {count} FROM {sql.source} {count_clause}", [*count_args, *sql.args]
                ).fetchone()[0]
            return picks, total

        picks, total = await self._guarded(read)
        found = [e for row, keep in picks for e in _taken(self._events(row), keep)]
        more = len(found) > query.limit
        items = found[: query.limit]
        if reverse:
            items.reverse()
            return EventPage(items, total, more_after=True, more_before=more)
        return EventPage(
            items, total, more_after=more, more_before=query.after is not None or query.offset > 0
        )

    def _row_bound(self, cursor: Cursor, descending: bool) -> Cursor:
        """The keyset bound on rows for a cursor on events: going down from an event that
        is not its fan-out's first, the bound is above its row so that the row's events
        below it are found."""
        if not descending:
            return cursor
        row = self._conn.execute(
            "SELECT seq, fan FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (cursor[1],)
        ).fetchone()
        if row is not None and row[1] is not None and row[0] - row[1] + 1 < cursor[1]:
            return (cursor[0], row[0] + 1)
        return cursor

    @staticmethod
    def _matching(
        rows: list[tuple[Any, ...]],
        query: EventQuery,
        cursor: Cursor | None,
        descending: bool,
    ) -> list[tuple[tuple[Any, ...], list[int]]]:
        """Which events of ``rows`` the page holds, in the query's order, after the first
        ``offset`` and at most ``limit + 1``: each row with the positions of its events
        taken. Of a fan-out row, those are its events past the cursor whose patient each
        patient or entity filter names (or that name none of the row's patients)."""
        named = {v for v in (query.patient, query.entity) if v is not None}
        by_date = query.sort is SortKey.RECORDED
        picks: list[tuple[tuple[Any, ...], list[int]]] = []
        skip, room = query.offset, query.limit + 1
        for row in rows:
            fan = row[9]
            if fan is None:
                keep = [0]
            else:
                patients = row[10][1:-1].split("|")
                held = set(patients)
                keep = [
                    i for i, p in enumerate(patients) if all(v == p or v not in held for v in named)
                ]
                if cursor is not None:
                    first = row[0] - fan + 1
                    ts = row[8] if by_date else 0.0
                    keep = [
                        i
                        for i in keep
                        if ((ts, first + i) < cursor if descending else (ts, first + i) > cursor)
                    ]
                if descending:
                    keep.reverse()
            if skip >= len(keep):
                skip -= len(keep)
                continue
            keep = keep[skip : skip + room]
            skip = 0
            picks.append((row, keep))
            room -= len(keep)
            if not room:
                break
        return picks

    async def oldest_pending_recorded(self) -> float | None:
        """``recorded`` (POSIX time) of the oldest undelivered event, or None."""

        def read() -> float | None:
            row = self._conn.execute(
                "SELECT recorded_ts FROM events WHERE status = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
            return float(row[0]) if row else None

        result: float | None = await self._guarded(read)
        return result

    async def bytes_in_use(self) -> int:
        """Bytes in use by the database (free pages excluded): what ``max_bytes`` bounds,
        read without counting the events."""
        result: int = await self._guarded(lambda: used_bytes(self._conn))
        return result

    async def stats(self) -> QueueStats:
        def read() -> QueueStats:
            counts = dict(
                self._conn.execute(
                    "SELECT status, SUM(COALESCE(fan, 1)) FROM events GROUP BY status"
                ).fetchall()
            )
            intents = self._conn.execute("SELECT COUNT(*) FROM intents").fetchone()[0]
            oldest = self._conn.execute(
                "SELECT recorded_ts FROM events WHERE status = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
            return QueueStats(
                pending=counts.get("pending", 0),
                delivered=counts.get("delivered", 0),
                dead=counts.get("dead", 0),
                intents=intents,
                size_bytes=used_bytes(self._conn),
                oldest_pending_recorded=float(oldest[0]) if oldest else None,
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

    async def _update_events(self, sql: str, seqs: Sequence[int], *values: Any) -> None:
        """Run ``sql`` (ending in ``seq = ?``) with ``values`` for each event of ``seqs``,
        on the rows that hold them (fan-out rows only partly named are split first)."""
        if not seqs:
            return

        def write() -> None:
            with self._tx():
                rows = rows_for(self._conn, self._codec, seqs)
                self._conn.executemany(sql, [(*values, s) for s in rows])

        await self._guarded(write)

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
            if is_full(exc):
                raise StoreFull(f"audit store disk is full: {exc}") from exc
            raise StoreError(f"audit store failed: {exc}") from exc

    def _events(self, row: tuple[Any, ...], *, damaged_ok: bool = False) -> list[QueuedEvent]:
        """The events of a row (several for a fan-out's). A body that cannot be decoded is
        a StoreError, except where ``damaged_ok`` (the dead-letter list, where such events
        are kept): there each record carries only its event's id, and ``last_error`` says
        why."""
        seq, event_id, body, status, attempts, next_at, error, recorded, recorded_ts = row[:9]
        fan, patients = row[9:11]
        state = EventStatus(status)
        next_attempt_at = datetime.fromtimestamp(next_at, UTC) if next_at is not None else None
        events: list[tuple[str, dict[str, Any]]]
        try:
            if fan is None:
                events = [(event_id, self._codec.decode(body))]
            else:
                fanned = fan_of(event_id, patients, self._codec.decompress(body))
                events = [
                    (member, orjson.loads(json)) for member, json in map(fanned.event, range(fan))
                ]
        except (CodecError, ValueError) as exc:
            if not damaged_ok:
                raise StoreError(f"audit event {event_id}: {exc}") from exc
            ids = [event_id] if fan is None else [member_id(event_id, n) for n in range(fan)]
            events = [(i, {"resourceType": "AuditEvent", "id": i}) for i in ids]
        first = seq - len(events) + 1
        return [
            QueuedEvent(
                seq=first + n,
                event_id=member,
                event=event,
                status=state,
                attempts=attempts,
                next_attempt_at=next_attempt_at,
                last_error=error,
                recorded=recorded,
                recorded_ts=recorded_ts,
            )
            for n, (member, event) in enumerate(events)
        ]


def _taken(events: list[QueuedEvent], positions: list[int]) -> list[QueuedEvent]:
    return events if len(events) == 1 else [events[i] for i in positions]


def _seqs_of(row: tuple[Any, ...]) -> list[int]:
    """The seqs of a row's events."""
    return list(range(row[0] - (row[9] or 1) + 1, row[0] + 1))
