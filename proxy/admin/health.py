"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
import time

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import telemetry
from proxy.admin.keys import READINESS, STORE
from proxy.store.faces import AdminStore, StoreError


async def healthz(request: web.Request) -> web.Response:
    """The process answers (liveness): no dependency is checked."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the store answers and the app's own checks (upstream, space) pass."""
    app = request.app
    try:
        await app[STORE].stats()
    except StoreError as exc:
        return web.json_response({"ready": False, "checks": {"store": str(exc)}}, status=503)
    report = await app[READINESS]() if READINESS in app else {"ready": True, "checks": {}}
    return web.Response(
        status=200 if report.get("ready") else 503,
        body=orjson.dumps(report),
        content_type="application/json",
    )


async def prometheus_text(store: AdminStore) -> bytes:
    """The Prometheus exposition; queue depth and oldest pending age are read fresh from
    ``store`` (the admin's store: every shard)."""
    # on a store error the counters still tell the story; readiness reports the store
    with contextlib.suppress(StoreError):
        telemetry.set_queue_gauges(await store.stats(), time.time())
    return generate_latest(telemetry.REGISTRY)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (:func:`prometheus_text`)."""
    return web.Response(
        body=await prometheus_text(request.app[STORE]),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
