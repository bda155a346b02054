"""The queue's contract on a real SQLite file: order, states, backoff, dead letters, pruning,
search, group commit, intents, migrations and the size cap."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.store import schema
from proxy.store.faces import StoreError, StoreFull
from proxy.store.index import Who, who_of
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery, EventStatus, FanOut
from tests.factories import (
    CLIENT_IP,
    OpenStore,
    context,
    drop_the_log,
    exchange,
    queued_event,
    search_exchange,
    unsigned_jwt,
)

NOW = datetime.now(UTC)


async def test_claim_is_in_append_order_and_ack_removes_from_the_pending(
    queue: AuditQueue,
) -> None:
    events = [queued_event(i) for i in range(10)]
    for e in events:
        await queue.append([e])
    claimed = await queue.claim(4, NOW)
    assert [q.event for q in claimed] == events[:4]
    assert [q.seq for q in claimed] == sorted(q.seq for q in claimed)
    assert {q.status for q in claimed} == {EventStatus.PENDING}
    await queue.ack([q.seq for q in claimed], NOW)
    rest = await queue.claim(100, NOW)
    assert [q.event_id for q in rest] == [e["id"] for e in events[4:]]
    stats = await queue.stats()
    assert (stats.pending, stats.delivered, stats.dead) == (6, 4, 0)
    assert stats.size_bytes > 0


async def test_a_held_back_event_stops_the_claim_so_delivery_stays_in_order(
    queue: AuditQueue,
) -> None:
    for i in range(5):
        await queue.append([queued_event(i)])
    first = await queue.claim(5, NOW)
    await queue.nack([first[2].seq], "HTTP 503", NOW + timedelta(seconds=30))
    assert [q.seq for q in await queue.claim(5, NOW)] == [q.seq for q in first[:2]]
    later = await queue.claim(5, NOW + timedelta(seconds=31))
    assert [q.seq for q in later] == [q.seq for q in first]
    held = later[2]
    assert (held.attempts, held.last_error) == (1, "HTTP 503")
    assert held.next_attempt_at is not None


async def test_dead_letters_are_listed_requeued_and_keep_their_answer(queue: AuditQueue) -> None:
    for i in range(4):
        await queue.append([queued_event(i)])
    seqs = [q.seq for q in await queue.claim(4, NOW)]
    await queue.dead_letter([seqs[1], seqs[3]], 'HTTP 422: {"issue": "bad"}')
    dead = await queue.list_dead()
    assert [d.seq for d in dead] == [seqs[1], seqs[3]]
    assert {d.last_error for d in dead} == {'HTTP 422: {"issue": "bad"}'}
    assert [q.seq for q in await queue.claim(4, NOW)] == [seqs[0], seqs[2]]
    assert await queue.requeue_dead([seqs[3], 999_999]) == 1
    assert [d.seq for d in await queue.list_dead()] == [seqs[1]]
    assert await queue.requeue_dead() == 1
    assert (await queue.stats()).dead == 0
    assert [q.seq for q in await queue.claim(4, NOW)] == seqs


async def test_prune_removes_only_delivered_events_past_retention(queue: AuditQueue) -> None:
    for i in range(6):
        await queue.append([queued_event(i)])
    seqs = [q.seq for q in await queue.claim(6, NOW)]
    await queue.ack(seqs[:2], NOW - timedelta(days=40))
    await queue.ack(seqs[2:4], NOW - timedelta(days=1))
    await queue.dead_letter([seqs[4]], "HTTP 400")
    assert await queue.prune(NOW, timedelta(days=30)) == 2
    stats = await queue.stats()
    assert (stats.pending, stats.delivered, stats.dead) == (1, 2, 1)
    for seq_gone in seqs[:2]:
        page, _ = await queue.search(EventQuery(newest_first=False, limit=100))
        assert seq_gone not in [q.seq for q in page]


async def test_search_filters_and_pages(queue: AuditQueue) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(12):
        recorded = (base + timedelta(hours=i)).isoformat()
        await queue.append(
            [
                queued_event(
                    i,
                    patient=f"Patient/p{i % 3}",
                    user=f"user{i % 2}",
                    outcome="4" if i == 5 else "0",
                    recorded=recorded,
                )
            ]
        )
    page, total = await queue.search(EventQuery(patient="Patient/p1", limit=2))
    assert total == 4
    assert [p.event["entity"][0]["what"]["reference"] for p in page] == ["Patient/p1"] * 2
    assert page[0].recorded > page[1].recorded, "newest first"
    _, total = await queue.search(EventQuery(user="user0"))
    assert total == 6
    only, total = await queue.search(EventQuery(outcome="4"))
    assert total == 1 and only[0].event["outcome"] == "4"
    _, total = await queue.search(
        EventQuery(date_from=base + timedelta(hours=3), date_to=base + timedelta(hours=6))
    )
    assert total == 3
    _, total = await queue.search(EventQuery(subtype="read", action="R"))
    assert total == 12
    _, total = await queue.search(EventQuery(patient="Patient/p"))
    assert total == 0, "a patient matches whole references, not prefixes"
    second, _ = await queue.search(EventQuery(newest_first=False, limit=5, offset=5))
    assert [q.event["entity"][-1]["what"]["identifier"]["value"] for q in second] == [
        f"n-{i}" for i in range(5, 10)
    ]
    found = await queue.get_event(only[0].event_id)
    assert found is not None and found.event == only[0].event
    assert await queue.get_event("no-such-id") is None


async def test_concurrent_appends_share_commits_in_alternating_halves(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """64 writers: one fsync per batch of waiting appends, not per append (invariant 4).
    The next commit starts when half of the callers just released are back, so the
    writer commits one half while the loop serves the other; handing over whatever is
    pending (1 event) would alternate commits of 1 and 63."""
    writers, per_writer = 64, 20
    sizes: list[int] = []
    queue = await open_store(
        tmp_path / "audit.db", max_bytes=1 << 30, on_commit=lambda _, size: sizes.append(size)
    )

    async def writer(w: int) -> None:
        for i in range(per_writer):
            await queue.append([queued_event(w * 1000 + i)])

    try:
        await asyncio.gather(*(writer(w) for w in range(writers)))
        assert (await queue.stats()).pending == writers * per_writer
        assert len(sizes) == queue.commits, "every commit is reported"
    finally:
        await queue.close()
    assert len(sizes) <= writers * per_writer / 16, len(sizes)
    assert len([s for s in sizes if s <= 4]) <= 2, "only the warm-up commits are small"


async def test_a_lone_append_is_committed_at_once(queue: AuditQueue, tmp_path: Path) -> None:
    """With nobody else appending, each append is a commit of its own (it does not wait
    for company), and when it returns another connection already sees its event."""
    other = sqlite3.connect(tmp_path / "audit.db")
    try:
        for i in range(5):
            commits = queue.commits
            event = queued_event(i)
            await queue.append([event])
            assert queue.commits == commits + 1
            rows = other.execute("SELECT event_id FROM events ORDER BY seq").fetchall()
            assert rows[-1] == (event["id"],) and len(rows) == i + 1
    finally:
        other.close()


async def test_committed_pages_reach_the_database_file_without_waiting_for_the_wal_to_fill(
    queue: AuditQueue, tmp_path: Path
) -> None:
    """The writer's checkpointer copies commits into the database file in the
    background: SQLite alone would only do it inline, in the commit that takes the WAL
    past ``wal_autocheckpoint`` (8,192 pages with this store's budget)."""
    db = tmp_path / "audit.db"
    before = db.stat().st_size
    for i in range(0, 300, 30):
        await queue.append(
            [queued_event(n, outcomeDesc=secrets.token_hex(1000)) for n in range(i, i + 30)]
        )
    wal = db.with_name("audit.db-wal").stat().st_size
    assert wal < 8192 * 4096 // 2, "the WAL reached the inline checkpoint: nothing shown"
    for _ in range(100):
        if db.stat().st_size >= before + 300 * 1000:
            break
        await asyncio.sleep(0.05)
    assert db.stat().st_size >= before + 300 * 1000, (before, db.stat().st_size, wal)


async def test_a_duplicate_id_fails_only_its_own_append(queue: AuditQueue) -> None:
    first = queued_event(1)
    await queue.append([first])
    results = await asyncio.gather(
        queue.append([queued_event(2)]),
        queue.append([first]),
        queue.append([queued_event(3)]),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError)
    assert (await queue.stats()).pending == 3


async def test_intents_are_completed_atomically_with_their_events(
    tmp_path: Path,
    open_store: OpenStore,
) -> None:
    path = tmp_path / "audit.db"
    queue = await open_store(path, max_bytes=1 << 30)
    a = await queue.record_intent({"method": "POST", "path": "Observation"})
    b, c = await asyncio.gather(
        queue.record_intent({"method": "PUT", "path": "Patient/1"}),
        queue.record_intent({"method": "DELETE", "path": "Patient/2"}),
    )
    assert len({a, b, c}) == 3
    await queue.append([queued_event(1)], complete_intent=a)
    await queue.close()

    reopened = await open_store(path, max_bytes=1 << 30)
    orphans = await reopened.orphan_intents()
    assert [o.id for o in orphans] == sorted([b, c])
    assert {o.summary["method"] for o in orphans} == {"PUT", "DELETE"}
    assert all(o.created_at <= datetime.now(UTC) for o in orphans)
    await reopened.append([queued_event(2), queued_event(3)], complete_intent=b)
    assert [o.id for o in await reopened.orphan_intents()] == [c]
    assert (await reopened.stats()).intents == 1
    await reopened.close()


async def test_migrations_run_once_and_a_newer_store_is_refused(
    tmp_path: Path, open_store: OpenStore
) -> None:
    path = tmp_path / "audit.db"
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.append([queued_event(1)])
    await queue.close()
    queue = await open_store(path, max_bytes=1 << 30)  # migrations already applied
    await queue.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
    assert schema.migrate(conn) == schema.SCHEMA_VERSION, "idempotent"
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this proxy knows"):
        await open_store(path, max_bytes=1 << 30)


def test_a_failing_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    schema.migrate(conn)
    broken = (*schema.MIGRATIONS, "CREATE TABLE extra (a); CREATE TABLE events (dup)")
    monkeypatch.setattr(schema, "MIGRATIONS", broken)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(broken))
    with pytest.raises(sqlite3.OperationalError):
        schema.migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(broken) - 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "extra" not in tables, "the half-done migration was rolled back"


async def test_max_bytes_fails_appends_closed_and_recovers_after_pruning(
    tmp_path: Path, open_store: OpenStore
) -> None:
    # 1 MB: 256 KiB of it is the WAL's budget and 128 KiB the shared-memory index's.
    queue = await open_store(tmp_path / "audit.db", max_bytes=1_000_000)
    # Random text: bodies are compressed, and repeated padding would take no room.
    paddings = [secrets.token_urlsafe(3000) for _ in range(1000)]
    stored = 0
    with pytest.raises(StoreFull, match="full"):
        for i in range(1000):
            await queue.append([queued_event(i, outcomeDesc=paddings[i])])
            stored += 1
    assert 20 < stored < 1000
    assert (await queue.stats()).pending == stored, "everything acknowledged is still there"
    assert (await queue.stats()).size_bytes <= 650_000, "over by one commit at most"
    # Reads still work: only growth is refused.
    assert (await queue.claim(5, NOW))[0].event["outcomeDesc"] == paddings[0]
    seqs = [q.seq for q in await queue.claim(1000, NOW)]
    await queue.ack(seqs, NOW - timedelta(days=60))
    assert await queue.prune(NOW, timedelta(days=30)) == stored
    await queue.append([queued_event(5000, outcomeDesc=paddings[0])])  # space is back
    assert (await queue.stats()).pending == 1
    await queue.close()


async def test_closed_queue_refuses_appends_but_finishes_accepted_ones(
    tmp_path: Path, open_store: OpenStore
) -> None:
    queue = await open_store(tmp_path / "audit.db", max_bytes=1 << 30)
    accepted = [asyncio.ensure_future(queue.append([queued_event(i)])) for i in range(50)]
    await asyncio.sleep(0)
    await queue.close()
    await asyncio.gather(*accepted)
    with pytest.raises(StoreError, match="closed"):
        await queue.append([queued_event(99)])
    reopened = await open_store(tmp_path / "audit.db", max_bytes=1 << 30)
    assert (await reopened.stats()).pending == 50
    await reopened.close()


async def test_a_repository_answer_is_kept_to_4096_characters(queue: AuditQueue) -> None:
    """The repository's error text is stored with the event (for the DLQ), cut to 4096
    characters so a huge answer cannot bloat the store."""
    for i in range(2):
        await queue.append([queued_event(i)])
    held, dead = await queue.claim(2, NOW)
    answer = "x" * 4096 + "cut"
    await queue.nack([held.seq], answer, NOW)
    await queue.dead_letter([dead.seq], answer)
    (pending,) = await queue.claim(2, NOW)
    (dead_letter,) = await queue.list_dead()
    assert pending.last_error == dead_letter.last_error == "x" * 4096


async def test_a_dead_letter_keeps_its_last_retry_time_in_utc(queue: AuditQueue) -> None:
    """What the DLQ shows: attempts counted, and the time of the last planned retry as an
    aware UTC datetime (the admin API prints it as such)."""
    await queue.append([queued_event(1)])
    (event,) = await queue.claim(1, NOW)
    retry_at = (NOW + timedelta(minutes=5)).replace(microsecond=0)
    await queue.nack([event.seq], "HTTP 503", retry_at)
    await queue.dead_letter([event.seq], "HTTP 400")
    (dead,) = await queue.list_dead()
    assert dead.next_attempt_at == retry_at and dead.next_attempt_at.tzinfo is UTC
    assert (dead.attempts, dead.last_error) == (2, "HTTP 400")


async def test_a_large_schema_2_store_is_backfilled_with_progress_logged(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    open_store: OpenStore,
) -> None:
    path = tmp_path / "audit.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in schema.MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 2")
    rows = 2500
    conn.executemany(
        "INSERT INTO events (event_id, recorded, recorded_ts, patients, user_id, body)"
        " VALUES (?, '2024-01-01T00:00:00Z', ?, ?, ?, ?)",
        [
            (f"e{i}", 1704067200.0 + i, f"|Patient/p{i % 7}|", f"user{i % 3}", b"{}")
            for i in range(rows)
        ],
    )
    conn.close()
    monkeypatch.setattr(schema, "BACKFILL_ROWS", 1000)
    with caplog.at_level(logging.INFO, logger="proxy.store.schema"):
        queue = await open_store(path, max_bytes=1 << 30)
    await queue.close()
    progress = [r.getMessage() for r in caplog.records if r.name == "proxy.store.schema"]
    assert progress == [
        "store migration 3: rewriting 2500 events",
        "store migration 3: 1000 of 2500 events (40%)",
        "store migration 3: 2000 of 2500 events (80%)",
        "store migration 3: 2500 of 2500 events (100%)",
        "store migration 7: rewriting 2500 events",
        "store migration 7: 1000 of 2500 events (40%)",
        "store migration 7: 2000 of 2500 events (80%)",
        "store migration 7: 2500 of 2500 events (100%)",
        "store migration 8: rewriting 2500 events",
        "store migration 8: 1000 of 2500 events (40%)",
        "store migration 8: 2000 of 2500 events (80%)",
        "store migration 8: 2500 of 2500 events (100%)",
    ]
    conn = sqlite3.connect(path)
    # Each row's (user, patient) pair and its quarter hour, counted once.
    assert conn.execute("SELECT COUNT(*) FROM access_pairs").fetchone()[0] == rows
    assert conn.execute(
        "SELECT COUNT(*) FROM access_pairs WHERE user_id = 'user1' AND patient = 'Patient/p3'"
    ).fetchone()[0] == len([i for i in range(rows) if i % 3 == 1 and i % 7 == 3])
    assert conn.execute("SELECT SUM(events) FROM activity").fetchone()[0] == rows
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM event_terms").fetchone()[0] == 2 * rows
    assert conn.execute("SELECT COUNT(*) FROM events WHERE updated_ts IS NULL").fetchone()[0] == 0
    assert conn.execute("SELECT DISTINCT who FROM events").fetchall() == [('["",[],"",""]',)]
    (seqs,) = conn.execute(
        "SELECT COUNT(*) FROM event_terms WHERE term = 'e:Patient/p3'"
    ).fetchone()
    assert seqs == len([i for i in range(rows) if i % 7 == 3])
    conn.close()


async def test_a_fan_out_is_stored_as_its_events_each_found_by_its_patient(
    queue: AuditQueue,
) -> None:
    """The events of a search about seven patients reach the writer as one FanOut: it
    stores them as one row (tests/store/test_fans.py), each event whole and findable by
    its own patient."""
    ex = search_exchange([f"Patient/p{n}" for n in range(7)])
    built = build_events(ex, AuditContext.default(), NOW)
    rows = store_rows(built)
    assert len(rows) == 1 and isinstance(rows[0], FanOut)
    await queue.append_rows(rows, capture=None)
    claimed = await queue.claim(100, NOW)
    assert [q.event for q in claimed] == [item.event for item in built]
    for n in range(7):
        page, total = await queue.search(EventQuery(patient=f"Patient/p{n}"))
        assert total == 1 and page[0].event_id == built[n].row.event_id
    _, total = await queue.search(EventQuery(resource_type="Observation"))
    assert total == 7


async def test_a_schema_7_store_learns_who_acted_in_each_event_from_its_body(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """Migration 8 reads ``who`` of the rows stored before it out of their bodies: those
    the builder made (R4 and R5, a fan-out's), one made elsewhere, and a body stored
    before compression."""
    path = tmp_path / "audit.db"
    queue = await open_store(path, max_bytes=1 << 30)
    token = unsigned_jwt(
        {"sub": "dr.lee", "name": "Dr Lee", "client_id": "ehr-web", "roles": ["physician"]}
    )
    for version in ("R4", "R5"):
        ex = exchange("GET", "Patient/p1", headers={"Authorization": f"Bearer {token}"})
        await queue.append_rows(store_rows(build_events(ex, context(fhir_version=version), NOW)))
    fan = search_exchange(["Patient/a", "Patient/b", "Patient/c"], user="dr.fan")
    await queue.append_rows(store_rows(build_events(fan, AuditContext.default(), NOW)))
    await queue.append([queued_event(9, patient="Patient/p2", user="ingested")])
    await queue.close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO events (event_id, recorded, recorded_ts, body) VALUES (?, ?, ?, ?)",
            ("plain", NOW.isoformat(), NOW.timestamp(), orjson.dumps(queued_event(10))),
        )
        drop_the_log(conn)
        conn.execute("ALTER TABLE events DROP COLUMN who")
        conn.execute("PRAGMA user_version = 7")
    queue = await open_store(path, max_bytes=1 << 30)
    events = (await queue.search_page(EventQuery(limit=100))).items
    await queue.close()
    with sqlite3.connect(path) as conn:
        rows: list[tuple[int, int | None, str]] = conn.execute(
            "SELECT seq, fan, who FROM events"
        ).fetchall()
    assert len(events) == 2 + 3 + 2 and len(rows) == 2 + 1 + 2
    assert None not in {who for *_, who in rows}

    def who_of_row(seq: int) -> str:
        return next(who for last, fan, who in rows if last - (fan or 1) < seq <= last)

    for item in events:
        assert who_of_row(item.seq) == who_of(item.event["agent"]).column(), item.event_id
    said = {Who.of_column(who_of_row(item.seq)) for item in events}
    assert Who(name="Dr Lee", roles=("physician",), client="ehr-web", address=CLIENT_IP) in said


async def test_migration_8_reads_a_body_stored_as_text_and_skips_one_it_cannot_read(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """SQLite keeps what a writer bound: a body bound as text is read as its JSON; a body
    that is neither text nor bytes is left without ``who``, and the store still opens."""
    path = tmp_path / "audit.db"
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.close()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO events (event_id, recorded, recorded_ts, body) VALUES (?, ?, ?, ?)",
            [
                (
                    "text",
                    NOW.isoformat(),
                    NOW.timestamp(),
                    orjson.dumps(queued_event(1, user="dr.text")).decode(),
                ),
                ("number", NOW.isoformat(), NOW.timestamp(), 42),
            ],
        )
        drop_the_log(conn)
        conn.execute("ALTER TABLE events DROP COLUMN who")
        conn.execute("PRAGMA user_version = 7")
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.close()
    with sqlite3.connect(path) as conn:
        who = dict(conn.execute("SELECT event_id, who FROM events").fetchall())
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    assert version == schema.SCHEMA_VERSION
    agents = queued_event(1, user="dr.text")["agent"]
    assert who == {"text": who_of(agents).column(), "number": None}
