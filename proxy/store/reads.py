"""The reader face of one store file (:class:`~proxy.store.faces.EventReader`): searches
(their SQL is :mod:`proxy.store.search`), reads by id, captures, the dead letters and the
counts, on the shard's second connection."""

from __future__ import annotations

from proxy.store.database import used_bytes
from proxy.store.faces import EventReader
from proxy.store.fans import lookup_ids, members_named
from proxy.store.records import (
    Capture,
    Cursor,
    EventPage,
    EventQuery,
    QueuedEvent,
    QueueStats,
    SortKey,
)
from proxy.store.search import SearchSql, total_statement
from proxy.store.shard import ShardPart
from proxy.store.tables import STORED, STORED_E, StoredCapture, StoredRow, stored_rows

Picks = list[tuple[StoredRow, list[int]]]
"""Rows of a page, each with the positions of its events the page takes."""


class ShardReader(ShardPart, EventReader):
    """Reads of one store file."""

    async def get_capture(self, request_id: str) -> Capture | None:
        conn = self._shard.conn

        def read() -> StoredCapture | None:
            row = conn.execute(
                f"SELECT {', '.join(StoredCapture._fields)} FROM captures WHERE request_id = ?",
                (request_id,),
            ).fetchone()
            return None if row is None else StoredCapture._make(row)

        stored = await self._shard.run(read)
        if stored is None:
            return None
        decompress = self._shard.codec.decompress
        return Capture(
            request_id=request_id,
            request=None if stored.request is None else decompress(stored.request),
            response=None if stored.response is None else decompress(stored.response),
        )

    async def get_event(self, event_id: str) -> QueuedEvent | None:
        conn = self._shard.conn

        def read() -> StoredRow | None:
            rows = stored_rows(
                conn.execute(f"SELECT {STORED} FROM events WHERE event_id = ?", (event_id,))
            )
            if not rows and (held := lookup_ids(event_id)) is not None:
                rows = stored_rows(
                    conn.execute(
                        f"SELECT {STORED} FROM events WHERE event_id = ? AND fan > ?", held
                    )
                )
            return rows[0] if rows else None

        row = await self._shard.run(read)
        if row is None:
            return None
        return next((e for e in self._shard.events(row) if e.event_id == event_id), None)

    async def search_page(self, query: EventQuery) -> EventPage:
        """:meth:`EventReader.search_page`. A patient, entity, agent, address or resource
        type filter walks the ``event_terms`` index in date order; a date range walks
        ``events_recorded``. SQL pages over rows; a fan-out row's events are then taken
        one by one (those its patient filters name, those past the cursor), so every row
        fetched gives at least one event but may give several: ``limit + 1 + offset`` rows
        suffice."""
        sql = SearchSql(query)
        reverse = query.before is not None
        descending = query.newest_first != reverse
        order = "DESC" if descending else "ASC"
        cursor = query.before if reverse else query.after
        conn = self._shard.conn

        def read() -> tuple[Picks, int | None]:
            where, args = list(sql.where), list(sql.args)
            if cursor is not None:
                condition, bound = sql.after(self._row_bound(cursor, descending), descending)
                where.append(condition)
                args.extend(bound)
            clause = f"WHERE {' AND '.join(where)}" if where else ""
            select = (
                f"SELECT {STORED_E} FROM {sql.source} {clause}"
                f" ORDER BY {sql.order.format(order=order)} LIMIT ?"
            )
            fetch = query.offset + query.limit + 1
            while True:
                rows = stored_rows(conn.execute(select, [*args, fetch]))
                picks = _matching(rows, query, cursor, descending)
                if sum(len(k) for _, k in picks) > query.limit or len(rows) < fetch:
                    break
                fetch *= 2  # rows whose events all failed a patient filter
            total: int | None = None
            if query.count_total:
                statement, count_args = total_statement(query)
                total = conn.execute(statement, count_args).fetchone()[0]
            return picks, total

        picks, total = await self._shard.run(read)
        found = [e for row, keep in picks for e in _taken(self._shard.events(row), keep)]
        return EventPage.walked(query, found[: query.limit], total, more=len(found) > query.limit)

    def _row_bound(self, cursor: Cursor, descending: bool) -> Cursor:
        """The keyset bound on rows for a cursor on events: going down from an event that
        is not its fan-out's first, the bound is above its row so that the row's events
        below it are found."""
        if not descending:
            return cursor
        row = self._shard.conn.execute(
            "SELECT seq, fan FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (cursor[1],)
        ).fetchone()
        if row is not None:
            seq, fan = row
            if fan is not None and seq - fan + 1 < cursor[1]:
                return (cursor[0], seq + 1)
        return cursor

    async def list_dead(self, limit: int = 100) -> list[QueuedEvent]:
        conn = self._shard.conn

        def read() -> list[StoredRow]:
            return stored_rows(
                conn.execute(
                    f"SELECT {STORED} FROM events WHERE status = 'dead' ORDER BY seq LIMIT ?",
                    (limit,),
                )
            )

        rows = await self._shard.run(read)
        found = [e for row in rows for e in self._shard.events(row, damaged_ok=True)]
        return found[:limit]

    async def bytes_in_use(self) -> int:
        """Bytes in use by the database (free pages excluded): what ``max_bytes`` bounds,
        read without counting the events (readiness reads it of every shard)."""
        conn = self._shard.conn
        return await self._shard.run(lambda: used_bytes(conn))

    async def stats(self) -> QueueStats:
        conn = self._shard.conn

        def read() -> QueueStats:
            counts = dict(
                conn.execute(
                    "SELECT status, SUM(COALESCE(fan, 1)) FROM events GROUP BY status"
                ).fetchall()
            )
            (intents,) = conn.execute("SELECT COUNT(*) FROM intents").fetchone()
            oldest = conn.execute(
                "SELECT recorded_ts FROM events WHERE status = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
            return QueueStats(
                pending=counts.get("pending", 0),
                delivered=counts.get("delivered", 0),
                dead=counts.get("dead", 0),
                intents=intents,
                size_bytes=used_bytes(conn),
                oldest_pending_recorded=float(oldest[0]) if oldest else None,
            )

        return await self._shard.run(read)


def _matching(
    rows: list[StoredRow], query: EventQuery, cursor: Cursor | None, descending: bool
) -> Picks:
    """Which events of ``rows`` the page holds, in the query's order, after the first
    ``offset`` and at most ``limit + 1``: each row with the positions of its events
    taken. Of a fan-out row, those are its events past the cursor whose patient each
    patient or entity filter names (or that name none of the row's patients)."""
    named = {v for v in (query.patient, query.entity) if v is not None}
    by_date = query.sort is SortKey.RECORDED
    picks: Picks = []
    skip, room = query.offset, query.limit + 1
    for row in rows:
        if row.fan is None:
            keep = [0]
        else:
            keep = members_named(row.patients[1:-1].split("|"), named)
            if cursor is not None:
                ts = row.recorded_ts if by_date else 0.0
                seqs = row.seqs
                keep = [
                    i
                    for i in keep
                    if ((ts, seqs[i]) < cursor if descending else (ts, seqs[i]) > cursor)
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


def _taken(events: list[QueuedEvent], positions: list[int]) -> list[QueuedEvent]:
    return events if len(events) == 1 else [events[i] for i in positions]
