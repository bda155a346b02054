"""Paths of the C2SP ``tlog-tiles`` layout: ``tile/<L>/<N>[.p/<W>]`` and
``tile/entries/<N>[.p/<W>]``, ``<N>`` in zero-padded three-digit elements, each but the
last prefixed with ``x`` (1234067 is ``x001/x234/067``)."""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.log.tree import TILE_WIDTH

MAX_LEVEL = 63
MAX_ENTRY = 0xFFFF
"""The longest entry an entry bundle can hold (a big-endian uint16 length)."""

_ELEMENT = re.compile(r"x\d{3}")
_LAST = re.compile(r"\d{3}")
_DECIMAL = re.compile(r"0|[1-9]\d*")


@dataclass(frozen=True, slots=True, kw_only=True)
class Tile:
    """One tile (``level`` None: an entry bundle) of ``width`` hashes or entries."""

    level: int | None
    index: int
    width: int = TILE_WIDTH

    @property
    def start(self) -> int:
        """The index of its first hash (or entry) at its level."""
        return self.index * TILE_WIDTH

    def path(self) -> str:
        """Its path under the log's prefix."""
        level = "entries" if self.level is None else str(self.level)
        partial = f".p/{self.width}" if self.width < TILE_WIDTH else ""
        return f"tile/{level}/{encode_index(self.index)}{partial}"


def encode_index(n: int) -> str:
    """``n`` as tile path elements."""
    digits = f"{n:d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join([*(f"x{g}" for g in groups[:-1]), groups[-1]])


def parse_tile_path(path: str) -> Tile | None:
    """The tile named by ``tile/...`` (without the log's prefix), or None when the path is
    not one the layout allows."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        return None
    level: int | None
    if parts[1] == "entries":
        level = None
    elif _DECIMAL.fullmatch(parts[1]) and int(parts[1]) <= MAX_LEVEL:
        level = int(parts[1])
    else:
        return None
    rest = parts[2:]
    width = TILE_WIDTH
    if len(rest) >= 2 and rest[-2].endswith(".p"):
        if not _DECIMAL.fullmatch(rest[-1]) or not 1 <= int(rest[-1]) < TILE_WIDTH:
            return None
        width = int(rest[-1])
        rest = [*rest[:-2], rest[-2].removesuffix(".p")]
    if not rest or not _LAST.fullmatch(rest[-1]):
        return None
    if not all(_ELEMENT.fullmatch(e) for e in rest[:-1]):
        return None
    digits = "".join(e.removeprefix("x") for e in rest)
    index = int(digits)
    if encode_index(index) != "/".join(rest):  # no redundant leading "x000" elements
        return None
    return Tile(level=level, index=index, width=width)


def entry_bundle(entries: Sequence[bytes]) -> bytes:
    """Entries as a bundle: each with its length as a big-endian uint16 before it."""
    return b"".join(struct.pack(">H", len(e)) + e for e in entries)


def bundle_entries(data: bytes) -> list[bytes]:
    """The entries of a bundle."""
    out = []
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            raise ValueError("an entry bundle cut inside a length")
        (length,) = struct.unpack_from(">H", data, at)
        at += 2
        if at + length > len(data):
            raise ValueError("an entry bundle cut inside an entry")
        out.append(data[at : at + length])
        at += length
    return out
