"""Tile paths as C2SP tlog-tiles writes them, and nothing else."""

from __future__ import annotations

import pytest

from proxy.log.tiles import Tile, bundle_entries, encode_index, entry_bundle, parse_tile_path


@pytest.mark.parametrize(
    ("index", "path"),
    [(0, "000"), (7, "007"), (999, "999"), (1000, "x001/000"), (1234067, "x001/x234/067")],
)
def test_indexes_as_path_elements(index: int, path: str) -> None:
    assert encode_index(index) == path
    assert parse_tile_path(f"tile/0/{path}") == Tile(level=0, index=index)


def test_tile_paths() -> None:
    assert parse_tile_path("tile/2/x001/234.p/17") == Tile(level=2, index=1234, width=17)
    assert parse_tile_path("tile/entries/005") == Tile(level=None, index=5)
    assert Tile(level=None, index=1234067, width=3).path() == "tile/entries/x001/x234/067.p/3"
    for bad in (
        "tile/0/5",
        "tile/0/x000/005",
        "tile/00/000",
        "tile/64/000",
        "tile/0/000.p/0",
        "tile/0/000.p/256",
        "tile/0/000.p/07",
        "tile/0/x1/000",
        "tile/0/001/002",
        "tile/x/000",
    ):
        assert parse_tile_path(bad) is None, bad


def test_entry_bundles() -> None:
    entries = [b"", b"a", b"x" * 65535]
    bundle = entry_bundle(entries)
    assert bundle[:5] == b"\x00\x00\x00\x01a"
    assert bundle_entries(bundle) == entries
