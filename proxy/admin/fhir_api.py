"""``/fhir/AuditEvent``: FHIR search and read over the local store, and a small
CapabilityStatement. Strict about parameters: one it does not know is a 400, so a typo
never silently widens an audit query."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy.admin.access import discloses, record_access
from proxy.admin.keys import FHIR_VERSION, STORE
from proxy.admin.links import public_base
from proxy.admin.query import BadQuery, date_bounds, parse_count
from proxy.fhir.operation_outcome import FHIR_JSON, outcome_response
from proxy.store.records import Cursor, EventQuery, SortKey

SEARCH_PARAMS = (
    "date",
    "patient",
    "agent",
    "user",
    "entity",
    "entity-type",
    "type",
    "address",
    "action",
    "outcome",
    "subtype",
    "resource-type",
    "request-id",
    "_lastUpdated",
)
CONTROL_PARAMS = (
    "_count",
    "_sort",
    "_cursor",
    "_elements",
    "_summary",
    "_format",
    "_pretty",
    "_total",
)
DEFAULT_COUNT = 50
SORTS = {
    "date": (SortKey.RECORDED, False),
    "-date": (SortKey.RECORDED, True),
    # Aidbox names the stored time createdAt; FHIR's is _lastUpdated.
    "createdAt": (SortKey.STORED, False),
    "-createdAt": (SortKey.STORED, True),
    "_lastUpdated": (SortKey.STORED, False),
    "-_lastUpdated": (SortKey.STORED, True),
}
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}


def fhir_json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=FHIR_JSON)


def _patient(value: str) -> str:
    return value if "/" in value else f"Patient/{value}"


def _cursor(value: str | None) -> tuple[str, Cursor] | None:
    """``n1763900000.5_42`` (next: after) or ``p…`` (previous: before)."""
    if not value:
        return None
    try:
        ts, seq = value[1:].split("_")
        if value[0] not in "np":
            raise ValueError
        return value[0], (float(ts), int(seq))
    except ValueError:
        raise BadQuery(f"_cursor {value!r} is not one this server gave") from None


def event_query(params: Any) -> tuple[EventQuery, list[tuple[str, str]]]:
    """The store query for the request's parameters, and the parameters to echo in links."""
    unknown = [k for k in params if k not in SEARCH_PARAMS + CONTROL_PARAMS]
    if unknown:
        raise BadQuery(f"unknown search parameter(s): {', '.join(sorted(set(unknown)))}")
    date_from, date_to = date_bounds(params.getall("date", []))
    updated_from, updated_to = date_bounds(params.getall("_lastUpdated", []))
    sort = params.get("_sort", "-date")
    if sort not in SORTS:
        raise BadQuery(f"_sort supports {', '.join(SORTS)}")
    summary = params.get("_summary", "false")
    if summary not in ("false", "count"):
        raise BadQuery("_summary supports count and false")
    total = params.get("_total", "accurate")
    if total not in ("none", "estimate", "accurate"):
        raise BadQuery("_total supports none, estimate and accurate")
    sort_key, newest_first = SORTS[sort]
    cursor = _cursor(params.get("_cursor"))

    def given(name: str) -> str | None:
        return params.get(name) or None

    query = EventQuery(
        patient=_patient(params["patient"]) if params.get("patient") else None,
        user=given("user"),
        agent=given("agent"),
        entity=given("entity"),
        entity_type=given("entity-type"),
        event_type=given("type"),
        address=given("address"),
        resource_type=given("resource-type"),
        request_id=given("request-id"),
        action=given("action"),
        outcome=given("outcome"),
        subtype=given("subtype"),
        date_from=date_from,
        date_to=date_to,
        updated_from=updated_from,
        updated_to=updated_to,
        sort=sort_key,
        newest_first=newest_first,
        limit=0
        if summary == "count"
        else parse_count(params.get("_count"), "_count", DEFAULT_COUNT),
        after=cursor[1] if cursor and cursor[0] == "n" else None,
        before=cursor[1] if cursor and cursor[0] == "p" else None,
        count_total=total != "none" or summary == "count",
    )
    echo = [
        (k, v)
        for k, v in params.items()
        if k in SEARCH_PARAMS or k in ("_sort", "_elements", "_total")
    ]
    return query, echo


def _subset(event: dict[str, Any], elements: list[str]) -> dict[str, Any]:
    """``event`` with only the ``_elements`` asked for (and the mandatory id and meta),
    marked SUBSETTED as FHIR requires."""
    out = {k: v for k, v in event.items() if k in elements or k in ("resourceType", "id")}
    meta = dict(event.get("meta") or {})
    meta["tag"] = [*meta.get("tag", ()), SUBSETTED]
    out["meta"] = meta
    return out


async def search(request: web.Request) -> web.Response:
    try:
        query, echo = event_query(request.query)
    except BadQuery as exc:
        return outcome_response(400, "invalid", str(exc))
    page = await request.app[STORE].search_page(query)
    if discloses(page.items) or (query.limit == 0 and page.total):
        await record_access(request, search=echo)
    base = f"{public_base(request)}/fhir"
    count = query.limit

    def link(cursor: str | None) -> str:
        params = [*echo, ("_count", str(count))]
        if cursor:
            params.append(("_cursor", cursor))
        return f"{base}/AuditEvent?{urlencode(params)}"

    own = request.query.get("_cursor")
    links = [{"relation": "self", "url": link(own)}]
    if page.items:
        first, last = page.items[0], page.items[-1]
        if page.more_after:
            ts, seq = page.cursor_of(last, query.sort)
            links.append({"relation": "next", "url": link(f"n{ts!r}_{seq}")})
        # Newest first, the top of a page reached without an ``after`` cursor is the live
        # edge: its previous link is where newer events will appear (the viewer polls it).
        if page.more_before or (query.newest_first and query.after is None):
            ts, seq = page.cursor_of(first, query.sort)
            links.append({"relation": "previous", "url": link(f"p{ts!r}_{seq}")})
    elements = [e for e in request.query.get("_elements", "").split(",") if e]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    bundle["entry"] = [
        {
            "fullUrl": f"{base}/AuditEvent/{item.event_id}",
            "resource": _subset(item.event, elements) if elements else item.event,
            "search": {"mode": "match"},
        }
        for item in page.items
    ]
    return fhir_json(bundle)


async def read(request: web.Request) -> web.Response:
    event_id = request.match_info["id"]
    item = await request.app[STORE].get_event(event_id)
    if item is None:
        return outcome_response(
            404, "not-found", f"AuditEvent/{event_id} is not in the local store"
        )
    if discloses([item]):
        await record_access(request, resource_id=event_id)
    return fhir_json(item.event)


async def metadata(request: web.Request) -> web.Response:
    return fhir_json(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-01",
            "kind": "instance",
            "fhirVersion": "5.0.0" if request.app[FHIR_VERSION] == "R5" else "4.0.1",
            "format": ["json"],
            "software": {"name": "fhir-audit-proxy admin"},
            "rest": [
                {
                    "mode": "server",
                    "resource": [
                        {
                            "type": "AuditEvent",
                            "interaction": [
                                {"code": "read"},
                                {"code": "search-type"},
                                {"code": "create"},
                            ],
                            "searchParam": [
                                {
                                    "name": name,
                                    "type": "date" if name in ("date", "_lastUpdated") else "token",
                                }
                                for name in SEARCH_PARAMS
                            ],
                        }
                    ],
                    "interaction": [{"code": "batch"}, {"code": "transaction"}],
                }
            ],
        }
    )
