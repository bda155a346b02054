"""The Merkle log's step of the writer's transaction (:mod:`proxy.store.transaction`):
each new event's leaf, appended in the commit that stores the event, so that no event is
acknowledged without its leaf.

Prepare makes each event's entry and leaf hash (:mod:`proxy.log.entry`,
:mod:`proxy.log.tree`), a fan-out's events one by one, in queue order. Write reads where
the tree ends, inserts the leaf hashes (level 0 of ``log_hashes``) and the hash of every
tile they complete at each level above, and leaves each row's first leaf index on the
transaction for ``insert events``. The tree's state is the table itself: nothing is kept
between commits, so a rolled-back batch leaves no trace.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from proxy.log.entry import entry_of_json
from proxy.log.tree import TILE_WIDTH, leaf_hash, root_of
from proxy.store.records import FanOut

if TYPE_CHECKING:
    from proxy.store.transaction import Transaction

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
    (size,) = conn.execute(
        "SELECT COALESCE(MAX(idx) + 1, 0) FROM log_hashes WHERE level = 0"
    ).fetchone()
    return int(size)


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


class AppendLeaves:
    """The leaves of the batch's events, and the tiles they complete."""

    name: ClassVar[str] = "append leaves"

    def __init__(self, tx: Transaction) -> None:
        hashes: list[bytes] = []
        for new in tx.rows:
            if new.fan is None:
                hashes.append(leaf_hash(entry_of_json(new.row.body)))
            else:
                fan = FanOut.from_stored(new.row)
                hashes += [leaf_hash(entry_of_json(fan.event(i)[1])) for i in range(new.fan)]
        self._hashes = hashes
        if hashes:
            tx.plan(statements=2, incoming=HASH_ROW_BYTES * len(hashes))

    def write(self, tx: Transaction) -> None:
        if not self._hashes:
            return
        first = tree_size(tx.conn)
        leaves = []
        at = first
        for new in tx.rows:
            leaves.append(at)
            at += new.fan or 1
        tx.leaves = leaves
        append_hashes(tx.conn, first, self._hashes)
