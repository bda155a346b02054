"""The Merkle log's tree as the store keeps it: the table ``log_hashes`` of tile hashes
(level 0: every leaf hash; level L: the hash of each complete run of ``256**L`` leaves),
appended by the writer's ``append leaves`` step (:mod:`proxy.store.transaction`) and read
by the log's face (:mod:`proxy.store.log`). The tree's state is the table itself: nothing
is kept between commits, so a rolled-back batch leaves no trace.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson

from proxy.log.entry import entry_of_json
from proxy.log.tree import TILE_WIDTH, leaf_hash, root_of
from proxy.store.records import EventRow, FanOut, member_id

HASH_ROW_BYTES = 48
"""What a ``log_hashes`` row takes, about (a 32-byte hash and its key)."""

_ROWS_PER_INSERT = 500
"""Hash rows per multi-row INSERT (three parameters each)."""


def insert_hashes(
    conn: sqlite3.Connection, level: int, first: int, hashes: Sequence[bytes]
) -> None:
    """Store ``hashes`` at ``level`` from index ``first``."""
    for at in range(0, len(hashes), _ROWS_PER_INSERT):
        chunk = hashes[at : at + _ROWS_PER_INSERT]
        values = ", ".join(["(?, ?, ?)"] * len(chunk))
        args: list[object] = []
        for i, h in enumerate(chunk, start=first + at):
            args += (level, i, h)
        conn.execute(f"INSERT INTO log_hashes (level, idx, hash) VALUES {values}", args)


def stored_hashes(conn: sqlite3.Connection, level: int, start: int, end: int) -> list[bytes]:
    """The hashes of ``level`` with index in ``[start, end)``, in order."""
    return [
        h
        for (h,) in conn.execute(
            "SELECT hash FROM log_hashes WHERE level = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (level, start, end),
        )
    ]


def tree_size(conn: sqlite3.Connection) -> int:
    """Leaves in the tree."""
    # Not MAX(idx): with the level constrained SQLite would read every leaf for it.
    last = conn.execute(
        "SELECT idx FROM log_hashes WHERE level = 0 ORDER BY idx DESC LIMIT 1"
    ).fetchone()
    return 0 if last is None else int(last[0]) + 1


def append_hashes(conn: sqlite3.Connection, first: int, leaves: Sequence[bytes]) -> None:
    """Store ``leaves`` as leaves ``first`` on, and the hash of every tile they complete,
    at every level."""
    level, before, added = 0, first, list(leaves)
    while added:
        insert_hashes(conn, level, before, added)
        after = before + len(added)
        upper = []
        for tile in range(before // TILE_WIDTH, after // TILE_WIDTH):
            lo = tile * TILE_WIDTH
            known = stored_hashes(conn, level, lo, before) if lo < before else []
            known += added[max(0, lo - before) : lo + TILE_WIDTH - before]
            upper.append(root_of(known))
        level, before, added = level + 1, before // TILE_WIDTH, upper


def event_leaves(fan: int | None, row: EventRow) -> list[bytes]:
    """The leaf hashes of a new row's events. A fan-out's events differ only in their id
    and one patient's reference: the first event's entry is made, and each other's from
    it by putting its own id and reference in their places, when each occurs in the entry
    once as a whole JSON string (else each entry is made on its own)."""
    if fan is None:
        return [leaf_hash(entry_of_json(row.body))]
    fanned = FanOut.from_stored(row)
    first_id, first_json = fanned.event(0)
    entry = entry_of_json(first_json)
    id_token = orjson.dumps(first_id)
    patient_token = orjson.dumps(fanned.patients[0])
    if entry.count(id_token) != 1 or entry.count(patient_token) != 1:
        return [leaf_hash(entry_of_json(fanned.event(i)[1])) for i in range(fan)]
    hashes = [leaf_hash(entry)]
    for i in range(1, fan):
        own = entry.replace(id_token, orjson.dumps(member_id(first_id, i)))
        hashes.append(leaf_hash(own.replace(patient_token, orjson.dumps(fanned.patients[i]))))
    return hashes
