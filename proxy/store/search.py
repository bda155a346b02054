"""The SQL of an admin search over the queue's tables (``events`` and the ``event_terms``
index kept by triggers, proxy/store/schema.py), before keyset bounds and paging, which
``ShardReader.search_page`` (proxy/store/reads.py) adds."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any

from proxy.store.records import Cursor, EventQuery, SortKey

_TERM_FILTERS = (
    ("e:", "patient"),
    ("e:", "entity"),
    ("a:", "address"),
    ("a:", "agent"),
    ("r:", "resource_type"),
)
"""Filters answered by ``event_terms``, most selective first: the first one present
drives the walk, the others are checked by primary key."""


SLOT_S = 900
"""The ``activity`` table's resolution, seconds (schema migration 7): a quarter hour, so
that an hour or a day in any time zone (offsets are whole quarter hours) is whole slots."""

_ROLLUP_FREE = (
    "patient",
    "user",
    "agent",
    "entity",
    "entity_type",
    "event_type",
    "address",
    "resource_type",
    "request_id",
    "subtype",
    "updated_from",
    "updated_to",
)
"""Filters the ``activity`` table cannot answer."""
_ROLLUP_MARK = "admin-access"
"""The one mark ``activity`` counts apart (its ``admin`` column)."""


def rollup_slots(query: EventQuery) -> tuple[int | None, int | None] | None:
    """The whole quarter hours (first slot, slot past the last; None: unbounded) whose
    matches the ``activity`` table can count for ``query``, or None when it cannot: a
    filter it does not hold, or a date range within one slot."""
    if any(getattr(query, name) is not None for name in _ROLLUP_FREE):
        return None
    if not {*query.marked, *query.unmarked} <= {_ROLLUP_MARK}:
        return None
    first = math.ceil(query.date_from.timestamp() / SLOT_S) if query.date_from else None
    end = math.floor(query.date_to.timestamp() / SLOT_S) if query.date_to else None
    if first is not None and end is not None and first >= end:
        return None
    return first, end


def rollup_where(query: EventQuery, first: int | None, end: int | None) -> tuple[str, list[Any]]:
    """The WHERE clause selecting the ``activity`` rows of ``query``'s whole slots."""
    where: list[str] = []
    args: list[Any] = []
    for condition, bound in (("slot >= ?", first), ("slot < ?", end)):
        if bound is not None:
            where.append(condition)
            args.append(bound)
    for column, value in (("action", query.action), ("outcome", query.outcome)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if _ROLLUP_MARK in query.marked:
        where.append("admin = 1")
    if _ROLLUP_MARK in query.unmarked:
        where.append("admin = 0")
    return (f"WHERE {' AND '.join(where)}" if where else ""), args


def rollup_edges(query: EventQuery, first: int | None, end: int | None) -> list[EventQuery]:
    """The parts of ``query``'s date range outside its whole slots, as queries."""
    edges = []
    low = query.date_from.timestamp() if query.date_from is not None else None
    high = query.date_to.timestamp() if query.date_to is not None else None
    if low is not None and first is not None and low < first * SLOT_S:
        edges.append(dataclasses.replace(query, date_to=_instant(first * SLOT_S)))
    if high is not None and end is not None and high > end * SLOT_S:
        edges.append(dataclasses.replace(query, date_from=_instant(end * SLOT_S)))
    return edges


def _instant(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def total_statement(query: EventQuery) -> tuple[str, list[Any]]:
    """The statement counting every event ``query`` matches, and its args. Where the
    ``activity`` counts hold the filters, whole quarter hours are read from them and
    only the range's ragged ends from the events."""
    slots = rollup_slots(query)
    if slots is None:
        return SearchSql(query).total()
    where, args = rollup_where(query, *slots)
    parts = [f"(SELECT COALESCE(SUM(events), 0) FROM activity {where})"]
    for edge in rollup_edges(query, *slots):
        sql, edge_args = SearchSql(edge).total()
        parts.append(f"({sql})")
        args += edge_args
    return "SELECT " + " + ".join(parts), args


class SearchSql:
    """The FROM (``source``), WHERE (``where`` with ``args``) and ORDER BY (``order``, an
    ``{order}`` placeholder for ASC/DESC) of a search; :meth:`after` gives a keyset bound.
    Rows are selected as ``e`` (events)."""

    def __init__(self, query: EventQuery) -> None:
        terms = [
            f"{prefix}{getattr(query, name)}"
            for prefix, name in _TERM_FILTERS
            if getattr(query, name) is not None
        ]
        terms += [f"k:{mark}" for mark in query.marked]
        self.where: list[str] = []
        self.args: list[Any] = []
        by_date = query.sort is SortKey.RECORDED
        if terms and by_date:
            self.source = "event_terms t JOIN events e ON e.seq = t.seq"
            ts, seq = "t.ts", "t.seq"
            self.where.append("t.term = ?")
            self.args.append(terms.pop(0))
        else:
            self.source = "events e"
            ts, seq = "e.recorded_ts", "e.seq"
        self.ts = ts
        """The column holding each row's recorded time in :attr:`source`."""
        for term in terms:
            if by_date:
                self.where.append(
                    "EXISTS (SELECT 1 FROM event_terms x WHERE x.term = ? AND x.ts = "
                    f"{ts} AND x.seq = {seq})"
                )
            else:  # let the planner take the term's rows first, then sort by seq
                self.where.append("e.seq IN (SELECT seq FROM event_terms WHERE term = ?)")
            self.args.append(term)
        for mark in query.unmarked:
            if by_date:
                self.where.append(
                    "NOT EXISTS (SELECT 1 FROM event_terms x WHERE x.term = ? AND x.ts = "
                    f"{ts} AND x.seq = {seq})"
                )
            else:
                self.where.append("e.seq NOT IN (SELECT seq FROM event_terms WHERE term = ?)")
            self.args.append(f"k:{mark}")
        for column, value in (
            ("e.user_id", query.user),
            ("e.action", query.action),
            ("e.outcome", query.outcome),
            ("e.type_code", query.event_type),
        ):
            if value is not None:
                self.where.append(f"{column} = ?")
                self.args.append(value)
        for column, value in (("e.subtypes", query.subtype), ("e.entity_types", query.entity_type)):
            if value is not None:
                self.where.append(f"{column} LIKE ? ESCAPE '\\'")
                self.args.append(f"%|{_like_escaped(value)}|%")
        if query.request_id is not None:
            self.where.append("e.request_id LIKE ? ESCAPE '\\'")
            self.args.append(f"%{_like_escaped(query.request_id)}%")
        for column, low, high in (
            (ts, query.date_from, query.date_to),
            ("e.updated_ts", query.updated_from, query.updated_to),
        ):
            if low is not None:
                self.where.append(f"{column} >= ?")
                self.args.append(low.timestamp())
            if high is not None:
                self.where.append(f"{column} < ?")
                self.args.append(high.timestamp())
        self._named = list(dict.fromkeys(v for v in (query.patient, query.entity) if v is not None))
        self._by_date = by_date
        if by_date:
            self._key = f"({ts}, {seq})"
            self.order = f"{ts} {{order}}, {seq} {{order}}"
        else:
            self._key = seq
            self.order = f"{seq} {{order}}"

    def count(self) -> tuple[str, list[Any]]:
        """What counts the matching events, and its args (before :attr:`args`): a fan-out
        row (``fan`` events) counts as all its events, or as its one event of a patient a
        filter names, or as none if filters name two of its patients."""
        patients = [f"|{v}|" for v in self._named]
        if not patients:
            return "COALESCE(SUM(COALESCE(e.fan, 1)), 0)", []
        named = " OR ".join(["instr(e.patients, ?)"] * len(patients))
        if len(patients) == 1:
            expr = f"CASE WHEN e.fan IS NULL OR {named} THEN 1 ELSE e.fan END"
            return f"COALESCE(SUM({expr}), 0)", patients
        expr = (
            "CASE WHEN e.fan IS NULL THEN 1"
            " WHEN instr(e.patients, ?) AND instr(e.patients, ?) THEN 0"
            f" WHEN {named} THEN 1 ELSE e.fan END"
        )
        return f"COALESCE(SUM({expr}), 0)", [*patients, *patients]

    def total(self) -> tuple[str, list[Any]]:
        """The statement counting the matching events by walking them, and its args."""
        count, count_args = self.count()
        clause = f"WHERE {' AND '.join(self.where)}" if self.where else ""
        return f"SELECT {count} FROM {self.source} {clause}", [*count_args, *self.args]

    def after(self, cursor: Cursor, descending: bool) -> tuple[str, list[Any]]:
        """The condition for rows past ``cursor`` in the given direction, and its args."""
        op = "<" if descending else ">"
        if self._by_date:
            return f"{self._key} {op} (?, ?)", [cursor[0], cursor[1]]
        return f"{self._key} {op} ?", [cursor[1]]


def _like_escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
