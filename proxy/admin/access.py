"""Reading the audit trail is itself audited: a BALP Query (searches) or Read (one event)
AuditEvent naming the admin caller, committed before the answer is released, like any
other access to PHI.

The searches are ``/fhir/AuditEvent``, ``/audit-log`` and the dead-letter list; the reads
``/fhir/AuditEvent/{id}`` and ``/audit-log/event/{id}``.

To keep the viewer's live polling from feeding itself, an answer that discloses no event
other than these admin-access events (an empty page, or a poll that only finds the event
the previous page load produced) is not recorded. Health, metrics, the queue strip and the
viewer's static files disclose no event and are never recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.admin.auth import AdminCaller
from proxy.admin.keys import AUDIT_CONTEXT, CALLER, WRITER
from proxy.admin.links import public_base
from proxy.audit.balp import AuditContext, Built, build_events, store_entries, store_rows
from proxy.exchange import Exchange
from proxy.fhir.interaction import Interaction, InteractionKind
from proxy.store.marks import ADMIN_ACCESS_TAG as ADMIN_ACCESS_TAG
from proxy.store.marks import is_admin_access_tag
from proxy.store.records import QueuedEvent


def is_admin_access(event: dict[str, Any]) -> bool:
    """Whether ``event`` records an access to the audit trail through the admin API."""
    return any(is_admin_access_tag(t) for t in event.get("meta", {}).get("tag", ()))


def build_access_events(
    *,
    caller: AdminCaller,
    interaction: Interaction,
    method: str,
    path: str,
    query_string: str,
    request_id: str,
    client_address: str,
    base_url: str,
    status: int,
    ctx: AuditContext,
    now: datetime,
) -> list[Built]:
    """The events (with their rows) recording one admin read of the trail (pure; ``now``
    passed in). Built
    by the proxy's own BALP builder, so they have the shape of any other Query/Read, and
    tagged :data:`ADMIN_ACCESS_TAG`. A ``patient`` parameter makes it a PatientQuery."""
    exchange = Exchange(
        request_id=request_id,
        method=method,
        path=path,
        query_string=query_string,
        request_headers={},
        client_address=client_address,
        started_at=now,
        base_url=base_url,
        interaction=interaction,
        identity=caller.identity,
        status=status,
        finished_at=now,
    )
    return build_events(exchange, ctx, now, tags=(ADMIN_ACCESS_TAG,))


def discloses(page: Sequence[QueuedEvent]) -> bool:
    """Whether an answer shows any event that is not an admin-access record."""
    return any(not is_admin_access(item.event) for item in page)


async def record_access(
    request: web.Request,
    *,
    resource_id: str | None = None,
    search: Sequence[tuple[str, str]] = (),
) -> None:
    """Commit the access event for ``request`` (a search when ``resource_id`` is None,
    else a read of that AuditEvent). Raises ``StoreError`` (the caller then gets 503)."""
    kind = InteractionKind.SEARCH_TYPE if resource_id is None else InteractionKind.READ
    interaction = Interaction(
        kind=kind,
        method=request.method,
        resource_type="AuditEvent",
        resource_id=resource_id,
        search=tuple(search),
    )
    peer = request.remote or "unknown"
    built = build_access_events(
        caller=request[CALLER],
        interaction=interaction,
        method=request.method,
        path=request.path.lstrip("/"),
        query_string=request.query_string,
        request_id=request.headers.get("X-Request-Id") or str(uuid.uuid4()),
        client_address=peer,
        base_url=public_base(request),
        status=200,
        ctx=request.app[AUDIT_CONTEXT],
        now=datetime.now(UTC),
    )
    await request.app[WRITER].append_rows(store_rows(built), entries=store_entries(built))
