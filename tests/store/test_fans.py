"""A fan-out (the events of one exchange about several patients) stored as one row: its
events read back, named, delivered, dead-lettered and searched each as its own, exactly
as if every event had a row of its own (proxy/store/fans.py)."""

from __future__ import annotations

import itertools
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.audit.balp import AuditContext, Built, build_events, store_rows
from proxy.store import schema
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery, EventRow, EventStatus, FanOut, SortKey
from tests.factories import OpenStore, search_exchange

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def _built(patients: list[str], at: datetime = NOW, user: str = "dr-who") -> list[Built]:
    return build_events(search_exchange(patients, user=user), AuditContext.default(), at)


def _rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT seq, fan, event_id, status FROM events ORDER BY seq").fetchall()


SEVEN = [f"Patient/p{n}" for n in range(7)]


async def test_a_fan_out_is_one_row_whose_events_read_back_as_built(
    queue: AuditQueue, tmp_path: Path
) -> None:
    built = _built(SEVEN)
    (fan,) = store_rows(built)
    assert isinstance(fan, FanOut)
    await queue.append_rows([fan])
    ((seq, n, first_id, _),) = _rows(tmp_path / "audit.db")
    assert (seq, n, first_id) == (7, 7, built[0].row.event_id)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        terms = {t for (t,) in conn.execute("SELECT term FROM event_terms WHERE seq = 7")}
    assert {f"e:{p}" for p in SEVEN} <= terms and "a:dr-who" in terms

    claimed = await queue.claim(100, NOW)
    assert [q.seq for q in claimed] == list(range(1, 8))
    assert [q.event for q in claimed] == [b.event for b in built]
    assert [q.event_id for q in claimed] == [b.row.event_id for b in built]
    assert len({q.event_id for q in claimed}) == 7
    for b in built:
        found = await queue.get_event(b.row.event_id)
        assert found is not None and found.event == b.event
    assert await queue.get_event(built[0].row.event_id[:-4] + "0007") is None
    assert (await queue.stats()).pending == 7


async def test_rows_after_a_fan_out_take_the_seqs_above_its_events_across_restarts(
    tmp_path: Path,
    open_store: OpenStore,
) -> None:
    db = tmp_path / "audit.db"
    queue = await open_store(db, max_bytes=1 << 30)
    await queue.append_rows(store_rows(_built(SEVEN)))
    await queue.append_rows(store_rows(_built(["Patient/a"])))
    await queue.close()
    queue = await open_store(db, max_bytes=1 << 30)
    try:
        await queue.append_rows(store_rows(_built(["Patient/b"])))
        await queue.append_rows(store_rows(_built(["Patient/c", "Patient/d"])))
        await queue.append_rows(store_rows(_built(["Patient/e"])))
        assert [(s, n) for s, n, _, _ in _rows(db)] == [
            (7, 7),
            (8, None),
            (9, None),
            (11, 2),
            (12, None),
        ]
        claimed = await queue.claim(100, NOW)
        assert [q.seq for q in claimed] == list(range(1, 13))
        patients = [q.event["entity"][0]["what"]["reference"] for q in claimed]
        assert patients == [*SEVEN, *(f"Patient/{x}" for x in "abcde")]
    finally:
        await queue.close()


async def test_delivering_part_of_a_fan_out_splits_it_at_the_seqs_its_events_had(
    queue: AuditQueue, tmp_path: Path
) -> None:
    built = _built(SEVEN)
    await queue.append_rows(store_rows(built))
    before = await queue.claim(100, NOW)
    first = await queue.claim(3, NOW)
    assert first == before[:3]
    await queue.ack([q.seq for q in first], NOW)
    rows = _rows(tmp_path / "audit.db")
    assert [(s, n, i) for s, n, i, _ in rows] == [(q.seq, None, q.event_id) for q in before]
    assert [status for *_, status in rows] == ["delivered"] * 3 + ["pending"] * 4
    rest = await queue.claim(100, NOW)
    assert [(q.seq, q.event_id, q.event) for q in rest] == [
        (q.seq, q.event_id, q.event) for q in before[3:]
    ]
    for p in SEVEN:
        page, total = await queue.search(EventQuery(patient=p))
        assert total == 1 and [q.event_id for q in page] == [
            q.event_id for q in before if q.event["entity"][0]["what"]["reference"] == p
        ]
    await queue.ack([q.seq for q in rest], NOW)
    assert (await queue.stats()).delivered == 7


async def test_a_fan_out_delivered_whole_stays_one_row(queue: AuditQueue, tmp_path: Path) -> None:
    await queue.append_rows(store_rows(_built(SEVEN)))
    claimed = await queue.claim(100, NOW)
    await queue.nack([q.seq for q in claimed], "repository down", NOW + timedelta(seconds=1))
    assert await queue.claim(100, NOW) == []
    await queue.ack([q.seq for q in claimed], NOW)
    assert [(n, status) for _, n, _, status in _rows(tmp_path / "audit.db")] == [(7, "delivered")]


async def test_one_rejected_event_of_a_fan_out_is_dead_lettered_alone(queue: AuditQueue) -> None:
    await queue.append_rows(store_rows(_built(SEVEN)))
    claimed = await queue.claim(100, NOW)
    rejected = claimed[3]
    await queue.dead_letter([rejected.seq], "422 unprocessable")
    dead = await queue.list_dead()
    assert [(d.seq, d.event_id, d.event) for d in dead] == [
        (rejected.seq, rejected.event_id, rejected.event)
    ]
    assert dead[0].status is EventStatus.DEAD and dead[0].last_error == "422 unprocessable"
    assert [q.seq for q in await queue.claim(100, NOW)] == [q.seq for q in claimed if q != rejected]
    assert await queue.requeue_dead([rejected.seq]) == 1
    assert [q.seq for q in await queue.claim(100, NOW)] == [q.seq for q in claimed]


async def test_a_whole_fan_out_dead_lettered_and_requeued_counts_each_event(
    queue: AuditQueue,
) -> None:
    await queue.append_rows(store_rows(_built(SEVEN)))
    claimed = await queue.claim(100, NOW)
    await queue.dead_letter([q.seq for q in claimed], "400")
    assert (await queue.stats()).dead == 7
    assert [d.event_id for d in await queue.list_dead(limit=5)] == [q.event_id for q in claimed[:5]]
    assert await queue.requeue_dead() == 7
    assert (await queue.stats()).pending == 7


async def test_a_fan_out_whose_body_is_damaged_is_dead_lettered_with_every_event_named(
    queue: AuditQueue, tmp_path: Path
) -> None:
    built = _built(SEVEN)
    await queue.append_rows(store_rows(built))
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        conn.execute("UPDATE events SET body = x'28b52ffd00' WHERE fan = 7")
    assert await queue.claim(100, NOW) == []
    dead = await queue.list_dead()
    assert [d.event_id for d in dead] == [b.row.event_id for b in built]
    assert all("cannot be" in (d.last_error or "") for d in dead)


# --- search: a store of fan-out rows answers as one of a row per event ----------------


async def _stores(tmp_path: Path, open_store: OpenStore) -> tuple[AuditQueue, AuditQueue]:
    """The same events in two stores: as the proxy stores them (fan-outs as one row),
    and with every event as a row of its own."""
    fanned = await open_store(tmp_path / "fanned.db", max_bytes=1 << 30)
    plain = await open_store(tmp_path / "plain.db", max_bytes=1 << 30)
    people = [f"Patient/q{n}" for n in range(6)]
    appends = [
        # recorded times tie within and across appends, and go back in time
        (people[:3], NOW, "dr-who"),
        (["Patient/q0"], NOW, "dr-who"),
        (people[2:6], NOW, "nurse"),
        (people[1:5], NOW - timedelta(seconds=5), "dr-who"),
        (["Patient/q5"], NOW + timedelta(seconds=1), "nurse"),
        (people, NOW + timedelta(seconds=1), "dr-who"),
        (people[::2], NOW - timedelta(seconds=1), "nurse"),
    ]
    for patients, at, user in appends:
        rows = store_rows(_built(patients, at, user=user))
        await fanned.append_rows(rows)
        await plain.append_rows(
            [r for row in rows for r in (row.rows() if isinstance(row, FanOut) else [row])]
        )
    assert len(_rows(tmp_path / "fanned.db")) < len(_rows(tmp_path / "plain.db"))
    return fanned, plain


def _names(items: Any) -> list[tuple[int, str]]:
    return [(q.seq, q.event_id) for q in items]


async def _walk(queue: AuditQueue, query: EventQuery) -> list[list[tuple[int, str]]]:
    """Every page forward from the start, then every page back from the last one."""
    pages = []
    page = await queue.search_page(query)
    pages.append(_names(page.items))
    while page.more_after:
        cursor = page.cursor_of(page.items[-1], query.sort)
        page = await queue.search_page(query.__class__(**{**_fields(query), "after": cursor}))
        pages.append(_names(page.items))
    while page.more_before:
        cursor = page.cursor_of(page.items[0], query.sort)
        page = await queue.search_page(query.__class__(**{**_fields(query), "before": cursor}))
        pages.append(_names(page.items))
    return pages


def _fields(query: EventQuery) -> dict[str, Any]:
    return {f: getattr(query, f) for f in query.__slots__ if f not in ("after", "before")}


FILTERS: list[dict[str, Any]] = [
    {},
    {"patient": "Patient/q2"},
    {"entity": "Patient/q5"},
    {"patient": "Patient/q1", "entity": "Patient/q1"},
    {"patient": "Patient/q1", "entity": "Patient/q3"},
    {"user": "nurse"},
    {"agent": "dr-who"},
    {"resource_type": "Observation", "patient": "Patient/q4"},
    {"date_from": NOW, "date_to": NOW + timedelta(seconds=1)},
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f) or "all")
async def test_searches_over_fan_out_rows_page_and_count_as_over_a_row_per_event(
    tmp_path: Path, filters: dict[str, Any], open_store: OpenStore
) -> None:
    fanned, plain = await _stores(tmp_path, open_store)
    try:
        for sort, newest_first, limit in itertools.product(
            SortKey, (True, False), (1, 2, 3, 5, 50)
        ):
            query = EventQuery(**filters, sort=sort, newest_first=newest_first, limit=limit)
            expected = await _walk(plain, query)
            assert await _walk(fanned, query) == expected, (sort, newest_first, limit)
            for offset in (0, 1, 4, 9):
                at = EventQuery(**{**_fields(query), "offset": offset})
                got, want = await fanned.search_page(at), await plain.search_page(at)
                assert _names(got.items) == _names(want.items)
                assert (got.total, got.more_after) == (want.total, want.more_after)
        assert (await fanned.stats()).pending == (await plain.stats()).pending
    finally:
        await fanned.close()
        await plain.close()


def test_the_stored_row_of_a_fan_out_gives_back_the_fan_out() -> None:
    (fan,) = store_rows(_built([*SEVEN, "Patient/ünïcode"]))
    assert isinstance(fan, FanOut)
    stored = fan.stored()
    assert isinstance(stored, EventRow)
    assert FanOut.from_stored(stored).rows() == fan.rows()


async def test_a_store_from_before_fan_outs_takes_them_after_its_own_events(
    tmp_path: Path,
    open_store: OpenStore,
) -> None:
    """Schema 5 had no ``fan``: migration 6 adds it, the rows stored before stay events of
    their own, and a fan-out appended after them takes the seqs above theirs."""
    db = tmp_path / "audit.db"
    with sqlite3.connect(db) as conn:
        for script in schema.MIGRATIONS[:5]:
            for statement in schema.split_statements(script):
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 5")
        conn.execute(
            "INSERT INTO events (event_id, recorded, recorded_ts, body) VALUES (?, ?, ?, ?)",
            (
                "old-1",
                NOW.isoformat(),
                NOW.timestamp(),
                b'{"resourceType":"AuditEvent","id":"old-1"}',
            ),
        )
    queue = await open_store(db, max_bytes=1 << 30)
    try:
        built = _built(SEVEN)
        await queue.append_rows(store_rows(built))
        claimed = await queue.claim(100, NOW)
        assert [(q.seq, q.event_id) for q in claimed] == [
            (1, "old-1"),
            *((n + 2, b.row.event_id) for n, b in enumerate(built)),
        ]
    finally:
        await queue.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (schema.SCHEMA_VERSION,)
