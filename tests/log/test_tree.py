"""RFC 6962 hashing: roots from leaves, from stored tiles and from a growing frontier agree
with the RFC's recursive definition (written in the test); consistency proofs verify
between every pair of sizes, and fail for a tree that does not extend the other."""

from __future__ import annotations

import hashlib
import sqlite3

from proxy.log.tree import (
    Frontier,
    consistency_proof,
    leaf_hash,
    root_of,
    tree_root,
    verify_consistency,
)
from proxy.store.leaves import append_hashes, stored_hashes
from proxy.store.schema import migrate
from tests.factories import independent_root


def _leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [leaf_hash(salt + str(i).encode()) for i in range(n)]


def test_the_rfc_6962_hashes() -> None:
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert root_of([]) == hashlib.sha256(b"").digest()
    leaves = _leaves(40)
    frontier = Frontier()
    for n in range(41):
        assert root_of(leaves[:n]) == independent_root(leaves[:n])
        assert frontier.root() == independent_root(leaves[:n])
        if n < 40:
            frontier.append(leaves[n])


def test_roots_from_stored_tiles_across_tile_levels() -> None:
    """Appended in uneven batches as the writer does, then read back as tiles: level 1
    holds each full level-0 tile's hash, and the root of any size is made from them."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    size = 256 * 256 + 300
    leaves = _leaves(size)
    at = 0
    for batch in (1, 255, 1, 5000, 60000, 801, size):
        batch = min(batch, size - at)
        append_hashes(conn, 0, at, leaves[at : at + batch])
        at += batch
    assert stored_hashes(conn, 2, 0, 5) == [independent_root(leaves[: 256 * 256])]
    assert len(stored_hashes(conn, 1, 0, 1000)) == size // 256

    def read(level: int, start: int, count: int) -> list[bytes]:
        return stored_hashes(conn, level, start, start + count)

    frontier = Frontier()
    for n, leaf in enumerate(leaves, start=1):
        frontier.append(leaf)
        if n in (1, 255, 256, 257, 511, 65535, 65536, 65537, size):
            assert tree_root(read, n) == frontier.root() == root_of(leaves[:n])


def test_consistency_proofs_between_every_pair_of_sizes() -> None:
    leaves = _leaves(33)
    forked = leaves[:20] + _leaves(13, b"other")
    for second in range(1, 34):
        for first in range(1, second + 1):
            proof = consistency_proof(leaves, first, second)
            r1, r2 = root_of(leaves[:first]), root_of(leaves[:second])
            assert verify_consistency(first, second, r1, r2, proof), (first, second)
            if first < second:
                assert not verify_consistency(first, second, r1, hashlib.sha256(r2).digest(), proof)
            if first > 20:
                bad = consistency_proof(forked, first, second)
                assert not verify_consistency(first, second, r1, root_of(forked[:second]), bad)
