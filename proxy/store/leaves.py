"""The Merkle log's tree as the store keeps it, appended by the writer's ``append leaves``
step (:mod:`proxy.store.transaction`) and read by the log's face (:mod:`proxy.store.log`)
and ``log verify``.

A leaf hash is first kept in its event's row (``events.leaf_hashes``, a fan-out row's
events' one after the other), which the commit writes anyway. The commit that completes a
tile of 256 leaves writes it as one row of ``log_tiles`` (its leaf hashes joined), and the
hash of each complete run of ``256**L`` leaves at level L of ``log_hashes``. Level 0 of
``log_hashes`` holds the leaf hashes pruning copies out of the rows of a tile not yet
complete, and the tiles completed before schema 10. A commit so adds to the write-ahead
log only once every 256 leaves, two rows. The tree's state is the tables themselves:
nothing is kept between commits, so a rolled-back batch leaves no trace.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson

from proxy.log.entry import EntryTemplate, entry_of_json
from proxy.log.tree import TILE_WIDTH, leaf_hash, root_of, split_hashes
from proxy.store.records import EventRow, FanOut, member_id

HASH_BYTES = 66
"""What a leaf hash adds to the store, about: 32 bytes in its row, 32 in its tile's row
once the tile is complete, and that row's and the level-1 hash's share."""

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
    """Leaves in the tree: past the newest row's, or past the last tile or hash kept when
    pruning took the newest rows."""
    # Not MAX(idx) at level 0: with the level constrained SQLite would read every leaf.
    hashed, tiled, newest = conn.execute(
        "SELECT (SELECT idx + 1 FROM log_hashes WHERE level = 0 ORDER BY idx DESC LIMIT 1),"
        " (SELECT (MAX(idx) + 1) * ? FROM log_tiles),"
        " (SELECT leaf + COALESCE(fan, 1) FROM events ORDER BY seq DESC LIMIT 1)",
        (TILE_WIDTH,),
    ).fetchone()
    return max(hashed or 0, tiled or 0, newest or 0)


def complete_tiles(conn: sqlite3.Connection, first: int, last: int) -> dict[int, bytes]:
    """The complete level-0 tiles of ``log_tiles`` with index in ``[first, last]``: each
    its 256 leaf hashes joined."""
    return dict(
        conn.execute(
            "SELECT idx, hashes FROM log_tiles WHERE idx >= ? AND idx <= ?", (first, last)
        ).fetchall()
    )


def seq_of_leaf(conn: sqlite3.Connection, leaf: int) -> int:
    """A seq from which the rows that hold ``leaf`` and the leaves after it begin (leaves
    grow with seqs; rows from before the log, with no leaf, come first), by bisection."""
    # Two subqueries: SQLite's one-seek shortcut for MIN or MAX does not apply to a query
    # asking both, which reads every row.
    lo, hi = conn.execute(
        "SELECT COALESCE((SELECT MIN(seq) FROM events), 0),"
        " COALESCE((SELECT MAX(seq) FROM events), 0)"
    ).fetchone()
    while lo < hi:
        mid = (lo + hi) // 2
        found = conn.execute(
            "SELECT seq, COALESCE(leaf + COALESCE(fan, 1) - 1, -1) FROM events"
            " WHERE seq >= ? ORDER BY seq LIMIT 1",
            (mid,),
        ).fetchone()
        if found is None or found[1] >= leaf:
            hi = mid
        else:
            lo = found[0] + 1
    return int(lo)


def leaf_hashes(conn: sqlite3.Connection, start: int, end: int) -> list[bytes]:
    """The leaf hashes of leaves ``[start, end)`` as far as they are kept without a gap:
    from the complete tiles, from ``log_hashes``, and from the events' rows for the rest."""
    found: dict[int, bytes] = {}
    if start < end:
        for tile, joined in complete_tiles(
            conn, start // TILE_WIDTH, (end - 1) // TILE_WIDTH
        ).items():
            for leaf, digest in enumerate(split_hashes(joined), start=tile * TILE_WIDTH):
                if start <= leaf < end:
                    found[leaf] = digest
    if len(found) < end - start:
        for leaf, digest in conn.execute(
            "SELECT idx, hash FROM log_hashes WHERE level = 0 AND idx >= ? AND idx < ?",
            (start, end),
        ):
            found.setdefault(leaf, digest)
    if len(found) < end - start:
        for leaf, fan, hashes in conn.execute(
            "SELECT leaf, COALESCE(fan, 1), leaf_hashes FROM events WHERE seq >= ? ORDER BY seq",
            (seq_of_leaf(conn, start),),
        ):
            if leaf is None or hashes is None:
                continue
            if leaf >= end:
                break
            for i in range(fan):
                found.setdefault(leaf + i, bytes(hashes[32 * i : 32 * i + 32]))
    out = []
    for leaf in range(start, end):
        if leaf not in found:
            break
        out.append(found[leaf])
    return out


def tile_hashes(conn: sqlite3.Connection, level: int, start: int, end: int) -> list[bytes]:
    """The hashes of tile level ``level`` with index in ``[start, end)`` kept without a
    gap, in order."""
    if level == 0:
        return leaf_hashes(conn, start, end)
    return stored_hashes(conn, level, start, end)


def append_leaves(
    conn: sqlite3.Connection,
    first: int,
    leaves: Sequence[bytes],
    partial: Sequence[bytes] | None = None,
) -> None:
    """Inside the writer's transaction, before the rows of ``leaves`` (leaves ``first``
    on) are inserted: write every tile they complete to ``log_tiles``, with the hashes of
    the tiles above it they complete in turn. ``partial``: the leaf hashes of the tile
    ``first`` is in, before it, when the caller knows them (else they are read)."""
    end = first + len(leaves)
    roots = []
    for tile in range(first // TILE_WIDTH, end // TILE_WIDTH):
        lo = tile * TILE_WIDTH
        if lo >= first:
            hashes = []
        elif partial is not None and len(partial) == first - lo:
            hashes = list(partial)
        else:
            hashes = leaf_hashes(conn, lo, first)
        hashes += leaves[max(0, lo - first) : lo + TILE_WIDTH - first]
        # Pruning may have copied some of them out of their rows: the tile holds them now.
        conn.execute(
            "DELETE FROM log_hashes WHERE level = 0 AND idx >= ? AND idx < ?",
            (lo, lo + TILE_WIDTH),
        )
        conn.execute("INSERT INTO log_tiles (idx, hashes) VALUES (?, ?)", (tile, b"".join(hashes)))
        roots.append(root_of(hashes))
    if roots:
        append_hashes(conn, 1, first // TILE_WIDTH, roots)


def append_hashes(
    conn: sqlite3.Connection, level: int, first: int, hashes: Sequence[bytes]
) -> None:
    """Store ``hashes`` at tile level ``level`` from index ``first``, and the hash of every
    tile they complete, at every level above."""
    before, added = first, list(hashes)
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


def template_leaves(template: EntryTemplate, fan: int | None, row: EventRow) -> list[bytes]:
    """The leaf hashes of a new row's events, their entries joined by ``template``: a
    row's patients (``|a|b|``) are those its event names, a fan-out's one each."""
    patients = row.patients[1:-1].split("|") if row.patients != "|" else []
    if fan is None:
        return [leaf_hash(template.entry(row.event_id, patients))]
    ids = [member_id(row.event_id, i) for i in range(len(patients))]
    return template.one_patient_leaves(ids, patients)


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
