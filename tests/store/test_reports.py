"""The report reads (proxy/store/reports.py) and the tables schema 7 keeps for them, on
a real store: the quarter-hour activity counts always equal counting the events, through
fan-outs, their splitting, admin reads and pruning; first accesses follow the retained
history; several shards read as one."""

from __future__ import annotations

import random
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.admin.access import build_access_events
from proxy.admin.auth import AdminCaller
from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.audit.identity import Identity
from proxy.fhir.interaction import Interaction, InteractionKind
from proxy.store.faces import EventReader
from proxy.store.index import outcome_code_of, patients_of, subtype_codes, user_of, who_of
from proxy.store.marks import Mark, marks_of_event
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery, IndexedEvent, QueuedEvent
from proxy.store.reports import _walked_activity, activity_of
from proxy.store.search import SearchSql, total_statement
from proxy.store.shards import ShardedStore
from tests.factories import OpenStore, queued_event, search_exchange

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _admin_read(at: datetime) -> list[Any]:
    built = build_access_events(
        caller=AdminCaller(Identity(token_kind="opaque", user_id="token:1")),
        interaction=Interaction(
            kind=InteractionKind.SEARCH_TYPE,
            method="GET",
            resource_type="AuditEvent",
            search=(("patient", "Patient/p1"),),
        ),
        method="GET",
        path="AuditEvent",
        query_string="patient=Patient/p1",
        request_id="admin-read",
        client_address="127.0.0.1",
        base_url="http://admin",
        status=200,
        ctx=AuditContext.default(),
        now=at,
    )
    return store_rows(built)


async def fill(queue: AuditQueue, rng: random.Random) -> None:
    """Events over three days: single events of every action and outcome, fan-outs,
    admin reads; some delivered and pruned, some fan-outs split by a partial ack."""
    for n in range(300):
        at = T0 + timedelta(seconds=rng.uniform(0, 3 * 86_400))
        kind = rng.random()
        if kind < 0.6:
            event = queued_event(
                n,
                patient=f"Patient/p{rng.randrange(12)}",
                user=f"u{rng.randrange(4)}",
                recorded=at.isoformat(timespec="milliseconds"),
                action=rng.choice("CRUDE"),
                outcome=rng.choice(["0", "0", "0", "4", "8", "12"]),
            )
            await queue.append([event])
        elif kind < 0.85:
            patients = [f"Patient/p{i}" for i in rng.sample(range(12), rng.randrange(2, 6))]
            ex = search_exchange(patients, user=f"u{rng.randrange(4)}")
            ex.started_at = ex.finished_at = at
            await queue.append_rows(store_rows(build_events(ex, AuditContext.default(), at)))
        else:
            await queue.append_rows(_admin_read(at))
    claimed = await queue.claim(400, datetime.now(UTC))
    # Acknowledge a random part: fan-outs whose events part ways are split.
    acked = [c.seq for c in claimed if rng.random() < 0.3]
    await queue.ack(acked, T0)
    await queue.prune(T0 + timedelta(days=40), timedelta(days=30))


def queries(rng: random.Random) -> list[EventQuery]:
    out = [EventQuery(), EventQuery(unmarked=(Mark.ADMIN_ACCESS.value,))]
    for _ in range(60):
        start = T0 + timedelta(seconds=rng.uniform(-3600, 3 * 86_400))
        out.append(
            EventQuery(
                date_from=start if rng.random() < 0.8 else None,
                date_to=start + timedelta(seconds=rng.uniform(60, 2 * 86_400))
                if rng.random() < 0.8
                else None,
                action=rng.choice([None, None, "R", "E", "C"]),
                outcome=rng.choice([None, None, "0", "8"]),
                marked=rng.choice([(), (), (Mark.ADMIN_ACCESS.value,)]),
                unmarked=rng.choice([(), (Mark.ADMIN_ACCESS.value,)]),
            )
        )
    return [q for q in out if not (set(q.marked) & set(q.unmarked))]


def _per_key(counts: list[Any]) -> dict[tuple[int, str, str], int]:
    out: dict[tuple[int, str, str], int] = {}
    for c in counts:
        key = (c.slot, c.action, c.outcome)
        out[key] = out.get(key, 0) + c.events
    return out


async def test_activity_counts_equal_counting_the_events(tmp_path: Path) -> None:
    rng = random.Random(7)
    queue = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    try:
        await fill(queue, rng)
        stats = await queue.stats()
        assert stats.delivered + stats.pending > 0
        for query in queries(rng):

            def both(conn: sqlite3.Connection, q: EventQuery = query) -> tuple[Any, ...]:
                return (
                    activity_of(conn, q),
                    _walked_activity(conn, q),
                    conn.execute(*total_statement(q)).fetchone()[0],
                    conn.execute(*SearchSql(q).total()).fetchone()[0],
                )

            with sqlite3.connect(tmp_path / "audit.db") as conn:
                rolled, walked, fast, slow = both(conn)
            assert _per_key(rolled) == _per_key(walked), query
            assert fast == slow == sum(_per_key(walked).values()), query
        every = await queue.search_page(EventQuery(limit=1000, count_total=False))
        assert (await queue.search_page(EventQuery(limit=0))).total == len(every.items)
    finally:
        await queue.close()


async def test_first_access_follows_the_retained_history(tmp_path: Path) -> None:
    queue = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    try:

        def read(n: int, minutes: int, user: str = "dr.x") -> dict[str, Any]:
            at = (T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
            return queued_event(n, patient="Patient/a", user=user, recorded=at)

        await queue.append([read(0, 0), read(1, 10), read(2, 20, user="dr.y")])
        reports = queue
        firsts = await reports.first_accesses([("dr.x", "Patient/a"), ("dr.y", "Patient/a")])
        assert firsts[("dr.x", "Patient/a")][0] == (T0).timestamp()
        assert firsts[("dr.y", "Patient/a")][0] == (T0 + timedelta(minutes=20)).timestamp()
        assert ("dr.z", "Patient/a") not in await reports.first_accesses([("dr.z", "Patient/a")])
        # The first read is delivered and pruned: the second is now the first retained.
        (first, *_) = await queue.claim(1, datetime.now(UTC))
        await queue.ack([first.seq], T0)
        assert await queue.prune(T0 + timedelta(days=31), timedelta(days=30)) == 1
        firsts = await reports.first_accesses([("dr.x", "Patient/a")])
        assert firsts[("dr.x", "Patient/a")][0] == (T0 + timedelta(minutes=10)).timestamp()
        # An admin read of the trail about the patient is no access to the record.
        await queue.append_rows(_admin_read(T0 - timedelta(days=1)))
        assert await reports.first_accesses([("token:1", "Patient/p1")]) == {}
    finally:
        await queue.close()


async def test_shards_are_read_as_one(tmp_path: Path) -> None:
    paths = [tmp_path / "audit-0.db", tmp_path / "audit-1.db"]
    queues = [await AuditQueue.open(p, max_bytes=1 << 30) for p in paths]
    try:
        for shard, minutes in ((0, 30), (1, 5), (0, 50), (1, 70)):
            at = (T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
            await queues[shard].append(
                [queued_event(minutes, patient="Patient/a", user="dr.x", recorded=at)]
            )

        async def never(path: Path) -> AuditQueue:
            raise AssertionError(path)

        store = ShardedStore(paths, opened=dict(enumerate(queues)), open_shard=never)
        reports = store
        ((ts, seq),) = (await reports.first_accesses([("dr.x", "Patient/a")])).values()
        assert ts == (T0 + timedelta(minutes=5)).timestamp() and seq % 2 == 1, "shard 1's"
        around = await reports.user_accesses([("dr.x", T0.timestamp(), T0.timestamp() + 3600)])
        assert [round(a.ts - T0.timestamp()) for a in around["dr.x"]] == [300, 1800, 3000]
        counts = await reports.activity(EventQuery(date_from=T0, date_to=T0 + timedelta(hours=2)))
        assert sum(c.events for c in counts) == 4
        page = await store.search_page(replace(EventQuery(), newest_first=False))
        assert page.items[0].seq == seq, "the same global seq as searches give"
    finally:
        for q in queues:
            await q.close()


def report_queries(rng: random.Random) -> list[EventQuery]:
    """Queries as the reports ask them: a patient's events, or a user's (as requestor),
    in a period or not, admin reads left out or not."""
    out = [EventQuery(), EventQuery(unmarked=(Mark.ADMIN_ACCESS.value,))]
    for _ in range(30):
        start = T0 + timedelta(seconds=rng.uniform(-3600, 3 * 86_400))
        period = EventQuery(
            date_from=start if rng.random() < 0.7 else None,
            date_to=start + timedelta(hours=rng.uniform(1, 48)) if rng.random() < 0.7 else None,
            unmarked=rng.choice([(), (Mark.ADMIN_ACCESS.value,)]),
        )
        if rng.random() < 0.5:
            out.append(replace(period, patient=f"Patient/p{rng.randrange(12)}"))
        else:
            user = rng.choice(["u0", "u1", "u2", "u3", "token:1"])
            out.append(replace(period, agent=user, user=user))
    return out


def as_json_says(item: QueuedEvent) -> tuple[Any, ...]:
    """What :meth:`ReportReader.indexed` should say of ``item``, read from its JSON."""
    event = item.event
    return (
        item.seq,
        item.recorded_ts,
        user_of(event),
        tuple(patients_of(event)),
        outcome_code_of(event),
        tuple(subtype_codes(event)),
        who_of(event.get("agent", ())).column(),
        frozenset(marks_of_event(event)),
    )


def as_row_says(item: IndexedEvent) -> tuple[Any, ...]:
    return (
        item.seq,
        item.ts,
        item.user,
        item.patients,
        item.outcome,
        item.subtypes,
        item.who,
        item.marks,
    )


async def walked(store: EventReader, query: EventQuery) -> list[QueuedEvent]:
    """Every event ``query`` matches, newest first, by the search's pages."""
    page_query = replace(query, limit=37, count_total=False, newest_first=True)
    found: list[QueuedEvent] = []
    while True:
        page = await store.search_page(page_query)
        found += page.items
        if not page.more_after or not page.items:
            return found
        page_query = replace(page_query, after=page.cursor_of(page.items[-1], query.sort))


async def test_indexed_events_are_the_search_s_as_their_json_says_them(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """Through fan-outs (and their splitting), admin reads and pruning: the events a
    report sums up from its rows are those the search finds, each as its JSON says it;
    ``events_at`` reads any of them back by seq."""
    rng = random.Random(11)
    queue = await open_store(tmp_path / "audit.db", max_bytes=1 << 30)
    await fill(queue, rng)
    fanned = 0
    for query in report_queries(rng):
        expected = await walked(queue, query)
        indexed = await queue.indexed(replace(query, limit=10_000))
        assert [as_row_says(i) for i in indexed] == [as_json_says(e) for e in expected], query
        assert await queue.indexed(replace(query, limit=5)) == indexed[:5]
        fanned += len({e.event_id[:-4] for e in expected if not e.event_id.endswith("0000")})
        wanted = rng.sample([e.seq for e in expected], min(len(expected), 9))
        wanted += [10**9, *wanted[:1]]  # one no event has, and one asked twice
        by_seq = {e.seq: e for e in expected}
        assert await queue.events_at(wanted) == [by_seq[s] for s in wanted if s in by_seq]
    assert fanned, "some events are a fan-out's other than its first"


async def test_shards_give_indexed_events_and_events_by_their_global_seq(
    tmp_path: Path, open_store: OpenStore
) -> None:
    paths = [tmp_path / "audit-0.db", tmp_path / "audit-1.db"]
    queues = [await open_store(p, max_bytes=1 << 30) for p in paths]
    for n, queue in enumerate(queues):
        await fill(queue, random.Random(n))

    async def never(path: Path) -> AuditQueue:
        raise AssertionError(path)

    store = ShardedStore(paths, opened=dict(enumerate(queues)), open_shard=never)
    for query in report_queries(random.Random(5))[:12]:
        expected = await walked(store, query)
        indexed = await store.indexed(replace(query, limit=10_000))
        assert [as_row_says(i) for i in indexed] == [as_json_says(e) for e in expected], query
        wanted = [e.seq for e in expected[::7]]
        assert await store.events_at(wanted) == expected[::7]
