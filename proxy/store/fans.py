"""Rows that hold several events: a :class:`~proxy.store.records.FanOut` as the store
keeps it, and how its events are named, read and set apart.

A fan-out of ``n`` events is one ``events`` row with ``fan = n`` (schema migration 6). Its
seq is its last event's; its events' seqs are ``seq - n + 1`` to ``seq``, and no other row
takes the ones below it (the writer gives a fan-out's seq, SQLite numbers other rows after
the highest). Their ids are one UUID numbered in its last four hex digits
(:func:`~proxy.store.records.member_id`). So the rest of the proxy names each event by its
own seq and id as if it had a row, and one row costs the store one insert and one index
entry per term instead of ``n``.

The events of a row share their delivery state. When a delivery update names only some
of them (a batch boundary, a repository that rejects one), :func:`rows_for` first splits
the row into one row per event, at the seqs they already had, so ordering is unchanged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence

from proxy.store.codec import BodyCodec
from proxy.store.records import EventRow, FanOut, member_id
from proxy.store.tables import SELECT_LEAF, SELECT_ROW, SELECT_STATE, SPLIT_INSERT, DeliveryState

_SPAN_SCAN = 16
"""Seqs looked up by one range scan (rather than one lookup per row) while the span of
the seqs named is at most this many times their number."""


def fan_of(event_id: str, patients: str, template: bytes) -> FanOut:
    """The fan-out of a stored row, enough of it to make its events' JSON
    (:meth:`FanOut.event`): its first id, ``patients`` column and decompressed body."""
    row = EventRow(
        event_id=event_id,
        recorded="",
        recorded_ts=0.0,
        action=None,
        outcome=None,
        subtypes="",
        patients=patients,
        user_id=None,
        body=template,
        terms="",
        type_code=None,
        entity_types="",
        request_id=None,
        updated_ts=0.0,
        who=None,
    )
    return FanOut.from_stored(row)


def members_named(patients: Sequence[str], named: Collection[str]) -> list[int]:
    """The positions of a fan-out's events (one per patient of ``patients``) that a
    search whose patient and entity filters name ``named`` finds: those whose patient
    each of them is, or names none of the row's patients."""
    held = set(patients)
    return [i for i, p in enumerate(patients) if all(v == p or v not in held for v in named)]


def lookup_ids(event_id: str) -> tuple[str, int] | None:
    """Where else to look for ``event_id`` when no row has it, if it may be a fan-out's
    event other than the first (a UUID not ending in ``0000``): the id of the row that
    would hold it (its fan-out's first event's) and its position there."""
    if len(event_id) != 36 or event_id[8] != "-":
        return None
    try:
        index = int(event_id[-4:], 16)
    except ValueError:
        return None
    return (member_id(event_id, 0), index) if index > 0 else None


def rows_for(conn: sqlite3.Connection, codec: BodyCodec, seqs: Sequence[int]) -> list[int]:
    """The seqs of the rows that hold exactly the events ``seqs`` (seqs no event has are
    left out). A fan-out row only some of whose events are named is first split into a
    row per event. Runs inside the caller's write transaction."""
    wanted = sorted(set(seqs))
    if not wanted:
        return []
    lo, hi = wanted[0], wanted[-1]
    if hi - lo <= _SPAN_SCAN * len(wanted):
        rows: list[tuple[int, int | None]] = conn.execute(
            "SELECT seq, fan FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq", (lo, hi)
        ).fetchall()
        if not rows or rows[-1][0] != hi:  # the last may be in a fan-out's row above it
            after = conn.execute(
                "SELECT seq, fan FROM events WHERE seq > ? ORDER BY seq LIMIT 1", (hi,)
            ).fetchone()
            rows.extend([after] if after else [])
    else:
        rows = []
        for s in wanted:
            if rows and s <= rows[-1][0]:
                continue
            row = conn.execute(
                "SELECT seq, fan FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (s,)
            ).fetchone()
            if row is None:
                break
            rows.append(row)
    out: list[int] = []
    at = 0
    for seq, fan in rows:
        first = seq - (fan or 1) + 1
        while at < len(wanted) and wanted[at] < first:
            at += 1  # no event has it
        named = []
        while at < len(wanted) and wanted[at] <= seq:
            named.append(wanted[at])
            at += 1
        if not named:
            continue
        if fan is None or len(named) == fan:
            out.append(seq)
        else:
            split(conn, codec, seq)
            out.extend(named)
    return out


def split(conn: sqlite3.Connection, codec: BodyCodec, seq: int) -> None:
    """Replace the fan-out row ``seq`` by a row per event, each at its own seq and leaf,
    with the fan-out's delivery state."""
    stored = EventRow._make(conn.execute(SELECT_ROW, (seq,)).fetchone())
    state = DeliveryState._make(conn.execute(SELECT_STATE, (seq,)).fetchone())
    leaf, hashes = conn.execute(SELECT_LEAF, (seq,)).fetchone()
    fan = FanOut.from_stored(stored._replace(body=codec.decompress(stored.body)))
    conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
    first = seq - len(fan.patients) + 1
    rows = fan.rows()
    bodies = codec.compress_many([row.body for row in rows])
    conn.executemany(
        SPLIT_INSERT,
        [
            (
                first + i,
                None if leaf is None else leaf + i,
                None if hashes is None else hashes[32 * i : 32 * i + 32],
                *row._replace(body=body),
                *state,
            )
            for i, (row, body) in enumerate(zip(rows, bodies, strict=True))
        ],
    )
