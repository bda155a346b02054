"""``/fhir/AuditEvent``: FHIR search and read over the local store, and a small
CapabilityStatement. Strict about parameters: one it does not know is a 400, so a typo
never silently widens an audit query."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy.admin.access import discloses, record_access
from proxy.admin.keys import FHIR_VERSION, SETTINGS, STORE
from proxy.admin.links import public_base
from proxy.admin.query import BadQuery, date_bounds, parse_count
from proxy.admin.signals import INDEXED, SCAN_LIMIT, Signal, signal_page, signals_of
from proxy.fhir.operation_outcome import FHIR_JSON, outcome_response
from proxy.store.marks import ADMIN_ACCESS_TAG, Mark
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
    "_tag",
    "_tag:not",
    "signal",
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
    "with-signals",
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
SIGNAL_EXT = "urn:fhir-audit-proxy:extension:signal"
"""On ``entry.search`` of a search answer (``signal`` or ``with-signals=true``): one of
the event's signals (proxy/admin/signals.py) as ``valueCode``."""
ENTITY_TYPE_CODES = ("1", "2", "3", "4", "XrequestId")
"""``entity.type`` codes of the events (audit-entity-type, and the X-Request-Id entity);
R4's AuditEventEntityType also takes a resource type, searched as ``resource-type``."""
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
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


@dataclass(frozen=True, slots=True)
class Search:
    """An admin search as its parameters ask for it."""

    query: EventQuery
    echo: list[tuple[str, str]]
    """The parameters to repeat in the answer's links."""
    signals: frozenset[Signal]
    """``signal``: only events with any of these (empty: no such filter)."""
    annotate: bool
    """Say each event's signals (``with-signals=true``, or a ``signal`` filter)."""

    @property
    def scanned(self) -> bool:
        """Whether the signal filter is applied to the events found (rather than being
        a mark the index answers)."""
        return bool(self.signals) and not (
            len(self.signals) == 1 and next(iter(self.signals)) in INDEXED
        )


def _marks(params: Any, name: str) -> tuple[str, ...]:
    """The marks ``_tag`` (or ``_tag:not``) names: only the admin-access tag is indexed."""
    marks: list[str] = []
    for value in params.getall(name, []):
        for token in value.split(","):
            system, _, code = token.rpartition("|")
            if code != ADMIN_ACCESS_TAG["code"] or system not in ("", ADMIN_ACCESS_TAG["system"]):
                raise BadQuery(
                    f"{name}: only {ADMIN_ACCESS_TAG['system']}|{ADMIN_ACCESS_TAG['code']} (the"
                    f" events recording admin reads of the trail) can be searched, not {token!r}"
                )
            marks.append(Mark.ADMIN_ACCESS.value)
    return tuple(dict.fromkeys(marks))


def _signals(params: Any) -> frozenset[Signal]:
    wanted: set[Signal] = set()
    for value in params.getall("signal", []):
        for token in value.split(","):
            try:
                wanted.add(Signal(token))
            except ValueError:
                raise BadQuery(
                    f"signal: {token!r} is not a signal; known: {', '.join(Signal)}"
                ) from None
    return frozenset(wanted)


def _entity_type(value: str | None) -> tuple[str | None, str | None]:
    """(entity type code, resource type) for an ``entity-type`` value: R4's
    AuditEventEntityType holds both the audit-entity-type codes and the resource types,
    and the events name a resource's type in the reference, so a resource type is
    searched as ``resource-type``."""
    if value is None or value in ENTITY_TYPE_CODES or not RESOURCE_TYPE.fullmatch(value):
        return value, None
    return None, value


def event_query(params: Any) -> Search:
    """The store query for the request's parameters, and what goes with it."""
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

    entity_type, typed_resource = _entity_type(given("entity-type"))
    resource_type = given("resource-type")
    if typed_resource is not None and resource_type not in (None, typed_resource):
        raise BadQuery(
            f"entity-type={typed_resource} and resource-type={resource_type} cannot both hold"
        )
    signals = _signals(params)
    marked = _marks(params, "_tag")
    unmarked = _marks(params, "_tag:not")
    if len(signals) == 1 and (only := next(iter(signals))) in INDEXED:
        marked = (*marked, INDEXED[only].value)  # exact: the index holds it
    if set(marked) & set(unmarked):
        raise BadQuery("_tag and _tag:not name the same tag: no event can match")
    annotate = params.get("with-signals", "false")
    if annotate not in ("true", "false"):
        raise BadQuery("with-signals takes true or false")
    query = EventQuery(
        patient=_patient(params["patient"]) if params.get("patient") else None,
        user=given("user"),
        agent=given("agent"),
        entity=given("entity"),
        entity_type=entity_type,
        event_type=given("type"),
        address=given("address"),
        resource_type=resource_type or typed_resource,
        request_id=given("request-id"),
        action=given("action"),
        outcome=given("outcome"),
        subtype=given("subtype"),
        marked=marked,
        unmarked=unmarked,
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
        if k in SEARCH_PARAMS or k in ("_sort", "_elements", "_total", "with-signals")
    ]
    return Search(query, echo, signals, annotate == "true" or bool(signals))


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
        asked = event_query(request.query)
    except BadQuery as exc:
        return outcome_response(400, "invalid", str(exc))
    query = asked.query
    store = request.app[STORE]
    settings = request.app[SETTINGS].signals
    outcome: str | None = None
    if asked.scanned:
        found = await signal_page(store, settings, query, asked.signals)
        items, signals, total = found.items, found.signals, None
        after, before = found.after, found.before
        if found.stopped:
            outcome = (
                f"{found.examined} events examined for the signals asked for (at most"
                f" {SCAN_LIMIT} a page): follow the next link to examine older ones"
            )
    else:
        page = await store.search_page(query)
        items, total = page.items, page.total
        signals = await signals_of(items, store, settings) if asked.annotate else []
        after = page.cursor_of(items[-1], query.sort) if items and page.more_after else None
        before = page.cursor_of(items[0], query.sort) if items and page.more_before else None
    if discloses(items) or (query.limit == 0 and total):
        await record_access(request, search=asked.echo)
    base = f"{public_base(request)}/fhir"
    count = query.limit

    def link(cursor: str | None) -> str:
        params = [*asked.echo, ("_count", str(count))]
        if cursor:
            params.append(("_cursor", cursor))
        return f"{base}/AuditEvent?{urlencode(params)}"

    own = request.query.get("_cursor")
    links = [{"relation": "self", "url": link(own)}]
    # The first page has no previous link: nothing precedes it (the viewer follows new
    # events by searching from the newest it shows, ``date=ge…&_sort=date``).
    if after is not None:
        links.append({"relation": "next", "url": link(f"n{after[0]!r}_{after[1]}")})
    if before is not None:
        links.append({"relation": "previous", "url": link(f"p{before[0]!r}_{before[1]}")})
    elements = [e for e in request.query.get("_elements", "").split(",") if e]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    entries = []
    for n, item in enumerate(items):
        entry_search: dict[str, Any] = {"mode": "match"}
        if asked.annotate and signals[n]:
            entry_search["extension"] = [
                {"url": SIGNAL_EXT, "valueCode": str(signal)}
                for signal in Signal
                if signal in signals[n]
            ]
        entries.append(
            {
                "fullUrl": f"{base}/AuditEvent/{item.event_id}",
                "resource": _subset(item.event, elements) if elements else item.event,
                "search": entry_search,
            }
        )
    if outcome is not None:
        entries.append(
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "information", "code": "informational", "diagnostics": outcome}
                    ],
                },
                "search": {"mode": "outcome"},
            }
        )
    bundle["entry"] = entries
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
