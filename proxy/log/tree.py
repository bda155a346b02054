"""RFC 6962 (RFC 9162) Merkle tree hashing over SHA-256: leaf and node hashes, the tree
hash of a range, roots made from stored tiles, and consistency proofs.

A tree of ``n`` leaves is stored as its *tile hashes* (C2SP ``tlog-tiles``): at level 0
every leaf hash, and at level ``L`` > 0 the hash of each complete run of ``256**L``
leaves. Any root is then made from at most 256 stored hashes per perfect subtree of its
compact range, never from the leaves again (:func:`tree_root`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
TILE_HEIGHT = 8
"""Tree levels per tile level."""
TILE_WIDTH = 1 << TILE_HEIGHT
"""Hashes in a full tile."""
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree (RFC 6962 2.1)."""


def leaf_hash(entry: bytes) -> bytes:
    """``SHA-256(0x00 || entry)``."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_hashes(joined: bytes) -> list[bytes]:
    """The hashes ``joined`` holds one after the other (a tile's, a row's partial tile)."""
    return [joined[i : i + HASH_SIZE] for i in range(0, len(joined), HASH_SIZE)]


def root_of(hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of a run of leaf hashes (or of equal subtrees' hashes): pairs
    hashed level by level, an odd last hash carried up, which is RFC 6962's split at the
    largest power of two."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


HashReader = Callable[[int, int, int], Sequence[bytes]]
"""``read(level, start, count)``: ``count`` stored tile hashes of ``level`` from index
``start`` (all of them present)."""


def subtree_hash(read: HashReader, start: int, height: int) -> bytes:
    """The hash of the perfect subtree of ``2**height`` leaves from ``start`` (a multiple
    of its size), from the ``2**(height % 8)`` stored hashes of level ``height // 8`` it
    is made of."""
    level = height // TILE_HEIGHT
    hashes = read(level, start >> (TILE_HEIGHT * level), 1 << (height % TILE_HEIGHT))
    return root_of(hashes)


def compact_range(size: int) -> list[tuple[int, int]]:
    """The perfect subtrees ``(start, height)`` that cover leaves ``[0, size)``, left to
    right: one per bit set in ``size``."""
    out = []
    start = 0
    for height in reversed(range(size.bit_length())):
        if size >> height & 1:
            out.append((start, height))
            start += 1 << height
    return out


def fold(parts: Sequence[bytes]) -> bytes:
    """The root of a tree from the hashes of its compact range, left to right."""
    if not parts:
        return EMPTY_ROOT
    root = parts[-1]
    for part in reversed(parts[:-1]):
        root = node_hash(part, root)
    return root


def tree_root(read: HashReader, size: int) -> bytes:
    """The root of the tree of ``size`` leaves, from its stored tile hashes."""
    return fold([subtree_hash(read, start, height) for start, height in compact_range(size)])


def tile_hashes_completed(level: int, before: int, after: int) -> range:
    """The indexes of the hashes of level ``level + 1`` that a tree growing from
    ``before`` to ``after`` hashes at ``level`` completes: one per full tile of ``level``
    it finishes."""
    return range(before // TILE_WIDTH, after // TILE_WIDTH)


class Frontier:
    """The compact range of a growing tree, kept as leaves are appended, so that the root
    at any size is a fold of at most 64 hashes (RFC 9162's incremental tree)."""

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        """``(height, hash)`` of each perfect subtree of the compact range."""
        self.size = 0

    def append(self, leaf: bytes) -> None:
        height, node = 0, leaf
        stack = self._stack
        while stack and stack[-1][0] == height:
            _, left = stack.pop()
            node = node_hash(left, node)
            height += 1
        stack.append((height, node))
        self.size += 1

    def root(self) -> bytes:
        return fold([node for _, node in self._stack])


# --- consistency proofs (RFC 6962 2.1.2, verified as RFC 9162 2.1.4.2) ------------------


def consistency_proof(leaves: Sequence[bytes], first: int, second: int) -> list[bytes]:
    """The proof that the tree of ``first`` leaves is a prefix of the tree of ``second``
    (``leaves`` holds at least ``second`` leaf hashes)."""

    def subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if complete else [root_of(leaves[lo:hi])]
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            return [*subproof(m, lo, lo + k, complete), root_of(leaves[lo + k : hi])]
        return [*subproof(m - k, lo + k, hi, False), root_of(leaves[lo : lo + k])]

    if not 0 < first <= second:
        return []
    return subproof(first, 0, second, True)


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the tree of ``first`` leaves with root ``first_root`` to be
    a prefix of the tree of ``second`` leaves with root ``second_root``."""
    if first > second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: its root is the proof's first node
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
