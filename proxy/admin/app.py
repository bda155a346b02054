"""Builds the admin application (its own listener, loopback by default)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.admin import audit_log, fhir_api, health, ingest, reports, tlog, viewer
from proxy.admin.auth import (
    AdminAuth,
    Refusal,
    RouteGroup,
    check_exposure,
    load_static_tokens,
)
from proxy.admin.keys import (
    AUDIT_CONTEXT,
    CALLER,
    FHIR_VERSION,
    READINESS,
    SETTINGS,
    STORE,
    VALIDATION,
    WRITER,
)
from proxy.audit.balp import AuditContext
from proxy.audit.identity import JwksCache
from proxy.audit.validate import ValidationPool
from proxy.fhir.operation_outcome import outcome_response
from proxy.settings import AdminSettings, IdentitySettings
from proxy.store.faces import AdminStore, EventWriter, StoreError, StoreFull

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: tuple[tuple[str, str, Handler, RouteGroup], ...] = (
    # Probes and scrapes stay open: kubelets and Prometheus carry no admin token.
    ("GET", "/healthz", health.healthz, RouteGroup.OPEN),
    ("GET", "/readyz", health.readyz, RouteGroup.OPEN),
    ("GET", "/metrics", health.metrics, RouteGroup.OPEN),
    # The viewer's files carry no data; the page asks for a token when the API needs one.
    ("GET", "/ui", viewer.redirect, RouteGroup.OPEN),
    ("GET", "/ui/", viewer.page, RouteGroup.OPEN),
    ("GET", "/ui/{name}", viewer.page, RouteGroup.OPEN),
    ("GET", "/api/queue", viewer.queue_summary, RouteGroup.READ),
    ("GET", "/fhir/metadata", fhir_api.metadata, RouteGroup.READ),
    ("GET", "/fhir/AuditEvent", fhir_api.search, RouteGroup.READ),
    ("GET", "/fhir/AuditEvent/{id}", fhir_api.read, RouteGroup.READ),
    ("GET", "/api/reports/patient-access", reports.patient_access, RouteGroup.READ),
    ("GET", "/api/reports/patient-access/events", reports.patient_access_events, RouteGroup.READ),
    ("GET", "/api/reports/user-activity", reports.user_activity, RouteGroup.READ),
    ("GET", "/api/reports/user-activity/events", reports.user_activity_events, RouteGroup.READ),
    ("GET", "/api/activity", reports.activity, RouteGroup.READ),
    ("GET", "/api/export.csv", reports.export_csv, RouteGroup.READ),
    ("GET", "/audit-log", audit_log.audit_log, RouteGroup.READ),
    ("GET", "/audit-log/event/{id}", audit_log.audit_log_event, RouteGroup.READ),
    ("POST", "/fhir/AuditEvent", ingest.post_audit_event, RouteGroup.WRITE),
    ("POST", "/fhir", ingest.post_bundle, RouteGroup.WRITE),
    ("POST", "/fhir/", ingest.post_bundle, RouteGroup.WRITE),
    ("GET", "/dlq", audit_log.dlq_list, RouteGroup.ADMIN),
    ("POST", "/dlq/retry", audit_log.dlq_retry, RouteGroup.ADMIN),
    # The Merkle log: hashes and signed tree heads carry no PHI, and tile clients fetch
    # them without credentials; entry bundles are the events (proxy/admin/tlog.py).
    ("GET", "/log/{shard}/checkpoint", tlog.checkpoint, RouteGroup.OPEN),
    ("GET", r"/log/{shard}/tile/entries/{path:.+}", tlog.entries, RouteGroup.READ),
    ("GET", r"/log/{shard}/tile/{path:[0-9].*}", tlog.tile, RouteGroup.OPEN),
)
"""Every admin route and the group whose scope it needs; one place to read the policy."""

AUTH = web.AppKey("admin_auth", AdminAuth)
GROUPS = web.AppKey("route_groups", dict[Any, RouteGroup])


def _group_of(request: web.Request) -> RouteGroup:
    # Unmatched paths need the read scope: a 404 must not tell strangers what exists.
    return request.app[GROUPS].get(request.match_info.route, RouteGroup.READ)


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    decision = request.app[AUTH].authorize(_group_of(request), request.headers)
    if isinstance(decision, Refusal):
        headers = {"WWW-Authenticate": 'Bearer realm="fhir-audit-proxy"'}
        if decision.status == 403:
            headers["WWW-Authenticate"] += ', error="insufficient_scope"'
        code = "login" if decision.status == 401 else "forbidden"
        return outcome_response(decision.status, code, decision.reason, headers=headers)
    request[CALLER] = decision
    try:
        return await handler(request)
    except StoreFull as exc:
        return outcome_response(507, "exception", f"the audit store is full: {exc}")
    except StoreError as exc:
        return outcome_response(503, "transient", f"the audit store is unavailable: {exc}")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer: no content sniffing (a JSON body is never run as a page), and,
    unless the route said otherwise (the viewer's files), nothing kept by any cache: the
    answers hold the audit trail."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cache-Control", "no-store")


def _jwks_ctx(settings: AdminSettings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def jwks(app: web.Application) -> AsyncIterator[None]:
        if not settings.jwks_url:
            yield
            return
        identity = IdentitySettings(jwks_url=settings.jwks_url, jwks_cache_s=settings.jwks_cache_s)
        async with aiohttp.ClientSession() as session:
            cache = JwksCache(identity, session)
            await cache.start()
            app[AUTH].use_keys(cache.keys)
            try:
                yield
            finally:
                await cache.close()

    return jwks


async def _validation_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process that validates large ingestion requests (started at first need)."""
    pool = ValidationPool(app[FHIR_VERSION])
    app[VALIDATION] = pool
    try:
        yield
    finally:
        pool.close()


async def _no_logs(shard: int) -> None:
    return None


def build_admin_app(
    store: AdminStore,
    settings: AdminSettings,
    *,
    writer: EventWriter,
    fhir_version: str = "R4",
    audit_context: AuditContext | None = None,
    readiness: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    logs: tlog.ShardLogs | None = None,
) -> web.Application:
    """The admin application over ``store`` (one shard or every shard as one), appending
    to ``writer`` (its worker's shard). Raises
    :class:`~proxy.admin.auth.AdminExposed` for a non-loopback listener with no
    authentication."""
    check_exposure(settings)
    app = web.Application(middlewares=[_authenticate])
    app.on_response_prepare.append(_security_headers)
    app[STORE] = store
    app[WRITER] = writer
    app[SETTINGS] = settings
    app[FHIR_VERSION] = fhir_version
    app[AUDIT_CONTEXT] = audit_context or AuditContext.default()
    app[AUTH] = AdminAuth(settings, tokens=load_static_tokens(settings))
    if readiness is not None:
        app[READINESS] = readiness
    app[tlog.LOGS] = logs or _no_logs
    groups: dict[Any, RouteGroup] = {}
    for method, path, handler, group in ROUTES:
        groups[app.router.add_route(method, path, handler)] = group
    app[GROUPS] = groups
    app.cleanup_ctx.append(_jwks_ctx(settings))
    app.cleanup_ctx.append(_validation_ctx)
    return app
