"""The Merkle log of one store file as its readers and its checkpointer use it
(:class:`~proxy.store.faces.TransparencyLog`): the tree's size and root, its tile hashes,
the events of a range of leaves, and the signed checkpoints with their shipping state.

The leaves themselves are written by the writer process (:mod:`proxy.store.leaves`); the
checkpoints, like delivery bookkeeping, on the shard's second connection. A root is made
from the stored tile hashes of the tree's compact range (:func:`proxy.log.tree.tree_root`),
in the same read transaction as the size it is the root of.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from proxy.log.tree import TILE_WIDTH, tree_root
from proxy.store.faces import TransparencyLog
from proxy.store.leaves import seq_of_leaf, tile_hashes, tree_size
from proxy.store.records import QueuedEvent
from proxy.store.shard import ShardPart
from proxy.store.tables import STORED, StoredRow, stored_rows


def record_pruned(
    conn: sqlite3.Connection, deleted: Sequence[tuple[int, int, bytes | None]]
) -> None:
    """For pruned rows (each its first leaf, its number of events and their leaf hashes):
    keep the leaf hashes of those in a tile not yet complete (only the rows hold them; a
    complete tile's row holds the others), and the leaf ranges, merged where they touch,
    so that ``log verify`` tells a pruned event from a deleted one."""
    if not deleted:
        return
    # Which tiles are complete, not their hashes: a day's pruning may span thousands.
    complete = {
        idx
        for (idx,) in conn.execute(
            "SELECT idx FROM log_tiles WHERE idx >= ? AND idx <= ?",
            (
                min(leaf for leaf, _, _ in deleted) // TILE_WIDTH,
                max(leaf + n - 1 for leaf, n, _ in deleted) // TILE_WIDTH,
            ),
        )
    }
    conn.executemany(
        "INSERT OR IGNORE INTO log_hashes (level, idx, hash) VALUES (0, ?, ?)",
        [
            (leaf + i, hashes[32 * i : 32 * i + 32])
            for leaf, n, hashes in deleted
            if hashes is not None
            for i in range(n)
            if (leaf + i) // TILE_WIDTH not in complete
        ],
    )
    ranges: list[list[int]] = []
    for leaf, n, _ in sorted(deleted):
        if ranges and leaf <= ranges[-1][1] + 1:
            ranges[-1][1] = max(ranges[-1][1], leaf + n - 1)
        else:
            ranges.append([leaf, leaf + n - 1])
    conn.executemany(
        "INSERT OR REPLACE INTO log_pruned (first, last) VALUES (?, ?)",
        [tuple(r) for r in ranges],
    )


def read_tree_head(conn: sqlite3.Connection) -> tuple[int, bytes]:
    """The tree's size and root, read in one transaction (the caller's, if one is open)."""
    size = tree_size(conn)

    def read(level: int, start: int, count: int) -> list[bytes]:
        hashes = tile_hashes(conn, level, start, start + count)
        if len(hashes) != count:
            raise sqlite3.DatabaseError(
                f"the log's tile hashes at level {level} from {start} are incomplete"
            )
        return hashes

    return size, tree_root(read, size)


def leaf_rows(conn: sqlite3.Connection, start: int, count: int) -> list[StoredRow]:
    """The stored rows that hold leaves ``[start, start + count)`` (the first may be a
    fan-out's that begins below ``start``), found by seq: ``leaf`` has no index, and a
    condition on it would read every row."""
    rows = stored_rows(
        conn.execute(
            f"SELECT {STORED} FROM events WHERE seq >= ? ORDER BY seq LIMIT ?",
            (seq_of_leaf(conn, start), count),
        )
    )
    return [r for r in rows if r.leaf is not None and r.leaf < start + count]


class ShardLog(ShardPart, TransparencyLog):
    """The Merkle log of one store file."""

    async def log_id(self) -> str:
        conn = self._shard.conn

        def read() -> str:
            (value,) = conn.execute("SELECT value FROM log_meta WHERE key = 'id'").fetchone()
            return str(value)

        return await self._shard.run(read)

    async def tree_size(self) -> int:
        conn = self._shard.conn
        return await self._shard.run(lambda: tree_size(conn))

    async def tree_head(self) -> tuple[int, bytes]:
        conn = self._shard.conn

        def read() -> tuple[int, bytes]:
            conn.execute("BEGIN")
            try:
                return read_tree_head(conn)
            finally:
                conn.execute("COMMIT")

        return await self._shard.run(read)

    async def tile_hashes(self, level: int, start: int, count: int) -> list[bytes]:
        conn = self._shard.conn
        return await self._shard.run(lambda: tile_hashes(conn, level, start, start + count))

    async def leaf_events(self, start: int, count: int) -> list[QueuedEvent] | None:
        shard = self._shard
        conn = shard.conn

        def read() -> list[QueuedEvent] | None:
            events = [
                item
                for r in leaf_rows(conn, start, count)
                for item in shard.events(r)
                if item.leaf is not None and start <= item.leaf < start + count
            ]
            return events if len(events) == count else None

        return await shard.run(read)

    async def latest_checkpoint(self) -> str | None:
        conn = self._shard.conn

        def read() -> str | None:
            row = conn.execute(
                "SELECT note FROM log_checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._shard.run(read)

    async def add_checkpoint(self, size: int, note: str, now: datetime) -> None:
        await self._shard.write_many(
            "INSERT OR IGNORE INTO log_checkpoints (size, created_at, note) VALUES (?, ?, ?)",
            [(size, now.timestamp(), note)],
        )

    async def checkpoints_to_ship(self, limit: int) -> list[tuple[int, str]]:
        conn = self._shard.conn

        def read() -> list[tuple[int, str]]:
            # Once the events they cover have left: below the first leaf still pending.
            pending = conn.execute(
                "SELECT leaf FROM events WHERE status = 'pending' AND leaf IS NOT NULL"
                " ORDER BY seq LIMIT 1"
            ).fetchone()
            below = pending[0] if pending else None
            return [
                (int(size), str(note))
                for size, note in conn.execute(
                    "SELECT size, note FROM log_checkpoints WHERE shipped_at IS NULL"
                    " AND size <= COALESCE(?, size) ORDER BY size LIMIT ?",
                    (below, limit),
                )
            ]

        return await self._shard.run(read)

    async def checkpoints_shipped(
        self, sizes: Sequence[int], now: datetime, error: str | None = None
    ) -> None:
        await self._shard.write_many(
            "UPDATE log_checkpoints SET shipped_at = ?, ship_error = ? WHERE size = ?",
            [(now.timestamp(), error, size) for size in sizes],
        )
