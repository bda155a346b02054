"""``fhir-audit-proxy relay``: sidecar proxies publish to a 3-node JetStream cluster, two
relays (real processes) deliver to the test FHIR server in ``transaction`` mode, and one
relay is killed mid-run: every event ends up in the repository once. And a rejected
event goes to the dead-letter subject, the rest on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from pydantic import ValidationError

from proxy.delivery.jetstream import JetStreamConnection, JetStreamRepository
from proxy.delivery.kafka import KafkaConnection, KafkaRepository
from proxy.delivery.relay import RelaySettings, TopicQueue
from proxy.delivery.sink import Origin, RepositoryUnavailable
from tests.factories import (
    NatsServer,
    NodeFhirServer,
    RelayProcess,
    ScriptedRepository,
    StartProxy,
    TansuBroker,
    add_stream,
    add_stream_when_ready,
    audit_event,
    audit_event_about,
    create_topic,
    nats_cluster,
    new_patient,
    stream_messages,
    topic_records,
)

if TYPE_CHECKING:
    from nats.js.api import ConsumerInfo

    from proxy.store.records import QueuedEvent

READS_EACH = 60


def _relay_config(nats_url: str, repository: dict[str, Any], **relay: Any) -> dict[str, Any]:
    return {
        "admin": {"host": "127.0.0.1", "port": 0},
        "relay": {
            "source": {
                "url": nats_url,
                "stream": "AUDIT",
                "subject": "audit.{shard}",
            },
            "consumer": "relay",
            "ack_wait_s": 3,
            **relay,
        },
        "repository": {
            "batch_count": 20,
            "flush_interval_ms": 50,
            "max_flush_interval_ms": 500,
            "timeout_s": 5,
            **repository,
        },
    }


async def _in_repository(http: aiohttp.ClientSession, base: str, event_id: str) -> bool:
    async with http.get(f"{base}/AuditEvent/{event_id}") as r:
        return r.status == 200


async def _consumer(url: str) -> ConsumerInfo:
    """The relays' consumer as the stream sees it (``num_ack_pending``: messages delivered
    to a relay and not acknowledged yet; see :func:`_offered_again`)."""
    import nats

    nc = await nats.connect(url)
    try:
        info: ConsumerInfo = await nc.jetstream(timeout=5).consumer_info("AUDIT", "relay")
        return info
    finally:
        await nc.close()


def _offered_again(info: ConsumerInfo) -> int:
    """Deliveries beyond the first of each message (held by a relay that died, or handed
    back): the consumer's deliveries counted against the stream's messages delivered, the
    stream's first being seq 1. (``num_redelivered`` counts only those not yet acked.)"""
    assert info.delivered is not None
    return (info.delivered.consumer_seq or 0) - (info.delivered.stream_seq or 0)


@contextlib.asynccontextmanager
async def _holder_and_taker(
    config: dict[str, Any], workdir: Path
) -> AsyncIterator[tuple[RelayProcess, RelayProcess]]:
    """Two relays of one consumer, not started; stopped (if running) on the way out."""
    holder = RelayProcess(config, workdir / "holder")
    taker = RelayProcess(config, workdir / "taker")
    try:
        yield holder, taker
    finally:
        await holder.stop()
        await taker.stop()


async def _until_delivered(repository: ScriptedRepository, count: int, within_s: float) -> None:
    """Until ``count`` distinct events were answered 2xx, or ``within_s`` passed."""
    for _ in range(int(within_s / 0.05)):
        if len(set(repository.delivered_ids())) >= count:
            return
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_sidecars_to_a_cluster_to_two_relays_one_killed_every_event_in_the_repository_once(
    tmp_path: Path,
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nodes = nats_cluster(tmp_path / "nats")
    (tmp_path / "nats").mkdir()
    for node in nodes:
        node.start()
    relays = [RelayProcess({}, tmp_path / f"relay-{n}") for n in range(2)]
    try:
        for node in nodes:
            await node.wait_ready()
        await add_stream_when_ready(nodes[0].url, "AUDIT", ["audit.>"], replicas=3)
        urls = ",".join(node.url for node in nodes)
        repository = {
            "mode": "jetstream",
            "url": urls,
            "stream": "AUDIT",
            "subject": "audit.{shard}",
            "batch_count": 20,
            "flush_interval_ms": 20,
        }
        proxies = [
            await start_proxy(
                fhir_server.base_url,
                store={"path": tmp_path / f"proxy-{n}" / "audit.db"},
                repository=repository,
            )
            for n in range(2)
        ]
        config = _relay_config(urls, {"mode": "transaction", "url": fhir_server.base_url})
        for relay in relays:
            relay.path.write_text(yaml.safe_dump(config))
            await relay.start()
        patient = await new_patient(http, proxies[0].url)

        async def reads(base: str) -> None:
            for _ in range(READS_EACH):
                async with http.get(f"{base}/Patient/{patient['id']}") as r:
                    assert r.status == 200

        load = asyncio.gather(*(reads(p.url) for p in proxies for _ in range(2)))
        stored: list[str] = []
        try:
            await asyncio.sleep(1.0)  # the relays are delivering
            await relays[0].kill()
            await load
            for proxy in proxies:
                stored += [event["id"] for event in await proxy.stored_events()]
            found: set[str] = set()
            for _ in range(120):
                missing = [i for i in stored if i not in found]
                present = await asyncio.gather(
                    *(_in_repository(http, fhir_server.base_url, i) for i in missing)
                )
                found.update(i for i, here in zip(missing, present, strict=True) if here)
                if len(found) == len(stored):
                    break
                await asyncio.sleep(0.5)
        finally:
            if not load.done():
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
        in_stream = await stream_messages(nodes[1].url, "AUDIT")
        redelivered = _offered_again(await _consumer(nodes[1].url))
        with capsys.disabled():
            print(
                f"\nrelay: acknowledged by the proxies {len(stored)}, in the stream"
                f" {len({m.msg_id for m in in_stream})}, in the repository {len(found)} (once"
                f" each: PUT by id), offered again by the stream {redelivered}"
            )
        assert len(stored) == 1 + 4 * READS_EACH
        assert {m.msg_id for m in in_stream} == set(stored)
        assert set(found) == set(stored), "every event is in the repository"
        log = relays[1].log.read_text()
        assert "Traceback" not in log, log[-2000:]
    finally:
        for relay in relays:
            await relay.stop()
        for node in nodes:
            node.stop()


async def test_a_rejected_event_goes_to_the_dead_letter_subject_and_the_rest_on(
    nats_server: NatsServer, scripted_repository: ScriptedRepository
) -> None:
    await add_stream(nats_server.url, "AUDIT", ["audit.>"])
    await add_stream(nats_server.url, "DEAD", ["dead.audit"])
    events = [audit_event(i) for i in range(6)]
    poison = events[3]["id"]

    async def reject_poison(request: web.Request, raw: bytes) -> web.Response | None:
        if poison.encode() in raw:
            return web.json_response({"resourceType": "OperationOutcome"}, status=422)
        return None

    scripted_repository.behaviour = reject_poison
    sink = await JetStreamRepository(url=nats_server.url, subject="audit.x").open_sink(Origin())
    try:
        await sink.send(events)
    finally:
        await sink.close()
    relay = RelayProcess(
        _relay_config(
            nats_server.url,
            {"mode": "bundle", "url": scripted_repository.url},
            dead_letter_subject="dead.audit",
        ),
        nats_server.directory / "relay",
    )
    await relay.start()
    try:
        for _ in range(600):
            if len(await stream_messages(nats_server.url, "DEAD")) == 1:
                break
            await asyncio.sleep(0.05)
        for _ in range(600):
            if len(scripted_repository.delivered_ids()) == 5:
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
    (dead,) = await stream_messages(nats_server.url, "DEAD")
    assert dead.event["id"] == poison
    assert sorted(scripted_repository.delivered_ids()) == sorted(
        e["id"] for e in events if e["id"] != poison
    )


async def test_a_relay_killed_holding_messages_leaves_them_to_another(
    nats_server: NatsServer, scripted_repository: ScriptedRepository
) -> None:
    await add_stream(nats_server.url, "AUDIT", ["audit.>"])
    events = [audit_event(i) for i in range(30)]
    sink = await JetStreamRepository(url=nats_server.url, subject="audit.x").open_sink(Origin())
    try:
        await sink.send(events)
    finally:
        await sink.close()
    arrived = asyncio.Event()

    async def hold(request: web.Request, raw: bytes) -> web.Response | None:
        arrived.set()
        await asyncio.sleep(30)  # past the relay's timeout: it never sees an answer
        return None

    scripted_repository.behaviour = hold
    config = _relay_config(nats_server.url, {"mode": "bundle", "url": scripted_repository.url})
    async with _holder_and_taker(config, nats_server.directory) as (holder, taker):
        await holder.start()
        await asyncio.wait_for(arrived.wait(), 20)
        await holder.kill()
        held = (await _consumer(nats_server.url)).num_ack_pending or 0
        scripted_repository.behaviour = None
        await taker.start()
        await _until_delivered(scripted_repository, len(events), within_s=30)
    assert held > 0, "the killed relay held messages it had not acknowledged"
    assert sorted(set(scripted_repository.delivered_ids())) == sorted(e["id"] for e in events)
    assert _offered_again(await _consumer(nats_server.url)) >= held


def test_a_kafka_url_makes_the_source_a_kafka_topic() -> None:
    kafka = RelaySettings(source={"url": "kafka://k0:9092,kafka://k1:9092", "topic": "audit"})
    assert isinstance(kafka.source, KafkaConnection)
    assert kafka.source.topic == "audit"
    nats = RelaySettings(source={"url": "nats://n:4222", "stream": "AUDIT"})
    assert isinstance(nats.source, JetStreamConnection)
    with pytest.raises(ValidationError, match="stream"):
        RelaySettings(source={"url": "kafka://k0:9092", "stream": "AUDIT"})


async def test_a_kafka_relay_killed_holding_records_leaves_them_to_another(
    tansu: TansuBroker, scripted_repository: ScriptedRepository
) -> None:
    """Two relays in one consumer group: the first takes every partition, sends a batch
    the repository never answers and is SIGKILLed; the second gets the partitions once the
    group's session times out and delivers everything, the held batch included (offsets
    are committed only after the repository's 2xx)."""
    await create_topic(tansu.bootstrap, "audit", partitions=3)
    events = [audit_event_about(i, f"Patient/p{i % 5}") for i in range(40)]
    sink = await KafkaRepository(url=tansu.url, idempotent=False).open_sink(Origin())
    try:
        await sink.send(events)
    finally:
        await sink.close()
    held: list[str] = []
    arrived = asyncio.Event()

    async def hold(request: web.Request, raw: bytes) -> web.Response | None:
        held.extend(e["resource"]["id"] for e in orjson.loads(raw)["entry"])
        arrived.set()
        await asyncio.sleep(30)  # past the relay's timeout: it never sees an answer
        return None

    scripted_repository.behaviour = hold
    config = _relay_config(
        tansu.url, {"mode": "bundle", "url": scripted_repository.url}, ack_wait_s=6
    )
    config["relay"]["source"] = {"url": tansu.url, "topic": "audit"}
    async with _holder_and_taker(config, tansu.directory) as (holder, taker):
        await holder.start()
        await asyncio.wait_for(arrived.wait(), 30)
        await holder.kill()
        scripted_repository.behaviour = None
        await taker.start()
        await _until_delivered(scripted_repository, len(events), within_s=60)
    delivered = scripted_repository.delivered_ids()
    assert held, "the killed relay held records it had not committed"
    assert sorted(set(delivered)) == sorted(e["id"] for e in events)
    assert set(held) <= set(delivered)
    log = taker.log.read_text()
    assert "Traceback" not in log, log[-2000:]


async def test_a_kafka_relay_retries_an_outage_and_dead_letters_a_rejected_event(
    tansu: TansuBroker, scripted_repository: ScriptedRepository
) -> None:
    """The repository answers 503 twice (the relay seeks back and sends again), then
    rejects one event (it goes to the dead-letter topic); each partition's events reach
    the repository in their order (one patient's events: one partition), none lost."""
    await create_topic(tansu.bootstrap, "audit", partitions=3)
    await create_topic(tansu.bootstrap, "dead", partitions=1)
    events = [audit_event_about(i, f"Patient/p{i % 3}") for i in range(30)]
    poison = events[17]["id"]
    sink = await KafkaRepository(url=tansu.url, idempotent=False).open_sink(Origin())
    try:
        await sink.send(events)
    finally:
        await sink.close()
    outages = [503, 503]

    async def flaky(request: web.Request, raw: bytes) -> web.Response | None:
        if outages:
            return web.json_response({}, status=outages.pop())
        if poison.encode() in raw:
            return web.json_response({"resourceType": "OperationOutcome"}, status=422)
        return None

    scripted_repository.behaviour = flaky
    config = _relay_config(
        tansu.url,
        {"mode": "bundle", "url": scripted_repository.url},
        ack_wait_s=6,
        dead_letter_subject="dead",
    )
    config["relay"]["source"] = {"url": tansu.url, "topic": "audit"}
    relay = RelayProcess(config, tansu.directory / "relay")
    await relay.start()
    try:
        await _until_delivered(scripted_repository, len(events) - 1, within_s=30)
        dead = await topic_records(tansu.bootstrap, "dead", 1)
    finally:
        await relay.stop()
    delivered = scripted_repository.delivered_ids()
    assert not outages, "the repository's outage was met"
    assert sorted(set(delivered)) == sorted(e["id"] for e in events if e["id"] != poison)
    assert [r.event["id"] for r in dead] == [poison]
    for n in range(3):
        mine = [e["id"] for e in events[n::3] if e["id"] != poison]
        assert [i for i in dict.fromkeys(delivered) if i in mine] == mine, "a patient's in order"


async def test_a_dead_letter_topic_that_takes_nothing_leaves_the_record_to_come_again(
    tansu: TansuBroker, tmp_path: Path
) -> None:
    """The dead-letter producer fails (its broker is gone): the rejected record is not
    settled, and once the flusher nacks it the relay reads it again, so its partition's
    commits are never stuck behind it."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    await create_topic(tansu.bootstrap, "audit", partitions=1)
    events = [audit_event(i) for i in range(3)]
    sink = await KafkaRepository(url=tansu.url, idempotent=False).open_sink(Origin())
    try:
        await sink.send(events)
    finally:
        await sink.close()
    gone = TansuBroker(tmp_path / "gone")
    gone.directory.mkdir()
    gone.start()
    await gone.wait_ready()
    producer = AIOKafkaProducer(bootstrap_servers=gone.bootstrap, request_timeout_ms=1000)
    await producer.start()
    gone.kill()
    consumer = AIOKafkaConsumer(
        "audit", bootstrap_servers=tansu.bootstrap, group_id="g", auto_offset_reset="earliest"
    )
    await consumer.start()
    settings = RelaySettings(dead_letter_subject="dead")
    queue = TopicQueue(consumer, producer, settings, wait_s=1.0)
    anytime = datetime.max.replace(tzinfo=UTC)
    try:
        claimed: list[QueuedEvent] = []
        for _ in range(20):
            claimed += await queue.claim(10, anytime)
            if len(claimed) == len(events):
                break
        assert [q.event_id for q in claimed] == [e["id"] for e in events]
        await queue.ack([claimed[0].seq], anytime)
        with pytest.raises(RepositoryUnavailable, match="dead-letter topic 'dead'"):
            await queue.dead_letter([claimed[1].seq], "HTTP 422")
        await queue.nack([q.seq for q in claimed[1:]], "HTTP 422", datetime.now(UTC))
        again: list[QueuedEvent] = []
        for _ in range(20):
            again += await queue.claim(10, anytime)
            if len(again) == 2:
                break
        assert [q.event_id for q in again] == [e["id"] for e in events[1:]]
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 5)
