"""Typed keys for what the admin application and its requests hold."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.audit.balp import AuditContext
from proxy.audit.validate import ValidationPool
from proxy.settings import AdminSettings
from proxy.store.faces import AdminStore, EventWriter

if TYPE_CHECKING:
    from proxy.admin.auth import AdminCaller

STORE: web.AppKey[AdminStore] = web.AppKey("store")
"""The store the admin API reads (every shard as one) and requeues dead letters in."""
WRITER: web.AppKey[EventWriter] = web.AppKey("store_writer")
"""Where the admin API appends (ingested events, access records): its worker's shard."""
FHIR_VERSION = web.AppKey("fhir_version", str)
AUDIT_CONTEXT = web.AppKey("audit_context", AuditContext)
SETTINGS = web.AppKey("admin_settings", AdminSettings)
Readiness = Callable[[], Awaitable[dict[str, Any]]]
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
VALIDATION = web.AppKey("validation_pool", ValidationPool)
"""Validates the events of large ingestion requests off the event loop."""
CALLER: web.RequestKey[AdminCaller] = web.RequestKey("admin_caller")
"""The authenticated caller of an admin request (set by the auth middleware)."""
