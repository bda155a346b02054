"""Builds the proxy application. Every long-lived part (the store, the upstream pool, the
JWKS cache, the flusher, maintenance and the admin listener) starts and stops through
``cleanup_ctx``, in that order; shutdown runs the contexts in reverse, so the admin listener
stops first, the flusher drains what it can, and the store closes last. The proxy listener
(:func:`proxy_listener`) serves it through :mod:`proxy.http.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy import telemetry, worker_metrics
from proxy.admin import health
from proxy.admin.app import build_admin_app
from proxy.admin.server import AdminListener
from proxy.audit.balp import AuditContext
from proxy.audit.identity import JwksCache
from proxy.audit.intents import OpenIntents, recover_intents
from proxy.audit.pipeline import AuditPipeline, AuditPolicy, standard_hooks
from proxy.audit.validate import validate_event
from proxy.delivery.flusher import Flusher
from proxy.delivery.sink import Origin
from proxy.fhir.operation_outcome import FHIR_JSON
from proxy.http.forward import ForwardConfig, ForwardHandler, resource_reader
from proxy.http.listener import ClientRequest, Handler, Listener
from proxy.http.response import Response
from proxy.http.transport import Transport, UpstreamError, UpstreamRequest
from proxy.http.upstream import UpstreamPool
from proxy.k8s.status import serving_status
from proxy.log.checkpointer import Checkpointer, shard_origin
from proxy.log.note import Signer
from proxy.log.shipping import LogShipping
from proxy.settings import Settings
from proxy.store.database import database_budget
from proxy.store.faces import AdminStore, StoreError, TransparencyLog
from proxy.store.queue import AuditQueue
from proxy.store.records import QueueStats
from proxy.store.shards import ShardedStore, existing_shard_opener
from proxy.supervisor import read_worker_states, status_path
from proxy.tasks import running

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
AUDIT_CONTEXT = web.AppKey("audit_context", AuditContext)
QUEUE = web.AppKey("queue", AuditQueue)
TRANSPORT: web.AppKey[Transport] = web.AppKey("transport")
"""What the proxied requests (and reads before deletes) go through: the upstream pool, or
the transport given to :func:`build_proxy_app`."""
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
"""Off the request path: the identity provider's keys."""
JWKS = web.AppKey("jwks", JwksCache)
INTENTS = web.AppKey("open_intents", OpenIntents)
LEFT_AT_START = web.AppKey("intents_left_at_start", int)
"""The highest id of the intents start-up could not recover (the store was full)."""
HANDLER = web.AppKey("forward_handler", ForwardHandler)
FLUSHER = web.AppKey("flusher", Flusher)
ADMIN_URL = web.AppKey("admin_url", str)
WORKER = web.AppKey("worker", int)
"""This process's worker index (0 with ``workers: 1``): which store shard it owns."""
VALIDATION = web.AppKey("validation_queue", asyncio.Queue[dict[str, Any]])
LOG_ORIGIN = web.AppKey("log_origin", str)
"""The checkpoint origin of this worker's shard's log."""
SIGNER = web.AppKey("log_signer", Signer)
"""The checkpoint signing key (``log.key_file``), when one is configured."""
CHECKPOINTER = web.AppKey("checkpointer", Checkpointer)

PRUNE_EVERY_S = 3600.0
"""How often delivered events past retention are deleted (and once at start)."""


def stop_summary(stats: QueueStats, store: Path, *, repository: bool) -> str:
    """The line the proxy logs last when it stops, after the shutdown drain: how many
    events it leaves undelivered and where. Other parts (a Kubernetes drain hook) rely on
    its first words: ``stopped: all events delivered`` when nothing waits, else
    ``stopped: N event(s) left undelivered in STORE; ...``."""

    def events(n: int) -> str:
        return f"{n} event{'s' if n != 1 else ''}"

    dead = (
        f"; {events(stats.dead)} the repository refused wait in its dead-letter queue"
        f" (fhir-audit-proxy dlq list)"
        if stats.dead
        else ""
    )
    if not stats.pending:
        return f"stopped: all events delivered{dead}"
    if not repository:
        return (
            f"stopped: {events(stats.pending)} left undelivered in {store}; no repository is"
            f" configured, so they stay there{dead}"
        )
    return (
        f"stopped: {events(stats.pending)} left undelivered in {store}; they are delivered"
        f" at the next start{dead}"
    )


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    path = settings.store_shards()[app[WORKER]]
    queue = await AuditQueue.open(
        path,
        max_bytes=settings.store.max_bytes,
        commit_batch_max=settings.store.commit_batch_max,
        on_commit=telemetry.observe_store_commit,
    )
    app[QUEUE] = queue
    try:
        app[LOG_ORIGIN] = shard_origin(settings.log, await queue.log_id())
        try:
            await recover_intents(queue, app[AUDIT_CONTEXT], datetime.now(UTC))
        except StoreError as exc:
            # A full disk must not stop the proxy from starting: it fails requests closed
            # (507, not ready) and maintenance recovers the intents once there is room.
            log.error("intents not recovered at start-up, retried later: %s", exc)
            with contextlib.suppress(StoreError):
                orphans = await queue.orphan_intents()
                app[LEFT_AT_START] = max((i.id for i in orphans), default=0)
        yield
    finally:
        # Last: the flusher's shutdown drain has run (contexts stop in reverse order).
        try:
            summary = stop_summary(
                await queue.stats(), path, repository=bool(settings.repository.url)
            )
            log.info("%s", summary)
        except Exception as exc:  # the summary reports, it never fails the shutdown
            log.warning("stopped: the events left in %s could not be counted: %r", path, exc)
        await queue.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool: UpstreamPool | None = None
    if TRANSPORT not in app:
        pool = UpstreamPool(
            URL(settings.upstream.url).origin(),
            max_connections=settings.upstream.max_connections,
            connect_timeout=settings.upstream.connect_timeout_s,
            timeout=settings.upstream.timeout_s,
            keepalive_s=settings.upstream.keepalive_s,
        )
        app[TRANSPORT] = pool
    connector = aiohttp.TCPConnector(limit=10, keepalive_timeout=30, enable_cleanup_closed=True)
    try:
        async with aiohttp.ClientSession(
            connector=connector,
            # Never sends a cookie it was given to anyone else.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
        ) as session:
            app[UPSTREAM_SESSION] = session
            if settings.audit.identity.jwks_url:
                jwks = JwksCache(settings.audit.identity, session)
                app[JWKS] = jwks
                await jwks.start()
                try:
                    yield
                finally:
                    await jwks.close()
            else:
                yield
    finally:
        if pool is not None:
            await pool.close()


async def _validation_ctx(app: web.Application) -> AsyncIterator[None]:
    """Invariant 7: sampled events are validated off the request path; an invalid one is
    already stored and will be forwarded, so all this does is warn and count."""
    app[VALIDATION] = asyncio.Queue(maxsize=1000)
    version = app[SETTINGS].audit.fhir_version

    async def worker() -> None:
        while True:
            event = await app[VALIDATION].get()
            error = validate_event(event, version)
            if error is not None:
                telemetry.EVENTS_INVALID.inc()
                log.warning(
                    "AuditEvent %s is not valid FHIR %s: %s", event.get("id"), version, error
                )

    async with running(worker(), "validation"):
        yield


async def _handler_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cfg = ForwardConfig.from_settings(settings)
    transport = app[TRANSPORT]
    hooks = standard_hooks(
        read_before_delete=resource_reader(cfg, transport) if cfg.read_before_delete else None,
        validation=(settings.audit.validate_sample_rate, app[VALIDATION]),
    )
    pipeline = AuditPipeline(
        policy=AuditPolicy.from_settings(settings),
        ctx=app[AUDIT_CONTEXT],
        queue=app[QUEUE],
        jwks=app.get(JWKS),
        intents=app[INTENTS],
        hooks=hooks,
    )
    app[HANDLER] = ForwardHandler(cfg=cfg, transport=transport, pipeline=pipeline)
    yield


GC_THRESHOLD_0 = 10_000
"""Allocations between young-generation collections (CPython's default is 700): every
request allocates a few hundred containers (headers, exchange, events), so the default
runs a collection every few requests."""


async def _gc_ctx(_: web.Application) -> AsyncIterator[None]:
    """Last to start: what startup built (settings, schemas, pools) moves out of the
    collector's sight, and young collections run less often (both cost the event loop
    time on every request); restored at the end."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, thresholds[1], thresholds[2])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    repo = settings.repository
    if not repo.url:
        log.info("no repository configured: events stay in the local store")
        yield
        return
    checkpoints = settings.log.ship_checkpoints and SIGNER in app
    if checkpoints and not repo.holds_documents:
        checkpoints = False
        log.info(
            "log checkpoints are not shipped to %s (it holds audit messages only): they stay"
            " in the store and on the admin listener's /log/%d/checkpoint",
            repo.target(),
            app[WORKER],
        )
    shipping = LogShipping(tlog=app[QUEUE], origin=app[LOG_ORIGIN], checkpoints=checkpoints)
    sink = telemetry.TimedSink(await repo.open_sink(Origin(shard=app[WORKER])))
    flusher = Flusher(app[QUEUE], sink, repo, log_shipping=shipping)
    app[FLUSHER] = flusher
    try:
        async with running(flusher.run(), "flusher"):
            yield
    finally:
        try:
            await flusher.drain(settings.shutdown_grace_s)
        except Exception:
            log.exception("final flush failed; undelivered events stay queued")
        await sink.close()


async def _checkpoint_ctx(app: web.Application) -> AsyncIterator[None]:
    """Signed checkpoints of this worker's shard, when a key is configured. Started after
    the flusher, so stopped before its final drain: the tail's checkpoint, signed here at
    shutdown, leaves with the last events."""
    if SIGNER not in app:
        yield
        return
    checkpointer = Checkpointer(
        tlog=app[QUEUE], signer=app[SIGNER], origin=app[LOG_ORIGIN], settings=app[SETTINGS].log
    )
    app[CHECKPOINTER] = checkpointer
    async with running(checkpointer.run(), "checkpointer"):
        yield
    try:
        await checkpointer.checkpoint()
    except StoreError as exc:
        log.warning("the final checkpoint was not made: %s", exc)


async def _maintenance_ctx(app: web.Application) -> AsyncIterator[None]:
    """Prune delivered events past retention (at start, then every
    :data:`PRUNE_EVERY_S`), and turn intents abandoned by a failed request (the store
    refused its events) into outcome-unknown events."""
    settings = app[SETTINGS]
    retention = timedelta(days=settings.store.retention_days)
    orphan_age = timedelta(seconds=settings.upstream.timeout_s + 30)

    async def loop() -> None:
        last_prune: float | None = None  # at start, then every PRUNE_EVERY_S
        while True:
            now = datetime.now(UTC)
            try:
                await app[INTENTS].recover(
                    app[QUEUE],
                    app[AUDIT_CONTEXT],
                    now,
                    older_than=now - orphan_age,
                    left_at_start=app.get(LEFT_AT_START, 0),
                )
                mono = asyncio.get_running_loop().time()
                if last_prune is None or mono - last_prune >= PRUNE_EVERY_S:
                    pruned = await app[QUEUE].prune(now, retention)
                    last_prune = mono
                    if pruned:
                        log.info("pruned %d delivered events older than %s", pruned, retention)
            except StoreError as exc:
                log.warning("store maintenance failed: %s", exc)
            # While the store refuses (full disk), look again soon: the intents a full
            # store left behind are recorded as soon as there is room.
            await asyncio.sleep(2 if app[QUEUE].refusing else 30)

    async with running(loop(), "maintenance"):
        yield


def _bytes_on_disk(path: Path) -> int:
    """A store's database, WAL and shared-memory files together."""
    files = (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
    return sum(p.stat().st_size for p in files if p.exists())


FULL_MARGIN = 64 * 1024
"""A shard with less room than this under its ``max_bytes`` budget, or on its disk,
counts as full."""


def _disk_room(path: Path) -> int:
    """Bytes this process may still write on the filesystem that holds ``path``'s
    directory (root may use the blocks reserved for it)."""
    st = os.statvfs(path.parent)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _workers_report(settings: Settings) -> dict[str, Any]:
    """With ``workers`` > 1: every worker as the supervisor last published it; ok while
    every one serves. A worker restarted after it died shows how often and how it ended."""
    states = read_worker_states(status_path(settings.store.path), os.getppid())
    if states is None:  # not started by `run` (or it could not publish): nothing to judge
        return {"ok": True, "known": False}
    return {
        "ok": all(state.serving for state in states),
        "workers": {
            str(state.worker): {
                "serving": state.serving,
                "pid": state.pid,
                "restarts": state.restarts,
                "last_exit": state.last_exit,
            }
            for state in states
        },
    }


READY_TIMEOUT_S = 2.0
"""How long readiness waits for the upstream's answer to ``GET metadata``."""


async def _upstream_check(transport: Transport, metadata: str) -> dict[str, Any]:
    """Readiness's look at the upstream, through the transport the proxied requests take:
    ok when ``GET metadata`` is answered below 500 within :data:`READY_TIMEOUT_S`."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            answer = await transport.handle(
                UpstreamRequest(method="GET", target=metadata, headers=(("Accept", FHIR_JSON),))
            )
    except (UpstreamError, TimeoutError) as exc:
        return {"ok": False, "error": type(exc).__name__}
    answer.close()  # the status is all it asks
    return {"ok": answer.status < 500, "status": answer.status}


def _readiness(
    app: web.Application, shards: ShardedStore | None = None
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """The readiness check: this worker's store (answering, not failing closed, under
    ``max_bytes``, its disk not full), with ``workers`` > 1 every other worker's shard too
    (it exists and has room under its budget and on its disk: a full shard fails its
    worker's requests closed) and every worker serving (``checks.workers``), and the
    upstream."""
    settings = app[SETTINGS]
    max_bytes = settings.store.max_bytes
    metadata = URL(settings.upstream.url).path.rstrip("/") + "/metadata"

    async def other_shards() -> dict[str, Any]:
        assert shards is not None
        report: dict[str, Any] = {}
        for n, path, in_use in await shards.shard_sizes(skip=app[WORKER]):
            if in_use is None:
                report[str(n)] = {"ok": False, "error": "not created yet"}
                continue
            on_disk = _bytes_on_disk(path)
            full = in_use >= database_budget(max_bytes) - FULL_MARGIN
            disk_full = _disk_room(path) < FULL_MARGIN
            report[str(n)] = {
                "ok": not (full or disk_full) and on_disk < max_bytes,
                "full": full,
                "disk_full": disk_full,
                "bytes_on_disk": on_disk,
            }
        return report

    async def check() -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            queue = app[QUEUE]
            stats = await queue.stats()
            path = settings.store_shards()[app[WORKER]]
            on_disk = _bytes_on_disk(path)
            disk_full = _disk_room(path) < FULL_MARGIN
            checks["store"] = {
                "ok": queue.refusing is None and not disk_full and on_disk < max_bytes,
                "failing_closed": queue.refusing,
                "disk_full": disk_full,
                "bytes_on_disk": on_disk,
                **dataclasses.asdict(stats),
            }
            if shards is not None:
                others = await other_shards()
                checks["store"]["other_shards"] = others
                checks["store"]["ok"] = checks["store"]["ok"] and all(
                    shard["ok"] for shard in others.values()
                )
        except Exception as exc:  # readiness reports, it does not fail
            checks["store"] = {"ok": False, "error": str(exc)}
        if settings.workers > 1:
            checks["workers"] = _workers_report(settings)
        checks["upstream"] = await _upstream_check(app[TRANSPORT], metadata)
        return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}

    return check


async def _admin_ctx(app: web.Application) -> AsyncIterator[None]:
    """The admin listener, on worker 0 only: one listener, reading every shard (a second
    one per worker on a shared port would answer from whichever worker the kernel picks,
    with that worker's metrics)."""
    settings = app[SETTINGS]
    if app[WORKER] != 0:
        yield
        return
    store: AdminStore = app[QUEUE]
    if settings.workers > 1:
        store = ShardedStore(
            settings.store_shards(),
            opened={0: app[QUEUE]},
            open_shard=existing_shard_opener(settings.store),
        )
    try:
        async for _ in _admin_listener(app, store):
            async for _ in _status_listener(app, store):
                yield
    finally:
        if isinstance(store, ShardedStore):
            await store.close()


async def _status_listener(app: web.Application, store: AdminStore) -> AsyncIterator[None]:
    """The status listener of an injected sidecar (the app's probes, ``/metrics``), when
    ``status.port`` is set."""
    settings = app[SETTINGS]
    if settings.status.port is None:
        yield
        return

    async def metrics() -> bytes:
        return await health.prometheus_text(store)

    exposed = metrics if settings.telemetry.prometheus else None
    async for _ in serving_status(settings.status, exposed):
        yield


async def _admin_listener(app: web.Application, store: AdminStore) -> AsyncIterator[None]:
    settings = app[SETTINGS]

    async def shard_log(n: int) -> TransparencyLog | None:
        if isinstance(store, ShardedStore):
            return await store.shard(n)
        return app[QUEUE] if n == 0 else None

    admin = build_admin_app(
        store,
        settings.admin,
        logs=shard_log,
        writer=app[QUEUE],
        fhir_version=settings.audit.fhir_version,
        audit_context=app[AUDIT_CONTEXT],
        readiness=_readiness(app, store if isinstance(store, ShardedStore) else None),
    )
    if not settings.telemetry.prometheus:
        admin.middlewares.append(telemetry.without_prometheus)
    listener = AdminListener(admin, header_timeout_s=settings.admin.header_timeout_s)
    await listener.start(settings.admin.host, settings.admin.port)
    app[ADMIN_URL] = listener.url
    try:
        yield
    finally:
        await listener.stop()


async def _telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    worker = app[WORKER] if settings.workers > 1 else None

    async def queue_stats() -> QueueStats:
        return await app[QUEUE].stats()

    async for _ in telemetry.telemetry_ctx(app, settings.telemetry, queue_stats, worker):
        yield


async def _worker_metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """With several workers: worker 0's ``/metrics`` counts every worker's requests."""
    settings = app[SETTINGS]
    if settings.workers == 1:
        yield
        return
    async for _ in worker_metrics.shared(settings.store_shards(), app[WORKER]):
        yield


def _dispatcher(app: web.Application) -> Handler:
    """The listener's handler: the forward handler, observed (server span, HTTP metrics)
    when traced or measured."""
    forward = app[HANDLER]
    base_path = URL(app[SETTINGS].upstream.url).path.rstrip("/")

    async def dispatch(request: ClientRequest) -> Response:
        if not telemetry.observed(request):
            return await forward(request)
        with telemetry.serving(request, base_path) as served:
            response = await forward(request)
            served.answered(response.status)
            return response

    return dispatch


def proxy_listener(app: web.Application) -> Listener:
    """The proxy listener of ``app``, once its start-up has run (the handler exists)."""
    settings = app[SETTINGS]
    return Listener(
        _dispatcher(app),
        app[HANDLER].refuse_malformed,
        header_timeout_s=settings.listen.header_timeout_s,
        body_timeout_s=settings.listen.body_timeout_s,
    )


def build_proxy_app(
    settings: Settings, *, worker: int = 0, transport: Transport | None = None
) -> web.Application:
    """The proxy's application, with every background part owned by it; ``worker`` (below
    ``settings.workers``) names the store shard it owns. The proxied requests go through
    ``transport`` when given (a test double), else through a pool of connections to
    ``upstream.url``. Serve it with :func:`proxy.http.server.run` (or
    :class:`~proxy.http.server.Server`) and :func:`proxy_listener`."""
    app = web.Application()
    app[SETTINGS] = settings
    app[WORKER] = worker
    app[AUDIT_CONTEXT] = AuditContext.from_settings(settings)
    app[INTENTS] = OpenIntents()
    if transport is not None:
        app[TRANSPORT] = transport
    if settings.log.key_file is not None:
        app[SIGNER] = Signer.parse(settings.log.key_file.read_text())
    app.cleanup_ctx.extend(
        [
            _telemetry_ctx,
            _store_ctx,
            _worker_metrics_ctx,
            _upstream_ctx,
            _validation_ctx,
            _handler_ctx,
            _delivery_ctx,
            _checkpoint_ctx,
            _maintenance_ctx,
            _admin_ctx,
            _gc_ctx,
        ]
    )

    async def stopping(app: web.Application) -> None:
        log.info(
            "stopping: finishing the requests in flight, then delivering for up to %g s",
            settings.shutdown_grace_s,
        )

    app.on_shutdown.append(stopping)
    return app
