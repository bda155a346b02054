"""``/fhir/AuditEvent``: FHIR search and read over the local store, and a small
CapabilityStatement. Strict about parameters: one it does not know is a 400, so a typo
never silently widens an audit query."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy.admin.access import discloses, record_access
from proxy.admin.keys import QUEUE
from proxy.admin.query import BadQuery, date_bounds, parse_count
from proxy.fhir.operation_outcome import FHIR_JSON, outcome_response
from proxy.store.records import EventQuery

SEARCH_PARAMS = ("date", "patient", "agent", "user", "action", "outcome", "subtype")
CONTROL_PARAMS = ("_count", "_sort", "_getpagesoffset", "_format", "_pretty", "_total")
DEFAULT_COUNT = 50


def fhir_json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=FHIR_JSON)


def _patient(value: str) -> str:
    return value if "/" in value else f"Patient/{value}"


def event_query(params: Any) -> tuple[EventQuery, list[tuple[str, str]]]:
    """The store query for the request's parameters, and the parameters to echo in links."""
    unknown = [k for k in params if k not in SEARCH_PARAMS + CONTROL_PARAMS]
    if unknown:
        raise BadQuery(f"unknown search parameter(s): {', '.join(sorted(set(unknown)))}")
    date_from, date_to = date_bounds(params.getall("date", []))
    sort = params.get("_sort", "-date")
    if sort not in ("date", "-date"):
        raise BadQuery("_sort supports date and -date")
    query = EventQuery(
        patient=_patient(params["patient"]) if params.get("patient") else None,
        user=params.get("agent") or params.get("user") or None,
        action=params.get("action") or None,
        outcome=params.get("outcome") or None,
        subtype=params.get("subtype") or None,
        date_from=date_from,
        date_to=date_to,
        newest_first=sort == "-date",
        limit=parse_count(params.get("_count"), "_count", DEFAULT_COUNT),
        offset=parse_count(params.get("_getpagesoffset"), "_getpagesoffset", 0, cap=None),
    )
    echo = [(k, v) for k, v in params.items() if k in SEARCH_PARAMS or k == "_sort"]
    return query, echo


async def search(request: web.Request) -> web.Response:
    try:
        query, echo = event_query(request.query)
    except BadQuery as exc:
        return outcome_response(400, "invalid", str(exc))
    page, total = await request.app[QUEUE].search(query)
    if discloses(page):
        await record_access(request, search=echo)
    base = f"{request.scheme}://{request.host}/fhir"

    def link(offset: int) -> str:
        params = [*echo, ("_count", str(query.limit)), ("_getpagesoffset", str(offset))]
        return f"{base}/AuditEvent?{urlencode(params)}"

    links = [{"relation": "self", "url": link(query.offset)}]
    if query.limit and query.offset + query.limit < total:
        links.append({"relation": "next", "url": link(query.offset + query.limit)})
    if query.offset > 0:
        links.append({"relation": "previous", "url": link(max(query.offset - query.limit, 0))})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [
            {
                "fullUrl": f"{base}/AuditEvent/{item.event_id}",
                "resource": item.event,
                "search": {"mode": "match"},
            }
            for item in page
        ],
    }
    return fhir_json(bundle)


async def read(request: web.Request) -> web.Response:
    event_id = request.match_info["id"]
    item = await request.app[QUEUE].get_event(event_id)
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
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "software": {"name": "fhir-audit-proxy admin"},
            "rest": [
                {
                    "mode": "server",
                    "resource": [
                        {
                            "type": "AuditEvent",
                            "interaction": [{"code": "read"}, {"code": "search-type"}],
                            "searchParam": [
                                {"name": name, "type": "date" if name == "date" else "token"}
                                for name in SEARCH_PARAMS
                            ],
                        }
                    ],
                }
            ],
        }
    )
