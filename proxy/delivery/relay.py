"""``fhir-audit-proxy relay``: the other end of the stream. A JetStream durable pull
consumer feeds the flusher (the same batching, backoff, bisection and dead letters as a
sidecar's) and a sink of ``repository:`` delivers; a message is acknowledged to the
stream only after the repository has taken it (its 2xx). Several relays with the same
``consumer`` share the work: each pull takes messages no other relay holds, and a relay
that dies leaves its unacknowledged messages to be redelivered to the others after
``ack_wait_s``. ``transaction`` mode (PUT by id) makes such a redelivery harmless.

A message the repository rejects (after bisection) is published to
``dead_letter_subject`` with the repository's answer in its ``Audit-Error`` header, when
one is set, and then terminated: the stream never offers it again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import Field

from proxy.delivery.jetstream import JetStreamConnection, connect
from proxy.delivery.sink import RepositoryUnavailable, SinkUnusable
from proxy.settings_base import Frozen, Positive, PositiveInt

if TYPE_CHECKING:
    from aiohttp import web
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from proxy.settings import Settings
    from proxy.store.records import QueuedEvent

log = logging.getLogger(__name__)


class RelaySettings(Frozen):
    """``relay:``: the stream a relay consumes (``repository:`` is where it delivers)."""

    source: JetStreamConnection = Field(default_factory=JetStreamConnection)
    """The stream, as the sidecars' ``repository:`` names it (url, stream, subject,
    credentials); the relay consumes every subject the template can make."""
    consumer: str = Field(default="fhir-audit-relay", pattern=r"^[A-Za-z0-9_-]+$")
    """The durable consumer's name: relays with the same name share the work."""
    ack_wait_s: Positive = 60.0
    """How long a message may stay unacknowledged before the stream offers it again (to
    any relay): longer than a batch's delivery, backoff included."""
    max_ack_pending: PositiveInt = 1000
    """Most messages held unacknowledged by all the consumer's relays together."""
    dead_letter_subject: str | None = None
    """Where rejected events are published (a stream should take it); None: only logged."""


class StreamQueue:
    """A JetStream pull consumer as the flusher's queue: ``claim`` fetches, ``ack`` and
    ``nack`` acknowledge or ask for a delayed redelivery, ``dead_letter`` terminates."""

    def __init__(
        self, js: JetStreamContext, subscription: Any, settings: RelaySettings, wait_s: float
    ) -> None:
        self._js = js
        self._subscription = subscription
        self._settings = settings
        self._wait_s = wait_s
        self._held: dict[int, Msg] = {}
        self._next = 0

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        import nats.errors

        from proxy.store.records import EventStatus, QueuedEvent

        try:
            messages = await self._subscription.fetch(batch=limit, timeout=self._wait_s)
        except TimeoutError:  # nats-py raises its own subclass or asyncio's: nothing to fetch
            return []
        except nats.errors.Error as exc:
            log.warning("relay cannot fetch from the stream: %s", exc)
            await asyncio.sleep(self._wait_s)
            return []
        claimed: list[QueuedEvent] = []
        for message in messages:
            try:
                event = orjson.loads(message.data)
                event_id = str(event["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("stream message %s is no AuditEvent; terminated", message.subject)
                await message.term()
                continue
            self._next += 1
            self._held[self._next] = message
            claimed.append(
                QueuedEvent(
                    seq=self._next,
                    event_id=event_id,
                    event=event,
                    status=EventStatus.PENDING,
                    attempts=message.metadata.num_delivered - 1,
                    next_attempt_at=None,
                    last_error=None,
                    recorded=str(event.get("recorded", "")),
                )
            )
        return claimed

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        for seq in seqs:
            await self._held.pop(seq).ack()

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        delay = max((retry_at - datetime.now(retry_at.tzinfo)).total_seconds(), 0.0)
        for seq in seqs:
            await self._held.pop(seq).nak(delay=delay)

    async def release(self) -> None:
        """Hand back every message still held (a relay stopping): redelivered at once."""
        held, self._held = self._held, {}
        for message in held.values():
            await message.nak()

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        subject = self._settings.dead_letter_subject
        for seq in seqs:
            message = self._held.pop(seq)
            if subject is not None:
                await self._js.publish(
                    subject, message.data, headers={"Audit-Error": error[:1024].replace("\n", " ")}
                )
            await message.term()


async def relay(settings: Settings, stop: asyncio.Event) -> None:
    """Consume ``settings.relay.source`` and deliver to ``settings.repository`` until
    ``stop`` is set. A stream that cannot be consumed raises :class:`SinkUnusable`."""
    import nats.errors
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig

    from proxy import telemetry
    from proxy.delivery.flusher import Flusher
    from proxy.delivery.sink import Origin
    from proxy.tasks import running

    own = settings.relay
    source = own.source
    if source.url is None:
        raise SinkUnusable("relay.source.url: the NATS servers of the stream to relay from")
    if settings.repository.url is None:
        raise SinkUnusable("repository.url: where the relay delivers the events")
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
        health = await _serve_health(settings, lambda: nc.is_connected)
        repo = settings.repository
        queue = StreamQueue(js, subscription, own, wait_s=repo.flush_interval_ms / 1000)
        sink = telemetry.TimedSink(await repo.open_sink(Origin()))
        flusher = Flusher(queue, sink, repo)
        log.info("relay: %s as consumer %s -> %s", source.target(), own.consumer, repo.target())
        try:
            async with running(flusher.run(), "relay flusher"):
                await stop.wait()
        finally:
            await queue.release()
            await sink.close()
            await health.cleanup()
    finally:
        await nc.drain()


async def _serve_health(settings: Settings, connected: Callable[[], bool]) -> web.AppRunner:
    """``/healthz`` (the relay runs) and ``/readyz`` (its NATS connection is up) on
    ``admin.host:admin.port``, for the kubelet's exec probe (``proxy.k8s.probe``)."""
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = connected()
        return web.json_response(
            {"status": "ready" if ready else "not ready: no NATS connection"},
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
