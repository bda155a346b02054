"""Builds the admin application (its own listener, loopback by default)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.admin import audit_log, fhir_api, health
from proxy.admin.keys import FHIR_VERSION, QUEUE, READINESS
from proxy.fhir.operation_outcome import outcome_response
from proxy.settings import AdminSettings
from proxy.store.queue import StoreError

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes stay open: kubelets and Prometheus carry no admin token."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _auth_middleware(tokens: tuple[bytes, ...]) -> Any:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if tokens and request.path not in OPEN_PATHS:
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            given = presented.strip().encode()
            ok = scheme.lower() == "bearer" and any(hmac.compare_digest(given, t) for t in tokens)
            if not ok:
                return outcome_response(
                    401,
                    "login",
                    "the admin API needs a bearer token",
                    headers={"WWW-Authenticate": 'Bearer realm="fhir-audit-proxy"'},
                )
        try:
            return await handler(request)
        except StoreError as exc:
            return outcome_response(503, "transient", f"the audit store is unavailable: {exc}")

    return authenticate


def build_admin_app(
    queue: Any,
    settings: AdminSettings,
    *,
    fhir_version: str = "R4",
    readiness: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> web.Application:
    """The admin application over ``queue`` (an ``AuditQueue``)."""
    tokens = tuple(t.get_secret_value().encode() for t in settings.tokens)
    app = web.Application(middlewares=[_auth_middleware(tokens)])
    app[QUEUE] = queue
    app[FHIR_VERSION] = fhir_version
    if readiness is not None:
        app[READINESS] = readiness
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/fhir/metadata", fhir_api.metadata)
    app.router.add_get("/fhir/AuditEvent", fhir_api.search)
    app.router.add_get("/fhir/AuditEvent/{id}", fhir_api.read)
    app.router.add_get("/audit-log", audit_log.audit_log)
    app.router.add_get("/audit-log/event/{id}", audit_log.audit_log_event)
    app.router.add_get("/dlq", audit_log.dlq_list)
    app.router.add_post("/dlq/retry", audit_log.dlq_retry)
    return app
