"""Stored bodies: compressed against the shipped dictionary, readable across dictionary
changes and from stores written before compression, and a damaged body does not stall
delivery."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest
import zstandard

from proxy.audit.balp import build_events
from proxy.store import database, schema
from proxy.store.codec import BodyCodec, CodecError, dictionary_id, shipped_dictionary
from proxy.store.faces import StoreError
from proxy.store.index import event_row
from proxy.store.transaction import Committer
from proxy.store.wire import Submission
from tests.factories import NOW, OpenStore, audit_event, context, exchange


def _balp_events() -> list[dict[str, object]]:
    read = exchange("GET", "Patient/42", response={"resourceType": "Patient", "id": "42"})
    search = exchange(
        "GET",
        "Observation",
        query="patient=42&code=8867-4",
        response={"resourceType": "Bundle", "type": "searchset"},
    )
    built = build_events(read, context(), NOW) + build_events(search, context(), NOW)
    return [b.event for b in built]


def _bodies(path: Path) -> list[tuple[str, bytes]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT event_id, body FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


async def test_bodies_are_stored_compressed_and_read_back_unchanged(
    tmp_path: Path, open_store: OpenStore
) -> None:
    path = tmp_path / "audit.db"
    events = _balp_events()
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.append(events)
    claimed = await queue.claim(10, NOW)
    await queue.close()
    assert [q.event for q in claimed] == events
    for (event_id, body), event in zip(_bodies(path), events, strict=True):
        assert event_id == event["id"]
        assert body[:4] == b"\x28\xb5\x2f\xfd", "a zstd frame"
        assert len(body) * 4 < len(orjson.dumps(event)), (len(body), len(orjson.dumps(event)))
        frame_dict = zstandard.get_frame_parameters(body).dict_id
        assert frame_dict == dictionary_id(shipped_dictionary())


async def test_the_store_keeps_its_dictionaries_so_old_rows_survive_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_store: OpenStore
) -> None:
    path = tmp_path / "audit.db"
    first, second = _balp_events()[:2]
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.append([first])
    await queue.close()
    # A later release ships another dictionary (same content, another id). Its writer
    # (the writer process's committer, run here in the test's own process) records it.
    old = shipped_dictionary()
    new = old[:4] + (4242).to_bytes(4, "little") + old[8:]
    monkeypatch.setattr(database, "shipped_dictionary", lambda: new)
    conn = database.connect(path, False, 1 << 30)
    committer = Committer(conn, database.load_codec(conn), max_bytes=1 << 30)
    submission = Submission(
        rows=[event_row(second)], complete_intent=None, intent=None, capture=None
    )
    assert committer.commit_batch([submission]) == [None]
    conn.close()
    queue = await open_store(path, max_bytes=1 << 30)
    assert [q.event for q in await queue.claim(10, NOW)] == [first, second]
    await queue.close()
    ids = [zstandard.get_frame_parameters(body).dict_id for _, body in _bodies(path)]
    assert ids[1] == 4242 and ids[0] != 4242
    conn = sqlite3.connect(path)
    stored = {row[0] for row in conn.execute("SELECT id FROM dictionaries")}
    conn.close()
    assert set(ids) <= stored


async def test_a_store_from_before_compression_is_migrated_and_read(
    tmp_path: Path, open_store: OpenStore
) -> None:
    path = tmp_path / "audit.db"
    old_event = audit_event(1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(schema.MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO events (event_id, recorded, recorded_ts, body) VALUES (?, ?, 0, ?)",
        (old_event["id"], old_event["recorded"], orjson.dumps(old_event)),
    )
    conn.close()
    queue = await open_store(path, max_bytes=1 << 30)
    new_event = audit_event(2)
    await queue.append([new_event])
    assert [q.event for q in await queue.claim(10, NOW)] == [old_event, new_event]
    found = await queue.get_event(old_event["id"])
    assert found is not None and found.event == old_event
    await queue.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    conn.close()


async def test_a_damaged_body_goes_to_dead_letter_and_delivery_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, open_store: OpenStore
) -> None:
    path = tmp_path / "audit.db"
    events = [audit_event(i) for i in range(3)]
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.append(events)
    await queue.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "UPDATE events SET body = ? WHERE event_id = ?",
        (b"\x28\xb5\x2f\xfd" + b"\x00" * 20, events[1]["id"]),
    )
    conn.close()
    queue = await open_store(path, max_bytes=1 << 30)
    claimed = await queue.claim(10, NOW)
    assert [q.event for q in claimed] == [events[0], events[2]]
    stats = await queue.stats()
    assert (stats.pending, stats.dead) == (2, 1)
    (logged,) = [r.getMessage() for r in caplog.records if "dead-letter" in r.getMessage()]
    assert events[1]["id"] in logged, "the log names the event an operator must look at"
    with pytest.raises(StoreError, match=events[1]["id"]):
        await queue.get_event(events[1]["id"])
    (dead,) = await queue.list_dead()
    assert dead.event_id == events[1]["id"] and dead.event["id"] == events[1]["id"]
    assert dead.last_error, "the dead-letter list still says why, so an operator can act"
    await queue.close()


def test_unknown_dictionary_and_garbage_are_codec_errors() -> None:
    codec = BodyCodec(shipped_dictionary(), {})
    other = zstandard.ZstdCompressor(
        dict_data=zstandard.ZstdCompressionDict(
            shipped_dictionary()[:4] + (7).to_bytes(4, "little") + shipped_dictionary()[8:]
        )
    ).compress(b'{"resourceType":"AuditEvent"}')
    with pytest.raises(CodecError, match="unknown dictionary 7"):
        codec.decode(other)
    with pytest.raises(CodecError):
        codec.decode(b"\x28\xb5\x2f\xfd\x00")
    event = {"resourceType": "AuditEvent", "id": "x"}
    assert codec.decode(codec.encode(event)) == event
    assert codec.decode(orjson.dumps(event)) == event, "plain JSON from schema 1"
