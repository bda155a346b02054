"""``fhir-audit-proxy relay``: consume ``relay.source`` (a JetStream stream or a Kafka
topic the sidecars publish to) and deliver to ``repository`` with the sidecar's flusher,
until SIGTERM. What it consumes and how is :mod:`proxy.delivery.relay`; this module runs it
(as :mod:`proxy.app` builds the proxy), with ``/healthz`` and ``/readyz`` on the admin port
for the kubelet's exec probe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import telemetry
from proxy.delivery.flusher import Flusher
from proxy.delivery.jetstream import JetStreamConnection, connect
from proxy.delivery.kafka import KafkaConnection
from proxy.delivery.relay import RelaySettings, StreamQueue, TopicQueue
from proxy.delivery.sink import Origin, RepositoryUnavailable, SinkUnusable
from proxy.tasks import running

if TYPE_CHECKING:
    from proxy.settings import Settings
    from proxy.store.faces import Claims

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Consuming:
    """A relay's source, opened: the flusher's queue over it and whether it is connected."""

    queue: Claims
    connected: Callable[[], bool]
    """For ``/readyz``: the connection to the stream is up (NATS: the client's state;
    Kafka: true once the consumer started, aiokafka reconnecting on its own)."""


async def relay(settings: Settings, stop: asyncio.Event) -> None:
    """Consume ``settings.relay.source`` and deliver to ``settings.repository`` until
    ``stop`` is set. A stream that cannot be consumed raises :class:`SinkUnusable`."""
    if settings.relay.source.url is None:
        raise SinkUnusable("relay.source.url: the stream's servers (nats:// or kafka://)")
    if settings.repository.url is None:
        raise SinkUnusable("repository.url: where the relay delivers the events")
    repo = settings.repository
    wait_s = repo.flush_interval_ms / 1000
    source = settings.relay.source
    consuming = (
        _consume_topic(source, settings.relay, wait_s)
        if isinstance(source, KafkaConnection)
        else _consume_stream(source, settings.relay, wait_s)
    )
    async with consuming as opened:
        health = await _serve_health(settings, opened.connected)
        sink = telemetry.TimedSink(await repo.open_sink(Origin()))
        flusher = Flusher(opened.queue, sink, repo)
        log.info(
            "relay: %s as consumer %s -> %s",
            source.target(),
            settings.relay.consumer,
            repo.target(),
        )
        try:
            async with running(flusher.run(), "relay flusher"):
                await stop.wait()
        finally:
            await sink.close()
            await health.cleanup()


@contextlib.asynccontextmanager
async def _consume_stream(
    source: JetStreamConnection, own: RelaySettings, wait_s: float
) -> AsyncIterator[Consuming]:
    """The JetStream durable pull consumer ``own.consumer``; a stopping relay hands back
    the messages it holds."""
    import nats.errors
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig

    try:
        nc = await connect(source)
    except RepositoryUnavailable as exc:
        raise SinkUnusable(str(exc)) from None
    try:
        js = nc.jetstream(timeout=source.timeout_s)
        try:
            subscription = await js.pull_subscribe(
                source.stream_subject(),
                durable=own.consumer,
                stream=source.stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=own.ack_wait_s,
                    max_deliver=-1,
                    max_ack_pending=own.max_ack_pending,
                ),
            )
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            raise SinkUnusable(
                f"relay cannot consume JetStream stream {source.stream!r} as {own.consumer!r}:"
                f" {exc}"
            ) from None
        queue = StreamQueue(js, subscription, own, wait_s=wait_s)
        try:
            yield Consuming(queue, lambda: nc.is_connected)
        finally:
            await queue.release()
    finally:
        await nc.drain()


@contextlib.asynccontextmanager
async def _consume_topic(
    source: KafkaConnection, own: RelaySettings, wait_s: float
) -> AsyncIterator[Consuming]:
    """A member of the Kafka consumer group ``own.consumer`` on ``source.topic`` (offsets
    committed by the relay, never automatically); a topic that does not exist is a
    start-up error naming it."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
    from aiokafka.errors import KafkaError

    options = source.client_options()
    consumer = AIOKafkaConsumer(
        **options,
        group_id=own.consumer,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(own.ack_wait_s * 1000),
        heartbeat_interval_ms=max(int(own.ack_wait_s * 1000 / 3), 100),
    )
    producer = AIOKafkaProducer(**options, acks="all") if own.dead_letter_subject else None
    try:
        await consumer.start()
        topics = await consumer.topics()
        if producer is not None:
            await producer.start()
    except (KafkaError, OSError, TimeoutError) as exc:
        await consumer.stop()
        raise SinkUnusable(
            f"relay cannot reach Kafka at {source.target()}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        if source.topic not in topics:
            raise SinkUnusable(f"relay cannot consume Kafka topic {source.topic!r}: no such topic")
        queue = TopicQueue(consumer, producer, own, wait_s=wait_s)

        class Forget(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                queue.forget(list(revoked))

            async def on_partitions_assigned(self, assigned: Any) -> None:
                pass

        consumer.subscribe([source.topic], listener=Forget())
        yield Consuming(queue, lambda: True)
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()


async def _serve_health(settings: Settings, connected: Callable[[], bool]) -> web.AppRunner:
    """``/healthz`` (the relay runs) and ``/readyz`` (its connection to the stream is up) on
    ``admin.host:admin.port``, for the kubelet's exec probe (``proxy.k8s.probe``)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = connected()
        return web.json_response(
            {"status": "ready" if ready else "not ready: no connection to the stream"},
            status=200 if ready else 503,
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.admin.host, settings.admin.port).start()
    return runner


def run_relay(settings: Settings) -> None:
    """Run the relay on uvloop until SIGTERM or SIGINT."""
    import uvloop

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await relay(settings, stop)

    uvloop.run(main())
