"""What the privacy reports and the activity chart read from the store, beyond a search:
a user's first access to a patient, a user's accesses in a time window, and events
counted over time. Each is SQL over one store's tables (``access_pairs``, ``activity``
and ``event_terms``, kept by triggers, proxy/store/schema.py) run on its reader
connection; :class:`StoreReports` runs it on every shard and merges the answers, naming
events by their global seq (proxy/store/shards.py) as searches do.

What each costs, in index work (``n`` the events in the store):

- :meth:`StoreReports.first_accesses`: one seek into ``access_pairs`` per (user,
  patient) pair, ``O(log n)`` however long either's history.
- :meth:`StoreReports.user_accesses`: one range of the user's ``a:`` term per window, a
  row read for each of the user's events in it.
- :meth:`StoreReports.activity`: with no filter but the date range, action, outcome and
  the admin-access mark, a range of ``activity`` (a row per quarter hour, action and
  outcome present); with any other filter, the search's own walk (a term's range, or the
  date range of ``events_recorded``), grouped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from proxy.store.marks import Mark
from proxy.store.queue import AuditQueue
from proxy.store.records import Cursor, EventQuery
from proxy.store.search import SLOT_S, SearchSql, rollup_edges, rollup_slots, rollup_where
from proxy.store.shards import ShardedStore

T = TypeVar("T")

Pair = tuple[str, str]
"""(user id, patient reference)."""


@dataclass(frozen=True, slots=True)
class UserAccess:
    """One of a user's events, as far as counting the patients they touched needs."""

    ts: float
    """``recorded`` as a POSIX timestamp."""
    seq: int
    """The global seq of its row (a fan-out row: its last event's)."""
    patients: tuple[str, ...]
    """Every patient the row names (a fan-out row: all its events' patients)."""


@dataclass(frozen=True, slots=True)
class ActivityCount:
    """How many events of one action and outcome were recorded in one quarter hour."""

    slot: int
    """The quarter hour: its start is ``slot * SLOT_S`` (POSIX time)."""
    action: str
    """``AuditEvent.action`` (empty when the event has none)."""
    outcome: str
    """The outcome code (empty when the event has none)."""
    events: int


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


Window = tuple[str, float, float]
"""(user id, since, until): a user's events recorded in ``[since, until]``."""


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
        ActivityCount(int(slot), action, outcome, int(events))
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
    return [ActivityCount(int(s), a, o, int(n)) for s, a, o, n in rows if n]


# --- every shard ------------------------------------------------------------------------------


class StoreReports:
    """The report reads over a store, or over every shard of a sharded one."""

    def __init__(self, store: AuditQueue | ShardedStore) -> None:
        self._store = store

    async def _each(self, fn: Callable[[sqlite3.Connection], T]) -> list[tuple[int, int, T]]:
        """``fn`` on each shard: (shard number, shard count, answer)."""
        if isinstance(self._store, ShardedStore):
            count = self._store.count
            return [(n, count, await shard.read(fn)) for n, shard in await self._store.readers()]
        return [(0, 1, await self._store.read(fn))]

    async def first_accesses(self, pairs: Sequence[Pair]) -> dict[Pair, Cursor]:
        """For each (user, patient) pair that has any, the position (recorded time,
        global row seq) of the user's first access to the patient in the retained
        history. An event of that user about that patient is the first access when no
        position precedes its own (recorded time, global seq)."""
        wanted = list(dict.fromkeys(pairs))
        best: dict[Pair, Cursor] = {}
        for shard, count, found in await self._each(lambda c: first_access_of(c, wanted)):
            for pair, (ts, seq) in found.items():
                position = (ts, seq * count + shard)
                if pair not in best or position < best[pair]:
                    best[pair] = position
        return best

    async def user_accesses(self, windows: Sequence[Window]) -> dict[str, list[UserAccess]]:
        """Each user's events recorded in that user's windows that name a patient,
        admin reads left out, each once, in time order. One read of each shard."""
        found: dict[str, dict[int, UserAccess]] = {}
        for shard, count, rows in await self._each(lambda c: accesses_of(c, windows)):
            for user, ts, seq, patients in rows:
                global_seq = seq * count + shard
                found.setdefault(user, {})[global_seq] = UserAccess(
                    ts, global_seq, tuple(patients[1:-1].split("|"))
                )
        return {
            user: sorted(own.values(), key=lambda access: (access.ts, access.seq))
            for user, own in found.items()
        }

    async def activity(self, query: EventQuery) -> list[ActivityCount]:
        """The events ``query`` matches counted per quarter hour, action and outcome,
        over every shard."""
        totals: dict[tuple[int, str, str], int] = {}
        for _, _, counts in await self._each(lambda c: activity_of(c, query)):
            for item in counts:
                key = (item.slot, item.action, item.outcome)
                totals[key] = totals.get(key, 0) + item.events
        return [ActivityCount(s, a, o, n) for (s, a, o), n in sorted(totals.items())]
