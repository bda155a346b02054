"""Several shards read as one store: keyset pages merged by time, global seqs."""

from __future__ import annotations

from pathlib import Path

from proxy.settings import Settings
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery
from proxy.store.shards import ShardedStore


def test_one_worker_keeps_the_store_path_and_more_get_a_shard_each() -> None:
    assert Settings(store={"path": "/d/audit.db"}).store_shards() == [Path("/d/audit.db")]
    assert Settings(store={"path": "/d/audit.db"}, workers=3).store_shards() == [
        Path("/d/audit-0.db"),
        Path("/d/audit-1.db"),
        Path("/d/audit-2.db"),
    ]


async def _open(path: Path) -> AuditQueue:
    return await AuditQueue.open(path, max_bytes=1 << 30)


async def test_pages_in_both_directions_cover_every_shard_in_time_order(tmp_path: Path) -> None:
    paths = [tmp_path / f"audit-{n}.db" for n in range(3)]
    # shard 2 never created: a worker that has not started reads as empty
    recorded = {}
    for n, path in enumerate(paths[:2]):
        queue = await _open(path)
        try:
            events = []
            for i in range(9):
                # equal times across shards, so the tie-break by global seq is exercised
                minute = i // 2 if n == 0 else i
                event_id = f"s{n}e{i}"
                recorded[event_id] = f"2026-01-01T00:{minute:02d}:00Z"
                events.append(
                    {"resourceType": "AuditEvent", "id": event_id, "recorded": recorded[event_id]}
                )
            await queue.append(events)
        finally:
            await queue.close()
    store = ShardedStore(paths, opened={}, open_shard=_open)
    try:
        seen: list[str] = []
        query = EventQuery(limit=4)
        while True:
            page = await store.search_page(query)
            assert page.total == 18
            seen += [item.event_id for item in page.items]
            if not page.more_after:
                break
            query = EventQuery(limit=4, after=page.cursor_of(page.items[-1], query.sort))
        assert sorted(seen) == sorted(recorded), "every event once"
        times = [recorded[e] for e in seen]
        assert times == sorted(times, reverse=True), "newest first across shards"
        # and back: the page before the last one is the one that was served before it
        last = await store.search_page(query)
        before = await store.search_page(
            EventQuery(limit=4, before=last.cursor_of(last.items[0], query.sort))
        )
        assert [i.event_id for i in before.items] == seen[-len(last.items) - 4 : -len(last.items)]
        item = await store.get_event("s1e3")
        assert item is not None and item.seq % 3 == 1, "a global seq names its shard"
        assert (await store.stats()).pending == 18
    finally:
        await store.close()
