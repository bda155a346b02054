"""The Merkle log's face over one store file: the events of a range of leaves."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.store.log import leaf_rows
from proxy.store.queue import AuditQueue
from tests.factories import NOW, queued_event, search_exchange


async def test_an_entry_bundle_reads_its_own_rows_not_the_whole_store(
    queue: AuditQueue, tmp_path: Path
) -> None:
    """``leaf`` has no index: a range of leaves is found by seq, so a tile client reading
    the newest bundle of a large store costs a few index seeks, not a scan of every row."""
    patients = ["Patient/a", "Patient/b", "Patient/c"]
    built = build_events(search_exchange(patients), AuditContext.default(), NOW)
    await queue.append_rows(store_rows(built))  # leaves 0..2, one fan-out row
    for batch in range(10):
        await queue.append([queued_event(500 * batch + i) for i in range(500)])
    assert await queue.tree_size() == 5003

    events = await queue.leaf_events(1, 4)
    assert events is not None
    assert [e.leaf for e in events] == [1, 2, 3, 4], "the fan-out's row begins below leaf 1"
    assert [e.event["id"] for e in events[:2]] == [b.row.event_id for b in built[1:]]
    newest = await queue.leaf_events(4995, 8)
    assert newest is not None
    assert [e.leaf for e in newest] == list(range(4995, 5003))
    assert await queue.leaf_events(4995, 9) is None, "past the tree's end"

    conn = sqlite3.connect(tmp_path / "audit.db")
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        conn.set_progress_handler(count, 100)
        rows = leaf_rows(conn, 4995, 8)
    finally:
        conn.close()
    assert [r.leaf for r in rows] == list(range(4995, 5003))
    assert steps < 50, f"{steps * 100} SQLite instructions: the rows were scanned"
