"""What the privacy reports and the activity chart read from the store, beyond a search:
a user's first access to a patient, a user's accesses in a time window, the events of a
report from their rows' columns and then a page of them by seq, and events counted over
time: the report face (:class:`~proxy.store.faces.ReportReader`) of one
store file, :class:`ShardReports`. Each read is SQL over the store's tables
(``access_pairs``, ``activity`` and ``event_terms``, kept by triggers,
proxy/store/schema.py) on the shard's reading connection; several shards are merged by
:class:`~proxy.store.shards.ShardedStore`, naming rows by their global seq as searches do.

What each costs, in index work (``n`` the events in the store):

- ``first_accesses``: one seek into ``access_pairs`` per (user, patient) pair,
  ``O(log n)`` however long either's history.
- ``user_accesses``: one range of the user's ``a:`` term per window, a row read for each
  of the user's events in it.
- ``indexed``: the search's own walk (a term's range, or the date range of
  ``events_recorded``), a row read for each event (no body decoded).
- ``events_at``: one seek by seq per row.
- ``activity``: with no filter but the date range, action, outcome and
  the admin-access mark, a range of ``activity`` (a row per quarter hour, action and
  outcome present); with any other filter, the search's own walk (a term's range, or the
  date range of ``events_recorded``), grouped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from proxy.store.faces import ReportReader
from proxy.store.fans import members_named
from proxy.store.marks import Mark
from proxy.store.records import (
    ActivityCount,
    Cursor,
    EventQuery,
    IndexedEvent,
    Pair,
    QueuedEvent,
    UserAccess,
    Window,
)
from proxy.store.search import SLOT_S, SearchSql, rollup_edges, rollup_slots, rollup_where
from proxy.store.shard import ShardPart
from proxy.store.tables import STORED, StoredRow, stored_rows

# --- SQL on one shard's connection -----------------------------------------------------------


def first_access_of(conn: sqlite3.Connection, pairs: Iterable[Pair]) -> dict[Pair, Cursor]:
    """For each (user, patient) pair that has any, the (recorded time, row seq) of the
    user's earliest event naming the patient in this store, admin reads left out."""
    found: dict[Pair, Cursor] = {}
    for pair in pairs:
        row = conn.execute(
            "SELECT ts, seq FROM access_pairs WHERE user_id = ? AND patient = ?"
            " ORDER BY ts, seq LIMIT 1",
            pair,
        ).fetchone()
        if row is not None:
            found[pair] = (float(row[0]), int(row[1]))
    return found


_WINDOWS_PER_STATEMENT = 10_000
"""Windows read by one statement (three parameters each: under SQLite's limit of 32,766)."""


def accesses_of(
    conn: sqlite3.Connection, windows: Sequence[Window]
) -> Iterable[tuple[str, float, int, str]]:
    """(user, recorded time, row seq, ``patients`` column) of the events in each window
    (by that user as the requestor) that name a patient, admin reads left out, in user,
    time and seq order, read as they are iterated. The windows go to SQLite as a table of
    values, each a range of its user's ``a:`` term."""
    statements = []
    for start in range(0, len(windows), _WINDOWS_PER_STATEMENT):
        chunk = windows[start : start + _WINDOWS_PER_STATEMENT]
        values = ", ".join(["(?, ?, ?)"] * len(chunk))
        statements.append(
            conn.execute(
                f"WITH w(user, since, until) AS (VALUES {values})"
                " SELECT w.user, t.ts, t.seq, e.patients"
                " FROM w CROSS JOIN event_terms t CROSS JOIN events e"
                " WHERE t.term = 'a:' || w.user AND t.ts >= w.since AND t.ts <= w.until"
                " AND e.seq = t.seq AND e.user_id = w.user"
                " AND e.patients != '|' AND instr(e.terms, ?) = 0"
                " ORDER BY w.user, t.ts, t.seq",
                [*(v for window in chunk for v in window), f'"{Mark.ADMIN_ACCESS.term}"'],
            )
        )
    if len(statements) == 1:
        return statements[0]
    return sorted(row for statement in statements for row in statement)


def activity_of(conn: sqlite3.Connection, query: EventQuery) -> list[ActivityCount]:
    """The events ``query`` matches (its filters, not its order or paging), counted per
    quarter hour, action and outcome; slots with none are left out."""
    slots = rollup_slots(query)
    if slots is None:
        return _walked_activity(conn, query)
    where, args = rollup_where(query, *slots)
    counts = [
        ActivityCount(slot=int(slot), action=action, outcome=outcome, events=int(events))
        for slot, action, outcome, events in conn.execute(
            f"SELECT slot, action, outcome, SUM(events) FROM activity {where}"
            " GROUP BY slot, action, outcome HAVING SUM(events) > 0",
            args,
        )
    ]
    for edge in rollup_edges(query, *slots):  # the ragged ends, from the events
        counts += _walked_activity(conn, edge)
    return counts


def _walked_activity(conn: sqlite3.Connection, query: EventQuery) -> list[ActivityCount]:
    sql = SearchSql(query)
    count, count_args = sql.count()
    clause = f"WHERE {' AND '.join(sql.where)}" if sql.where else ""
    rows = conn.execute(
        f"SELECT CAST({sql.ts} / {SLOT_S} AS INTEGER), COALESCE(e.action, ''),"
        f" COALESCE(e.outcome, ''), {count} FROM {sql.source} {clause} GROUP BY 1, 2, 3",
        [*count_args, *sql.args],
    )
    return [
        ActivityCount(slot=int(s), action=a, outcome=o, events=int(n)) for s, a, o, n in rows if n
    ]


_MARKS = tuple(Mark)
_MARK_BITS = " | ".join(
    f"((instr(e.terms, '\"{mark.term}\"') > 0) << {bit})" for bit, mark in enumerate(_MARKS)
)
_MARKED = f"CASE WHEN instr(e.terms, '\"k:') = 0 THEN 0 ELSE {_MARK_BITS} END"
"""The marks among a row's terms as bits (bit ``n`` for ``_MARKS[n]``); a row with no
mark, most rows, is looked at once."""
_MARK_SETS = [
    frozenset(mark for bit, mark in enumerate(_MARKS) if bits >> bit & 1)
    for bits in range(1 << len(_MARKS))
]
"""The marks each value of ``_MARKED`` stands for."""


def _split(column: str) -> tuple[str, ...]:
    """The values of a ``|a|b|`` column."""
    return tuple(column[1:-1].split("|")) if column != "|" else ()


def indexed_of(conn: sqlite3.Connection, query: EventQuery) -> list[IndexedEvent]:
    """The events ``query`` matches, newest first, at most ``query.limit``, from their
    rows' columns (see :meth:`ReportReader.indexed`). Rows are stepped through until
    enough events are found: a fan-out row may give several or none."""
    sql = SearchSql(query)
    clause = f"WHERE {' AND '.join(sql.where)}" if sql.where else ""
    rows = conn.execute(
        f"SELECT e.seq, e.fan, {sql.ts}, e.user_id, e.patients, e.outcome, e.subtypes, e.who,"
        f" {_MARKED} FROM {sql.source} {clause} ORDER BY {sql.order.format(order='DESC')}",
        sql.args,
    )
    named = [v for v in (query.patient, query.entity) if v is not None]
    # The same columns recur (one patient's report names that patient in every row):
    # each is split once.
    split: dict[str, tuple[str, ...]] = {}
    found: list[IndexedEvent] = []
    for seq, fan, ts, user, patients, outcome, subtypes, who, marked in rows:
        codes = split.get(subtypes)
        if codes is None:
            codes = split[subtypes] = _split(subtypes)
        marks = _MARK_SETS[marked]
        if fan is None:
            own = split.get(patients)
            if own is None:
                own = split[patients] = _split(patients)
            found.append(
                IndexedEvent(
                    seq=seq,
                    ts=ts,
                    user=user,
                    patients=own,
                    outcome=outcome,
                    subtypes=codes,
                    who=who,
                    marks=marks,
                )
            )
        else:
            each = patients[1:-1].split("|")
            for i in reversed(members_named(each, named)):
                one = split.get(each[i])
                if one is None:
                    one = split[each[i]] = (each[i],)
                found.append(
                    IndexedEvent(
                        seq=seq - fan + 1 + i,
                        ts=ts,
                        user=user,
                        patients=one,
                        outcome=outcome,
                        subtypes=codes,
                        who=who,
                        marks=marks,
                    )
                )
        if len(found) >= query.limit:
            return found[: query.limit]
    return found


def rows_at(conn: sqlite3.Connection, seqs: Iterable[int]) -> list[StoredRow]:
    """The rows that hold the events ``seqs`` (each once; a fan-out's events share it)."""
    found: list[StoredRow] = []
    held: set[int] = set()
    for seq in seqs:
        if seq in held:
            continue
        rows = stored_rows(
            conn.execute(f"SELECT {STORED} FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (seq,))
        )
        if rows and seq in rows[0].seqs:
            found.append(rows[0])
            held.update(rows[0].seqs)
    return found


# --- the report face of one store file ------------------------------------------------------


class ShardReports(ShardPart, ReportReader):
    """The report face of one store file: each read one call on the shard's connection."""

    async def first_accesses(self, pairs: Sequence[Pair]) -> dict[Pair, Cursor]:
        conn = self._shard.conn
        wanted = list(dict.fromkeys(pairs))
        return await self._shard.run(lambda: first_access_of(conn, wanted))

    async def user_accesses(self, windows: Sequence[Window]) -> dict[str, list[UserAccess]]:
        conn = self._shard.conn
        return await self._shard.run(lambda: by_user(accesses_of(conn, windows)))

    async def activity(self, query: EventQuery) -> list[ActivityCount]:
        conn = self._shard.conn
        counts = await self._shard.run(lambda: activity_of(conn, query))
        return summed([counts])

    async def indexed(self, query: EventQuery) -> list[IndexedEvent]:
        conn = self._shard.conn
        return await self._shard.run(lambda: indexed_of(conn, query))

    async def events_at(self, seqs: Sequence[int]) -> list[QueuedEvent]:
        conn = self._shard.conn
        wanted = list(seqs)
        rows = await self._shard.run(lambda: rows_at(conn, wanted))
        by_seq = {e.seq: e for row in rows for e in self._shard.events(row)}
        return [by_seq[s] for s in wanted if s in by_seq]


def by_user(rows: Iterable[tuple[str, float, int, str]]) -> dict[str, list[UserAccess]]:
    """``accesses_of``'s rows (in user, time and seq order) by user, each row once."""
    found: dict[str, list[UserAccess]] = {}
    split: dict[str, tuple[str, ...]] = {}  # a user's rows name the same few patients
    own: list[UserAccess] = []
    last: str | None = None
    for user, ts, seq, patients in rows:
        if user != last:
            own = found.setdefault(user, [])
            last = user
        elif own[-1].seq == seq:  # the same row in two of the user's windows
            continue
        named = split.get(patients)
        if named is None:
            named = split[patients] = tuple(patients[1:-1].split("|"))
        own.append(UserAccess(ts=ts, seq=seq, patients=named))
    return found


def summed(shards: Sequence[Sequence[ActivityCount]]) -> list[ActivityCount]:
    """The counts of every shard added up per slot, action and outcome, in that order."""
    totals: dict[tuple[int, str, str], int] = {}
    for counts in shards:
        for item in counts:
            key = (item.slot, item.action, item.outcome)
            totals[key] = totals.get(key, 0) + item.events
    return [
        ActivityCount(slot=s, action=a, outcome=o, events=n)
        for (s, a, o), n in sorted(totals.items())
    ]
