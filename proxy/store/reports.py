"""What the privacy reports and the activity chart read from the store, beyond a search:
a user's first access to a patient, a user's accesses in a time window, and events
counted over time: the report face (:class:`~proxy.store.faces.ReportReader`) of one
store file, :class:`ShardReports`. Each read is SQL over the store's tables
(``access_pairs``, ``activity`` and ``event_terms``, kept by triggers,
proxy/store/schema.py) on the shard's reading connection; several shards are merged by
:class:`~proxy.store.shards.ShardedStore`, naming rows by their global seq as searches do.

What each costs, in index work (``n`` the events in the store):

- ``first_accesses``: one seek into ``access_pairs`` per (user, patient) pair,
  ``O(log n)`` however long either's history.
- ``user_accesses``: one range of the user's ``a:`` term per window, a row read for each
  of the user's events in it.
- ``activity``: with no filter but the date range, action, outcome and
  the admin-access mark, a range of ``activity`` (a row per quarter hour, action and
  outcome present); with any other filter, the search's own walk (a term's range, or the
  date range of ``events_recorded``), grouped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from proxy.store.faces import ReportReader
from proxy.store.marks import Mark
from proxy.store.records import ActivityCount, Cursor, EventQuery, Pair, UserAccess, Window
from proxy.store.search import SLOT_S, SearchSql, rollup_edges, rollup_slots, rollup_where
from proxy.store.shard import ShardPart

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


def accesses_of(
    conn: sqlite3.Connection, windows: Sequence[Window]
) -> list[tuple[str, float, int, str]]:
    """(user, recorded time, row seq, ``patients`` column) of the events in each window
    (by that user as the requestor) that name a patient, admin reads left out."""
    out: list[tuple[str, float, int, str]] = []
    for user, since, until in windows:
        out += [
            (user, ts, seq, patients)
            for ts, seq, patients in conn.execute(
                "SELECT t.ts, t.seq, e.patients FROM event_terms t"
                " JOIN events e ON e.seq = t.seq"
                " WHERE t.term = ? AND t.ts >= ? AND t.ts <= ? AND e.user_id = ?"
                " AND e.patients != '|' AND instr(e.terms, ?) = 0",
                (f"a:{user}", since, until, user, f'"{Mark.ADMIN_ACCESS.term}"'),
            )
        ]
    return out


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


# --- the report face of one store file ------------------------------------------------------


class ShardReports(ShardPart, ReportReader):
    """The report face of one store file: each read one call on the shard's connection."""

    async def first_accesses(self, pairs: Sequence[Pair]) -> dict[Pair, Cursor]:
        conn = self._shard.conn
        wanted = list(dict.fromkeys(pairs))
        return await self._shard.run(lambda: first_access_of(conn, wanted))

    async def user_accesses(self, windows: Sequence[Window]) -> dict[str, list[UserAccess]]:
        conn = self._shard.conn
        rows = await self._shard.run(lambda: accesses_of(conn, windows))
        return by_user(rows, count=1, shard=0)

    async def activity(self, query: EventQuery) -> list[ActivityCount]:
        conn = self._shard.conn
        counts = await self._shard.run(lambda: activity_of(conn, query))
        return summed([counts])


def by_user(
    rows: Sequence[tuple[str, float, int, str]], *, count: int, shard: int
) -> dict[str, list[UserAccess]]:
    """``accesses_of``'s rows of shard ``shard`` (of ``count``), by user, each row once
    under its global seq, in time order."""
    found: dict[str, dict[int, UserAccess]] = {}
    for user, ts, seq, patients in rows:
        global_seq = seq * count + shard
        found.setdefault(user, {})[global_seq] = UserAccess(
            ts=ts, seq=global_seq, patients=tuple(patients[1:-1].split("|"))
        )
    return {
        user: sorted(own.values(), key=lambda access: (access.ts, access.seq))
        for user, own in found.items()
    }


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
