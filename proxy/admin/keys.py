"""Typed keys for what the admin application holds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.store.queue import AuditQueue

QUEUE = web.AppKey("queue", AuditQueue)
FHIR_VERSION = web.AppKey("fhir_version", str)
Readiness = Callable[[], Awaitable[dict[str, Any]]]
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
