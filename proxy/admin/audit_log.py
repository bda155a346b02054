"""Smile CDR style audit log (``/audit-log``) and the dead-letter queue (``/dlq``).

``/audit-log`` takes the parameters Smile CDR's guide lists: ``moduleId`` (this proxy is
one module, :data:`MODULE_ID`: that id narrows nothing, any other is a 400, never a
silently wider answer), ``userId``, ``from`` and ``to`` (inclusive, FHIR dateTime),
``pageIndex`` and ``pageSize``, and ``patient``; any other parameter is a 400. It
answers ``{"pageIndex", "pageSize", "total", "audit-events": [...]}`` with Smile's field
names beside the proxy's own."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.admin.access import discloses, record_access
from proxy.admin.keys import STORE
from proxy.admin.query import BadQuery, parse_count, parse_instant
from proxy.fhir.operation_outcome import outcome_response
from proxy.store.records import EventQuery, QueuedEvent

MODULE_ID = "fhir-audit-proxy"
"""The one module whose events ``/audit-log`` holds."""
AUDIT_LOG_PARAMS = ("moduleId", "userId", "from", "to", "pageIndex", "pageSize", "patient")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def summary(item: QueuedEvent) -> dict[str, Any]:
    """One event as the audit-log API lists it."""
    event = item.event
    requestor: dict[str, Any] = next((a for a in event.get("agent", []) if a.get("requestor")), {})
    who = requestor.get("who", {})
    outcome = event.get("outcome")
    if isinstance(outcome, dict):  # R5
        outcome = outcome.get("code", {}).get("code")
    subtypes = event.get("subtype") or event.get("code", {}).get("coding", [])
    patients = [
        e["what"]["reference"]
        for e in event.get("entity", [])
        if "what" in e
        and "reference" in e["what"]
        and "1"
        in (
            e.get("role", {}).get("code"),
            *[c.get("code") for c in e.get("role", {}).get("coding", [])],
        )
    ]
    request_id = next(
        (
            e["what"]["identifier"]["value"]
            for e in event.get("entity", [])
            if "identifier" in e.get("what", {})
        ),
        None,
    )
    event_type: dict[str, Any] = event.get("type") or next(iter(event.get("category", ())), {})
    if "coding" in event_type:  # R5: a CodeableConcept
        event_type = next(iter(event_type["coding"]), {})
    peer = next(
        (
            a.get("network", {}).get("address") or a.get("networkString")
            for a in event.get("agent", [])
            if a.get("network", {}).get("address") or a.get("networkString")
        ),
        None,
    )
    user_id = who.get("identifier", {}).get("value") or who.get("reference") or who.get("display")
    return {
        "id": item.event_id,
        "timestamp": item.recorded,
        "typeCode": event_type.get("code"),
        "typeDisplay": event_type.get("display"),
        "typeSystem": event_type.get("system"),
        "username": who.get("display") or requestor.get("name") or user_id,
        "remoteAddress": peer,
        "recorded": item.recorded,
        "action": event.get("action"),
        "outcome": outcome,
        "outcomeDesc": event.get("outcomeDesc"),
        "subtype": [c.get("code") for c in subtypes],
        "userId": user_id or requestor.get("altId"),
        "patients": patients,
        "requestId": request_id,
        "status": item.status.value,
        "attempts": item.attempts,
        "lastError": item.last_error,
    }


async def audit_log(request: web.Request) -> web.Response:
    params = request.query
    try:
        unknown = sorted({k for k in params if k not in AUDIT_LOG_PARAMS})
        if unknown:
            raise BadQuery(
                f"unknown parameter(s): {', '.join(unknown)}; /audit-log takes"
                f" {', '.join(AUDIT_LOG_PARAMS)}"
            )
        module = params.get("moduleId")
        if module not in (None, "", MODULE_ID):
            raise BadQuery(
                f"moduleId {module!r} names no module here: every event of this proxy is"
                f" module {MODULE_ID!r}"
            )
        page_size = parse_count(params.get("pageSize"), "pageSize", 50) or 50
        page_index = parse_count(params.get("pageIndex"), "pageIndex", 0, cap=None)
        date_from = parse_instant(params["from"], "from")[0] if params.get("from") else None
        date_to = parse_instant(params["to"], "to")[1] if params.get("to") else None
    except BadQuery as exc:
        return outcome_response(400, "invalid", str(exc))
    query = EventQuery(
        user=params.get("userId") or None,
        patient=params.get("patient") or None,
        date_from=date_from,
        date_to=date_to,
        limit=page_size,
        offset=page_index * page_size,
    )
    page, total = await request.app[STORE].search(query)
    if discloses(page):
        await record_access(request, search=list(params.items()))
    return _json(
        {
            "pageIndex": page_index,
            "pageSize": page_size,
            "total": total,
            "audit-events": [summary(item) for item in page],
        }
    )


async def audit_log_event(request: web.Request) -> web.Response:
    item = await request.app[STORE].get_event(request.match_info["id"])
    if item is None:
        return outcome_response(404, "not-found", "no such audit event")
    if discloses([item]):
        await record_access(request, resource_id=item.event_id)
    body = summary(item)
    if request.query.get("includeBody", "false").lower() == "true":
        body["body"] = item.event
        request_id = _request_id(item.event)
        capture = (
            await request.app[STORE].get_capture(request_id) if request_id is not None else None
        )
        body["capturedBodies"] = (
            {"request": _shown(capture.request), "response": _shown(capture.response)}
            if capture is not None
            else None
        )
        if capture is None:
            body["capturedBodiesNote"] = (
                "no bodies were captured for this exchange (audit.capture_bodies is off,"
                " or the exchange had none)"
            )
    return _json(body)


def _request_id(event: dict[str, Any]) -> str | None:
    """The X-Request-Id of the exchange an event records (R4: the entity typed
    ``XrequestId``; R5: the entity whose role says ``X-Request-Id``)."""
    for entity in event.get("entity", ()):
        typed = (entity.get("type") or {}).get("code") == "XrequestId"
        if typed or (entity.get("role") or {}).get("text") == "X-Request-Id":
            value = ((entity.get("what") or {}).get("identifier") or {}).get("value")
            return str(value) if value is not None else None
    return None


def _shown(body: bytes | None) -> Any:
    """A captured body as JSON when it is JSON, else as text."""
    if body is None:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


async def dlq_list(request: web.Request) -> web.Response:
    try:
        limit = parse_count(request.query.get("limit"), "limit", 100) or 100
    except BadQuery as exc:
        return outcome_response(400, "invalid", str(exc))
    dead = await request.app[STORE].list_dead(limit)
    if discloses(dead):  # dead letters are events of the trail too
        await record_access(request, search=list(request.query.items()))
    return _json([{"seq": d.seq, **summary(d)} for d in dead])


async def dlq_retry(request: web.Request) -> web.Response:
    seqs: list[int] | None = None
    if request.can_read_body:
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):  # never read a malformed body as "retry all"
                raise ValueError
            raw = body.get("seqs")
            if raw is not None:
                if not isinstance(raw, list) or not all(isinstance(s, int) for s in raw):
                    raise ValueError
                seqs = raw
        except ValueError:
            return outcome_response(400, "invalid", 'body must be {"seqs": [integers]} or empty')
    count = await request.app[STORE].requeue_dead(seqs)
    return _json({"requeued": count})
