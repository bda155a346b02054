"""Files that hold audit data (they carry PHI) are the owner's alone, whatever the umask:
the store and its -wal/-shm 0600, the directories the store creates 0700, the NDJSON
repository file 0600 and the directories created for it 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.delivery.file import FileSink
from tests.factories import OpenStore, audit_event


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: _mode(p) for p in directory.iterdir()}


def _set_modes(directory: Path, mode: int) -> None:
    for p in [directory, *directory.iterdir()]:
        p.chmod(mode if p != directory else 0o755)


@pytest.fixture(params=[0o022, 0o002, 0o000])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    yield int(request.param)
    os.umask(previous)


async def test_store_files_and_new_directories_are_private(
    tmp_path: Path, umask: int, open_store: OpenStore
) -> None:
    _set_modes(tmp_path, 0o755)
    path = tmp_path / "data" / "audit" / "audit.db"
    queue = await open_store(path, max_bytes=1 << 30)
    try:
        await queue.append([audit_event(1)])
        files = _modes(path.parent)
    finally:
        await queue.close()
    assert files == {"audit.db": 0o600, "audit.db-wal": 0o600, "audit.db-shm": 0o600}
    assert _mode(tmp_path / "data") == 0o700
    assert _mode(tmp_path / "data" / "audit") == 0o700
    assert _mode(tmp_path) == 0o755, "a directory that was there is left alone"


async def test_an_existing_readable_store_is_made_private(
    tmp_path: Path, umask: int, open_store: OpenStore
) -> None:
    path = tmp_path / "audit.db"
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.append([audit_event(1)])
    await queue.close()
    _set_modes(tmp_path, 0o644)
    queue = await open_store(path, max_bytes=1 << 30)
    try:
        await queue.append([audit_event(2)])
        modes = _modes(tmp_path)
    finally:
        await queue.close()
    assert set(modes.values()) == {0o600}, modes


async def test_ndjson_repository_file_is_private(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "audit-repository.ndjson"
    sink = FileSink(target)
    await sink.send([audit_event(1)])
    assert _mode(target) == 0o600
    target.chmod(0o640)
    await sink.send([audit_event(2)])
    assert _mode(target) == 0o600
    assert len(target.read_bytes().splitlines()) == 2


async def test_the_directories_the_ndjson_repository_file_needs_are_private(
    tmp_path: Path, umask: int
) -> None:
    target = tmp_path / "shipped" / "audit" / "events.ndjson"
    await FileSink(target).send([audit_event(1)])
    assert [_mode(d) for d in (target.parent.parent, target.parent)] == [0o700, 0o700]
    assert _mode(target) == 0o600
