"""``fhir-audit-proxy relay``: consume ``relay.source`` (a JetStream stream the sidecars
publish to) and deliver to ``repository`` with the sidecar's flusher, until SIGTERM. What
it consumes and how is :mod:`proxy.delivery.relay`; this module runs it (as
:mod:`proxy.app` builds the proxy), with ``/healthz`` and ``/readyz`` on the admin port for
the kubelet's exec probe."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from proxy import telemetry
from proxy.delivery.flusher import Flusher
from proxy.delivery.jetstream import connect
from proxy.delivery.relay import StreamQueue
from proxy.delivery.sink import Origin, RepositoryUnavailable, SinkUnusable
from proxy.tasks import running

if TYPE_CHECKING:
    from proxy.settings import Settings

log = logging.getLogger(__name__)


async def relay(settings: Settings, stop: asyncio.Event) -> None:
    """Consume ``settings.relay.source`` and deliver to ``settings.repository`` until
    ``stop`` is set. A stream that cannot be consumed raises :class:`SinkUnusable`."""
    import nats.errors
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig

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
