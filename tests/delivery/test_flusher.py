"""The flusher over a real store and a real HTTP repository: in-order delivery, backoff on
outages, bisection of a rejected batch down to the poison events, and the shutdown drain."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.delivery.flusher import Flusher
from proxy.delivery.http import FhirRepositorySink, HttpRepository
from proxy.store.queue import AuditQueue
from tests.factories import ScriptedRepository, audit_event, search_exchange


def _flusher(
    queue: AuditQueue, repo: ScriptedRepository, http: aiohttp.ClientSession, **kwargs: Any
) -> Flusher:
    settings = HttpRepository(url=repo.url, **kwargs)
    return Flusher(queue, FhirRepositorySink(settings, http), settings, rng=random.Random(7))


async def _append(queue: AuditQueue, events: list[dict[str, Any]]) -> None:
    for event in events:
        await queue.append([event])


def _reject_when(poison_ids: set[str]) -> Any:
    async def behaviour(request: web.Request, raw: bytes) -> web.Response | None:
        bundle = orjson.loads(raw)
        bad = [e["resource"]["id"] for e in bundle["entry"] if e["resource"]["id"] in poison_ids]
        if bad:
            return web.json_response(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "error", "code": "invalid", "diagnostics": f"bad {bad}"}
                    ],
                },
                status=422,
            )
        return None

    return behaviour


async def test_one_poison_event_in_a_batch_of_100_goes_dead_and_99_are_delivered(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(100)]
    poison = events[37]["id"]
    await _append(queue, events)
    scripted_repository.behaviour = _reject_when({poison})
    flusher = _flusher(queue, scripted_repository, http, batch_count=100)

    delivered = await flusher.flush_once()

    assert delivered == 99
    assert scripted_repository.delivered_ids() == [e["id"] for e in events if e["id"] != poison]
    (dead,) = await queue.list_dead()
    assert dead.event_id == poison
    assert "HTTP 422" in (dead.last_error or "") and poison in (dead.last_error or "")
    stats = await queue.stats()
    assert (stats.pending, stats.delivered, stats.dead) == (0, 99, 1)
    # Bisection costs about 2·log2(n) requests, not n.
    assert len(scripted_repository.requests) <= 2 * math.ceil(math.log2(100)) + 1
    assert flusher.failures == 0, "a rejection is not an outage"


async def test_several_poison_events_are_all_isolated(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(40)]
    poison = {events[0]["id"], events[13]["id"], events[14]["id"], events[39]["id"]}
    await _append(queue, events)
    scripted_repository.behaviour = _reject_when(poison)
    delivered = await _flusher(queue, scripted_repository, http, batch_count=40).flush_once()
    assert delivered == 36
    assert {d.event_id for d in await queue.list_dead()} == poison
    assert scripted_repository.delivered_ids() == [e["id"] for e in events if e["id"] not in poison]


async def test_dead_events_requeued_are_delivered_once_the_repository_takes_them(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(4)]
    await _append(queue, events)
    scripted_repository.behaviour = _reject_when({events[1]["id"]})
    flusher = _flusher(queue, scripted_repository, http)
    await flusher.flush_once()
    scripted_repository.behaviour = None  # the repository was fixed
    assert await queue.requeue_dead() == 1
    assert await flusher.flush_once() == 1
    assert sorted(scripted_repository.delivered_ids()) == sorted(e["id"] for e in events)
    assert (await queue.stats()).dead == 0


async def test_delivery_is_in_queue_order_across_batches(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(25)]
    await _append(queue, events)
    flusher = _flusher(queue, scripted_repository, http, batch_count=7)
    sizes = [await flusher.flush_once() for _ in range(5)]
    assert sizes == [7, 7, 7, 4, 0]
    assert scripted_repository.delivered_ids() == [e["id"] for e in events]


async def test_an_outage_holds_events_back_with_backoff_then_delivers_them(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(5)]
    await _append(queue, events)

    async def down(request: web.Request, raw: bytes) -> web.Response:
        return web.json_response({"resourceType": "OperationOutcome"}, status=503)

    scripted_repository.behaviour = down
    flusher = _flusher(
        queue, scripted_repository, http, flush_interval_ms=1000, max_flush_interval_ms=8000
    )
    now = datetime.now(UTC)
    assert await flusher.flush_once(now) == 0
    assert flusher.failures == 1
    assert await queue.claim(10, now) == [], "held back until the backoff passes"
    held = await queue.claim(10, now + timedelta(seconds=2))
    assert [q.event_id for q in held] == [e["id"] for e in events]
    assert {q.attempts for q in held} == {1}
    assert {q.last_error for q in held} == {'HTTP 503: {"resourceType": "OperationOutcome"}'}

    scripted_repository.behaviour = None
    assert await flusher.flush_once(now + timedelta(seconds=2)) == 5
    assert flusher.failures == 0
    assert scripted_repository.delivered_ids() == [e["id"] for e in events]


@pytest.mark.parametrize(("interval_ms", "max_ms"), [(1000, 60000), (50, 400), (500, 500)])
def test_backoff_grows_exponentially_with_jitter_and_stays_within_bounds(
    interval_ms: int, max_ms: int
) -> None:
    settings = HttpRepository(
        url="http://127.0.0.1:9/fhir", flush_interval_ms=interval_ms, max_flush_interval_ms=max_ms
    )
    flusher = Flusher(None, None, settings, rng=random.Random(1))  # type: ignore[arg-type]
    interval, cap = interval_ms / 1000, max_ms / 1000
    seen_caps = []
    for failures in range(1, 30):
        flusher.failures = failures
        ceiling = min(cap, interval * 2 ** (failures - 1))
        waits = [flusher.backoff_s() for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (failures, min(waits), max(waits))
        assert max(waits) - min(waits) > ceiling / 4, "jitter spreads the retries"
        seen_caps.append(ceiling)
    assert seen_caps[-1] == cap, "it reaches max_flush_interval and stays there"


async def test_drain_sends_everything_pending_ignoring_backoff(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(30)]
    await _append(queue, events)
    await queue.nack([1, 2, 3], "earlier outage", datetime.now(UTC) + timedelta(hours=1))
    flusher = _flusher(queue, scripted_repository, http, batch_count=8)
    assert await flusher.drain(timeout_s=5) == 30
    assert scripted_repository.delivered_ids() == [e["id"] for e in events]


async def test_drain_stops_at_the_first_failure(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    await _append(queue, [audit_event(i) for i in range(10)])

    async def down(request: web.Request, raw: bytes) -> web.Response:
        return web.json_response({}, status=500)

    scripted_repository.behaviour = down
    flusher = _flusher(queue, scripted_repository, http, batch_count=5)
    assert await flusher.drain(timeout_s=5) == 0
    assert len(scripted_repository.requests) == 1
    assert (await queue.stats()).pending == 10, "nothing lost: it waits for the next start"


async def test_fan_outs_are_delivered_event_by_event_in_order_across_batches_and_rejections(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    """Searches' events stored as one row each (tests/store/test_fans.py) go out as the
    events they are: batches cut through them, one of them rejected and dead-lettered
    alone, the rest delivered once each in the order they were stored."""
    expected: list[str] = []
    for n in range(4):
        patients = [f"Patient/f{n}-{k}" for k in range(5)]
        built = build_events(search_exchange(patients), AuditContext.default(), datetime.now(UTC))
        await queue.append_rows(store_rows(built))
        expected += [b.row.event_id for b in built]
        plain = audit_event(n)
        await queue.append([plain])
        expected.append(plain["id"])
    poison = expected[8]
    scripted_repository.behaviour = _reject_when({poison})
    flusher = _flusher(queue, scripted_repository, http, batch_count=4)
    while await flusher.flush_once():
        pass
    assert scripted_repository.delivered_ids() == [i for i in expected if i != poison]
    assert [d.event_id for d in await queue.list_dead()] == [poison]
    stats = await queue.stats()
    assert (stats.pending, stats.delivered, stats.dead) == (0, len(expected) - 1, 1)


async def _down(request: web.Request, raw: bytes) -> web.Response:
    return web.json_response({"resourceType": "OperationOutcome"}, status=503)


async def test_a_drain_during_an_outage_holds_events_back_no_longer_than_the_max_interval(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    """The shutdown drain ignores the backoff to claim, but what it stores when the
    repository fails is an ordinary backoff: the next start is not held back for years."""
    events = [audit_event(i) for i in range(3)]
    await _append(queue, events)
    scripted_repository.behaviour = _down
    flusher = _flusher(
        queue, scripted_repository, http, flush_interval_ms=100, max_flush_interval_ms=2000
    )
    assert await flusher.drain(timeout_s=5) == 0
    assert len(scripted_repository.requests) == 1
    later = datetime.now(UTC) + timedelta(seconds=2, milliseconds=500)
    held = await queue.claim(10, later)
    assert [q.event_id for q in held] == [e["id"] for e in events], "due within the max"


async def test_a_new_flusher_sends_at_once_what_an_earlier_process_held_back_for_years(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    """A ``retry_at`` left far in the future (by an older version's shutdown drain, or a
    clock set back) must not block the queue after a restart."""
    events = [audit_event(i) for i in range(3)]
    await _append(queue, events)
    await queue.nack([1, 2, 3], "an older version's drain", datetime.now(UTC) + timedelta(3650))
    flusher = _flusher(queue, scripted_repository, http, flush_interval_ms=50)
    task = asyncio.create_task(flusher.run())
    try:
        for _ in range(200):
            if (await queue.stats()).delivered == 3:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert scripted_repository.delivered_ids() == [e["id"] for e in events]
    assert (await queue.stats()).pending == 0


async def test_backoff_grows_over_consecutive_failed_flushes_up_to_the_max_interval(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    """Seven flushes in a row fail (each at the previous failure's retry time): the count
    of failures is 7, every retry is further out than the one before, the wait doubles
    (with jitter) from flush_interval until it reaches max_flush_interval, and stays."""
    await _append(queue, [audit_event(i) for i in range(3)])
    scripted_repository.behaviour = _down
    flusher = _flusher(
        queue, scripted_repository, http, flush_interval_ms=100, max_flush_interval_ms=1600
    )
    at = datetime.now(UTC)
    retries: list[datetime] = []
    waits: list[float] = []
    for k in range(1, 8):
        assert await flusher.flush_once(at) == 0
        assert flusher.failures == k
        assert await queue.claim(10, at) == [], "held back after the failure"
        held = await queue.claim(10, at + timedelta(days=1))
        assert {q.attempts for q in held} == {k}
        (retry_at,) = {q.next_attempt_at for q in held}
        assert retry_at is not None
        retries.append(retry_at)
        waits.append((retry_at - at).total_seconds())
        at = retry_at
    assert len(scripted_repository.requests) == 7, "one attempt a flush"
    assert retries == sorted(retries) and len(set(retries)) == 7, "each retry further out"
    ceilings = [min(1.6, 0.1 * 2 ** (k - 1)) for k in range(1, 8)]  # 0.1 ... 1.6, 1.6, 1.6
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 - 1e-3 <= wait <= ceiling + 1e-3, (waits, ceilings)
    assert all(a < b for a, b in itertools.pairwise(waits[:5])), f"the wait doubles: {waits}"


async def test_single_mode_a_503_for_the_second_event_delivers_the_first_and_resends_the_second(
    queue: AuditQueue, scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    first, second = audit_event(1), audit_event(2)
    await _append(queue, [first, second])
    answers = iter([201, 503])

    async def accept_then_fail(request: web.Request, raw: bytes) -> web.Response:
        status = next(answers, 201)
        return web.json_response(orjson.loads(raw) if status < 300 else {}, status=status)

    scripted_repository.behaviour = accept_then_fail
    flusher = _flusher(queue, scripted_repository, http, mode="single", flush_interval_ms=100)
    now = datetime.now(UTC)
    assert await flusher.flush_once(now) == 1
    stats = await queue.stats()
    assert (stats.delivered, stats.pending) == (1, 1)
    (left,) = await queue.claim(10, now + timedelta(days=1))
    assert (left.event_id, left.attempts) == (second["id"], 1)
    assert scripted_repository.delivered_ids() == [first["id"]]

    assert await flusher.flush_once(now + timedelta(seconds=1)) == 1, "sent again later"
    assert scripted_repository.delivered_ids() == [first["id"], second["id"]]
    assert [r["path"] for r in scripted_repository.requests] == ["/fhir/AuditEvent"] * 3
    assert [r["json"]["id"] for r in scripted_repository.requests] == [
        first["id"],
        second["id"],
        second["id"],
    ]
    assert (await queue.stats()).pending == 0
