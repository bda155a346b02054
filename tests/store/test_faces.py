"""The store's faces as their users hold them: one contract test run against every
implementation of the reader face and the requeue (one store file, and shards read as
one), and the writer and delivery faces of one store file through their Protocols."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.store.faces import AdminStore, DeliveryQueue, EventWriter
from proxy.store.queue import AuditQueue
from proxy.store.records import Capture, EventQuery, SortKey
from proxy.store.shards import ShardedStore
from tests.factories import queued_event

NOW = datetime.now(UTC)


class Stored:
    """What a test put in a store: the store as the admin API holds it, each shard's own
    faces, and the ids of the events in the order they were appended."""

    def __init__(self, store: AdminStore, shards: list[AuditQueue], ids: list[str]) -> None:
        self.store = store
        self.shards = shards
        self.ids = ids


async def _fill(writer: EventWriter, first: int, count: int) -> list[str]:
    events = [queued_event(n, patient=f"Patient/{n % 2}") for n in range(first, first + count)]
    for event in events:
        await writer.append([event])
    return [str(e["id"]) for e in events]


async def _refuse_to_open(path: Path) -> AuditQueue:
    raise AssertionError(f"every shard was given open: {path}")


@pytest.fixture(params=["one store file", "two shards as one"])
async def stored(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stored]:
    paths = [tmp_path / "audit-0.db", tmp_path / "audit-1.db"]
    shards = [await AuditQueue.open(path, max_bytes=1 << 30) for path in paths]
    try:
        ids = await _fill(shards[0], 0, 3)
        capture = Capture(request_id="req-1", request=b'{"q":1}', response=b"[]")
        await shards[0].append_rows([], capture=capture)
        if request.param == "one store file":
            ids += await _fill(shards[0], 3, 3)
            yield Stored(shards[0], shards[:1], ids)
            return
        ids += await _fill(shards[1], 3, 3)
        store = ShardedStore(paths, opened=dict(enumerate(shards)), open_shard=_refuse_to_open)
        yield Stored(store, shards, ids)
    finally:
        for shard in shards:
            await shard.close()


async def test_search_get_and_captures(stored: Stored) -> None:
    store = stored.store
    items, total = await store.search(EventQuery(newest_first=False, limit=100))
    assert total == 6 and sorted(q.event_id for q in items) == sorted(stored.ids)
    page = await store.search_page(EventQuery(patient="Patient/1", limit=2))
    assert page.total == 3 and len(page.items) == 2 and page.more_after
    rest = await store.search_page(
        EventQuery(
            patient="Patient/1", limit=2, after=page.cursor_of(page.items[-1], SortKey.RECORDED)
        )
    )
    assert len(rest.items) == 1 and not rest.more_after
    seen = {q.event_id for q in [*page.items, *rest.items]}
    assert seen == {stored.ids[n] for n in (1, 3, 5)}
    for event_id in stored.ids:
        found = await store.get_event(event_id)
        assert found is not None and found.event_id == event_id
    assert await store.get_event("no-such-id") is None
    capture = await store.get_capture("req-1")
    assert capture == Capture(request_id="req-1", request=b'{"q":1}', response=b"[]")
    assert await store.get_capture("req-2") is None


async def test_dead_letters_listed_counted_and_requeued(stored: Stored) -> None:
    delivery: list[DeliveryQueue] = list(stored.shards)
    for queue in delivery:
        (first, *_) = await queue.claim(10, NOW)
        await queue.dead_letter([first.seq], "rejected: 422")
    dead = await stored.store.list_dead()
    assert len(dead) == len(delivery)
    assert {q.last_error for q in dead} == {"rejected: 422"}
    stats = await stored.store.stats()
    assert (stats.pending, stats.dead, stats.delivered) == (6 - len(delivery), len(delivery), 0)
    assert await stored.store.requeue_dead([dead[0].seq]) == 1
    assert await stored.store.requeue_dead() == len(delivery) - 1
    assert (await stored.store.stats()).pending == 6
    assert await stored.store.list_dead() == []


async def test_delivered_events_are_pruned_after_retention(stored: Stored) -> None:
    for queue in stored.shards:
        claimed = await queue.claim(10, NOW)
        await queue.ack([q.seq for q in claimed], NOW - timedelta(days=2))
        assert await queue.oldest_pending_recorded() is None
        assert await queue.prune(NOW, timedelta(days=1)) == len(claimed)
    assert (await stored.store.stats()).delivered == 0
