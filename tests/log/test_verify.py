"""``fhir-audit-proxy log verify`` against a trail tampered with as an attacker would: with
SQLite on the store file, by copying and cutting its files, by editing the repository's
NDJSON. Each store here was written by the real writer process, its checkpoints signed and
its events and checkpoints shipped to an NDJSON file as the proxy ships them."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cli import main
from proxy.log.entry import entry_of
from proxy.log.tree import leaf_hash, root_of
from proxy.store.database import load_codec
from proxy.store.queue import AuditQueue
from tests.factories import LoggedStore, log_signer

_HOLD_SNAPSHOT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("BEGIN")
conn.execute("SELECT COUNT(*) FROM events").fetchone()
print("holding", flush=True)
sys.stdin.read()
"""


def _store(directory: Path) -> LoggedStore:
    """An empty store in ``directory``, its repository an NDJSON file beside it."""
    return LoggedStore(
        path=directory / "audit.db", signer=log_signer(), shipped=directory / "repo.ndjson"
    )


@pytest.fixture
async def logged(tmp_path: Path) -> LoggedStore:
    store = _store(tmp_path)
    await store.append(5, 4, patients=["Patient/a", "Patient/b", "Patient/c"])
    return store


def _verify(capsys: pytest.CaptureFixture[str], store: LoggedStore, *args: str) -> tuple[int, str]:
    config = store.path.parent / "config.yaml"
    config.write_text(f"store: {{path: {store.path}}}\n")
    status = main(["log", "verify", "-c", str(config), "--vkey", store.vkey, *args])
    return status, capsys.readouterr().out


def _assert_verifies(capsys: pytest.CaptureFixture[str], store: LoggedStore, summary: str) -> None:
    """``log verify`` finds the store sound against the checkpoints it shipped, and says
    ``summary``."""
    status, out = _verify(capsys, store, "--checkpoints", str(store.shipped))
    assert status == 0, out
    assert summary in out, out


def _sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def _rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    """What ``query`` reads from the store file."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


async def test_an_untouched_store_and_its_repository_verify(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = _verify(capsys, logged, "--checkpoints", str(logged.shipped))
    assert status == 0, out
    assert out.startswith("ok ") and "12 leaves, 2 checkpoint(s) verified" in out
    status, out = _verify(capsys, logged, str(logged.shipped))
    assert status == 0, out
    assert "12 leaves, 2 checkpoint(s) verified" in out


async def test_a_byte_edited_in_a_stored_event_names_its_seq(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # The body is a zstd frame: flip one byte of it, as a hex editor would.
    _sql(
        logged.path,
        "UPDATE events SET body = substr(body, 1, 20) || x'00' || substr(body, 22) WHERE seq = 6",
    )
    status, out = _verify(capsys, logged)
    assert status == 1
    assert "edited event: event seq 6 " in out, out


def _rewrite(path: Path, seq: int, **changes: str) -> tuple[dict[str, Any], int]:
    """Edit the stored event ``seq`` as valid JSON, compressed as the store does; returns
    it and its leaf."""
    conn = sqlite3.connect(path)
    try:
        codec = load_codec(conn)
        body, leaf = conn.execute("SELECT body, leaf FROM events WHERE seq = ?", (seq,)).fetchone()
        event = codec.decode(body) | changes
        conn.execute("UPDATE events SET body = ? WHERE seq = ?", (codec.encode(event), seq))
        conn.commit()
    finally:
        conn.close()
    return event, leaf


async def test_an_event_rewritten_as_valid_json_names_its_seq(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    event, _ = _rewrite(logged.path, 5, outcome="4")
    status, out = _verify(capsys, logged)
    assert status == 1
    assert f"edited event: event seq 5 ({event['id']}) is not what its leaf 4" in out, out


async def test_a_deleted_row_is_a_deleted_range(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _sql(logged.path, "DELETE FROM events WHERE seq = 7")
    status, out = _verify(capsys, logged)
    assert status == 1
    assert (
        "deleted range: the events of leaves 6..6 are gone from the store"
        " (after seq 6, before seq 8)" in out
    ), out


async def test_two_swapped_events_are_named(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _sql(
        logged.path,
        "CREATE TEMP TABLE b AS SELECT seq, body FROM events WHERE seq IN (5, 8)",
        "UPDATE events SET body = (SELECT body FROM b WHERE b.seq = 13 - events.seq)"
        " WHERE seq IN (5, 8)",
    )
    status, out = _verify(capsys, logged)
    assert status == 1
    assert "events swapped: events seq 5 " in out and " and seq 8 " in out, out


async def test_rewritten_leaf_hashes_break_the_signed_root(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """An attacker who edits an event and its leaf hash too (the store's own hash chain
    recomputed) is caught by the checkpoint he cannot sign."""
    event, _ = _rewrite(logged.path, 10, action="D")
    _sql(
        logged.path,
        f"UPDATE events SET leaf_hashes = x'{leaf_hash(entry_of(event)).hex()}' WHERE seq = 10",
    )
    status, out = _verify(capsys, logged)
    assert status == 1
    assert "leaf hashes rewritten: the leaves 8..11 of the store do not give the root" in out, out


async def test_a_rewritten_complete_tile_breaks_the_signed_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same attacker, with the event's leaf in a complete tile: he rewrites the hash in
    the event's row and in the tile's row (``log_tiles``) alike, and the checkpoints he
    cannot sign still catch it."""
    store = _store(tmp_path)
    await store.append(150, 150)
    event, leaf = _rewrite(store.path, 10, action="D")
    forged = leaf_hash(entry_of(event))
    conn = sqlite3.connect(store.path)
    try:
        (joined,) = conn.execute("SELECT hashes FROM log_tiles WHERE idx = 0").fetchone()
        joined = joined[: 32 * leaf] + forged + joined[32 * leaf + 32 :]
        conn.execute("UPDATE log_tiles SET hashes = ? WHERE idx = 0", (joined,))
        conn.execute("UPDATE events SET leaf_hashes = ? WHERE seq = 10", (forged,))
        conn.commit()
    finally:
        conn.close()
    status, out = _verify(capsys, store)
    assert status == 1
    assert (
        "leaf hashes rewritten: the leaves 0..149 of the store do not give the root"
        " that the checkpoint of size 150 (from the store) signed" in out
    ), out


async def test_a_checkpoint_edited_is_a_bad_signature(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _sql(
        logged.path,
        "UPDATE log_checkpoints SET note ="
        " replace(note, char(10) || '12' || char(10), char(10) || '11' || char(10))",
    )
    status, out = _verify(capsys, logged)
    assert status == 1
    assert "bad signature: checkpoint of size 11 from the store: the signature by" in out, out


async def test_a_truncated_wal_loses_a_tail_the_shipped_checkpoints_remember(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path)
    await store.append(4)
    # A reader's open snapshot (in a process of its own: SQLite's locks are per process)
    # keeps the next commits in the WAL, which a checkpoint may not copy past: the files
    # then stand as after a crash, the tail only in the WAL.
    reader = subprocess.Popen(  # noqa: ASYNC220 (held across awaits on purpose)
        [sys.executable, "-c", _HOLD_SNAPSHOT, str(store.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == b"holding\n"
        wal = store.path.with_name("audit.db-wal")
        kept = wal.stat().st_size
        await store.append(3)
        assert wal.stat().st_size > kept, "the tail is in the WAL"
        stolen = tmp_path / "stolen"
        stolen.mkdir()
        shutil.copy(store.path, stolen / "audit.db")
        shutil.copy(wal, stolen / "audit.db-wal")
    finally:
        reader.communicate(b"")
    os.truncate(stolen / "audit.db-wal", kept)
    copy = LoggedStore(path=stolen / "audit.db", signer=store.signer, shipped=store.shipped)
    status, out = _verify(capsys, copy)
    assert status == 0, "the store alone cannot tell: its own checkpoints went with the tail"
    status, out = _verify(capsys, copy, "--checkpoints", str(store.shipped))
    assert status == 1
    assert (
        "truncated tail: the checkpoint from " in out
        and "covers 7 leaves, the store has only 4" in out
    ), out


async def test_an_old_copy_restored_is_a_truncated_tail_then_a_fork(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path)
    await store.append(4)
    old = tmp_path / "old.db"
    shutil.copy(store.path, old)
    await store.append(3)
    # The attacker puts the old copy back.
    for suffix in ("-wal", "-shm"):
        store.path.with_name("audit.db" + suffix).unlink(missing_ok=True)
    shutil.copy(old, store.path)
    status, out = _verify(capsys, store, "--checkpoints", str(store.shipped))
    assert status == 1
    assert "truncated tail: " in out and "covers 7 leaves, the store has only 4" in out, out

    # The proxy runs on from the old copy: new events take the lost leaves, and new
    # checkpoints (validly signed) are not consistent with the one that had left.
    await store.append(5)
    status, out = _verify(capsys, store, "--checkpoints", str(store.shipped))
    assert status == 1
    assert (
        "checkpoint not extended: the checkpoint of size 9 (from the store) does not extend"
        " the checkpoint of size 7" in out
    ), out
    status, out = _verify(capsys, store, str(store.shipped))
    assert status == 1
    assert "two events at one leaf: events " in out and "all claim leaf 4" in out, out


async def test_the_repository_file_edited_names_the_events(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = logged.shipped.read_bytes().splitlines()
    edited = orjson.loads(lines[9])
    assert edited["resourceType"] == "AuditEvent"
    edited["recorded"] = "2020-01-01T00:00:00Z"
    lines[9] = orjson.dumps(edited)
    logged.shipped.write_bytes(b"\n".join(lines) + b"\n")
    status, out = _verify(capsys, logged, str(logged.shipped))
    assert status == 1
    assert "edited event: the leaves 8..11 of the repository do not give the root" in out, out
    assert edited["id"] in out


async def test_an_event_deleted_from_the_repository_file_is_a_deleted_range(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = logged.shipped.read_bytes().splitlines()
    del lines[2]
    logged.shipped.write_bytes(b"\n".join(lines) + b"\n")
    status, out = _verify(capsys, logged, str(logged.shipped))
    assert status == 1
    assert "deleted range: no event holds leaves 2..2" in out, out


async def test_pruned_events_are_not_deleted_ones(
    logged: LoggedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = await AuditQueue.open(logged.path, max_bytes=1 << 30)
    try:
        assert await queue.prune(datetime.now(UTC) + timedelta(days=1), timedelta(0)) == 12
    finally:
        await queue.close()
    _assert_verifies(capsys, logged, "12 leaves, 2 checkpoint(s) verified, 12 pruned")


async def test_the_tree_outlives_the_pruned_events_of_complete_and_partial_tiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A complete tile is one row of ``log_tiles``, written in the commit that completed
    it, which pruning leaves as it is; the leaf hashes of a tile not yet complete are only
    in the events' rows, and pruning copies them out. With every event pruned the root,
    the tiles and ``log verify`` are what they were."""
    store = _store(tmp_path)
    await store.append(150, 150, patients=[f"Patient/{p}" for p in range(7)])
    queue = await AuditQueue.open(store.path, max_bytes=1 << 30)
    try:
        head = await queue.tree_head()
        assert head[0] == 307
        tiles = await queue.tile_hashes(0, 0, 307)
        assert len(tiles) == 307
        assert await queue.prune(datetime.now(UTC) + timedelta(days=1), timedelta(0)) == 307
        assert await queue.tree_head() == head
        assert await queue.tile_hashes(0, 0, 307) == tiles
        assert await queue.tile_hashes(1, 0, 1) == [root_of(tiles[:256])]
    finally:
        await queue.close()
    assert _rows(store.path, "SELECT COUNT(*) FROM events") == [(0,)]
    assert _rows(store.path, "SELECT idx, hashes FROM log_tiles") == [(0, b"".join(tiles[:256]))]
    copied = _rows(store.path, "SELECT idx, hash FROM log_hashes WHERE level = 0")
    assert copied == list(enumerate(tiles))[256:], "the partial tile's, and only those"
    _assert_verifies(capsys, store, "307 leaves, 2 checkpoint(s) verified, 307 pruned")


async def test_tiles_completed_before_schema_10_are_read_where_they_were(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Schema 9 kept a complete tile as 256 rows of ``log_hashes`` level 0. ``log verify``
    checks such a store as it is (an auditor's copy is not migrated); the migration to 10
    leaves them there: the root and the tiles read the same, the next tile is one row of
    ``log_tiles``, and the whole tree verifies."""
    store = _store(tmp_path)
    await store.append(150, 150)
    conn = sqlite3.connect(store.path)
    try:
        # The store as schema 9 wrote it.
        ((joined,),) = conn.execute("SELECT hashes FROM log_tiles").fetchall()
        conn.executemany(
            "INSERT INTO log_hashes (level, idx, hash) VALUES (0, ?, ?)",
            [(i, joined[32 * i : 32 * i + 32]) for i in range(256)],
        )
        conn.execute("DROP TABLE log_tiles")
        conn.execute("PRAGMA user_version = 9")
        conn.commit()
    finally:
        conn.close()
    _assert_verifies(capsys, store, "300 leaves, 2 checkpoint(s) verified")
    assert _rows(store.path, "PRAGMA user_version") == [(9,)], "read as it is"
    queue = await AuditQueue.open(store.path, max_bytes=1 << 30)
    try:
        assert (await queue.tile_hashes(0, 0, 256)) == [
            joined[32 * i : 32 * i + 32] for i in range(256)
        ]
        assert (await queue.tree_head())[0] == 300
    finally:
        await queue.close()
    await store.append(250)
    assert _rows(store.path, "SELECT idx FROM log_tiles") == [(1,)]
    assert _rows(store.path, "SELECT COUNT(*) FROM log_hashes WHERE level = 0") == [(256,)]
    _assert_verifies(capsys, store, "550 leaves, 3 checkpoint(s) verified")


async def test_every_shard_of_a_multi_worker_store_is_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``workers: 2`` each worker's shard is a log of its own: both are checked, and
    an edit in the second is named with its file."""
    signer = log_signer()
    shards = [
        LoggedStore(
            path=tmp_path / f"audit-{n}.db", signer=signer, shipped=tmp_path / f"repo-{n}.ndjson"
        )
        for n in range(2)
    ]
    for n, shard in enumerate(shards):
        await shard.append(3 + n)
    config = tmp_path / "config.yaml"
    config.write_text(f"store: {{path: {tmp_path / 'audit.db'}}}\nworkers: 2\n")
    vkey = signer.verifier.text()
    status = main(["log", "verify", "-c", str(config), "--vkey", vkey])
    out = capsys.readouterr().out
    assert status == 0, out
    assert [line.split()[0] for line in out.splitlines()] == ["ok", "ok"], out
    assert "audit-0.db" in out and "audit-1.db" in out
    assert "3 leaves" in out and "4 leaves" in out

    _rewrite(shards[1].path, 2, outcome="8")
    status = main(["log", "verify", "-c", str(config), "--vkey", vkey])
    out = capsys.readouterr().out
    assert status == 1
    first, second, problem = out.splitlines()
    assert first.startswith("ok ") and "audit-0.db" in first
    assert second.startswith("FAIL ") and "audit-1.db" in second
    assert "edited event: event seq 2 " in problem, out
