"""The privacy officer's reports, as JSON (for other tools and the viewer) and CSV:

- ``GET /api/reports/patient-access?patient=…&from=…&to=…``: every access to one
  patient's record in a period, grouped by user (who, role, client, how many, first and
  last, interactions, outcomes, signals), each group with its events: an accounting of
  who has seen the record, as a patient may ask for it.
- ``GET /api/reports/user-activity?user=…&from=…&to=…``: what one user did, grouped by
  patient, and counted by day.
- ``GET /api/activity?<search parameters>&bucket=hour|day|auto&tz=…``: the events of a
  search counted per hour or day, by action and by outcome (the viewer's chart).
- ``GET /api/export.csv?<search parameters>&tz=…``: every event a search matches, as CSV.

``from`` and ``to`` are FHIR dates or dateTimes, both inclusive at their precision;
``tz`` (an IANA zone, default UTC) is the zone of the CSV's times and of the days and
hours counted. ``format=csv`` gives a report as CSV. Reports leave out admin reads of
the trail unless ``admin-access=include``. Each answer that shows events is itself
audited (proxy/admin/access.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from aiohttp import web
from multidict import MultiDict, MultiDictProxy, MultiMapping

from proxy.admin.access import discloses, record_access
from proxy.admin.describe import Described, csv_rows, describe
from proxy.admin.fhir_api import event_query
from proxy.admin.keys import SETTINGS, STORE
from proxy.admin.query import BadQuery, parse_instant
from proxy.admin.signals import Access, Signal, signal_page, signals_for, signals_of
from proxy.fhir.operation_outcome import outcome_response
from proxy.store.marks import Mark
from proxy.store.records import EventQuery, QueuedEvent
from proxy.store.search import SLOT_S

REPORT_MAX = 100_000
"""Most events one report lists; past it the report says it was cut."""
REPORT_BATCH = 250
EXPORT_BATCH = 1_000
AUTO_HOURLY_S = 3 * 86_400
"""``bucket=auto``: hours for a range up to three days, days beyond."""


def _zone(params: MultiMapping[str]) -> ZoneInfo:
    name = params.get("tz") or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadQuery(f"tz: {name!r} is not an IANA time zone (such as Europe/Berlin)") from None


def _period(params: MultiMapping[str]) -> tuple[datetime | None, datetime | None]:
    start = parse_instant(params["from"], "from")[0] if params.get("from") else None
    end = parse_instant(params["to"], "to")[1] if params.get("to") else None
    if start is not None and end is not None and start >= end:
        raise BadQuery("from must be before to")
    return start, end


def _include_admin(params: MultiMapping[str]) -> bool:
    value = params.get("admin-access", "exclude")
    if value not in ("include", "exclude"):
        raise BadQuery("admin-access takes include or exclude")
    return value == "include"


def _format(params: MultiMapping[str]) -> str:
    value = params.get("format", "json")
    if value not in ("json", "csv"):
        raise BadQuery("format takes json or csv")
    return value


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _known(params: MultiMapping[str], allowed: Sequence[str]) -> None:
    unknown = sorted({k for k in params if k not in allowed})
    if unknown:
        raise BadQuery(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(allowed)}")


async def _events_of(
    request: web.Request, query: EventQuery
) -> tuple[list[tuple[Described, frozenset[Signal]]], bool]:
    """The events of a report, newest first, described, with their signals; and whether
    there were more than :data:`REPORT_MAX`. Read :data:`REPORT_BATCH` at a time, each
    batch's events let go once described (a report of thousands of events would
    otherwise hold every event's JSON at once)."""
    store = request.app[STORE]
    settings = request.app[SETTINGS].signals
    batch = dataclasses.replace(
        query, limit=REPORT_BATCH, count_total=False, newest_first=True, after=None
    )
    found: list[tuple[Described, frozenset[Signal]]] = []
    recorded = False
    while True:
        page = await store.search_page(batch)
        if not recorded and discloses(page.items):
            await record_access(request, search=_echo(query))
            recorded = True
        described = [describe(item.event, item.recorded_ts) for item in page.items]
        accesses = [
            Access.described(d, item.seq) for d, item in zip(described, page.items, strict=True)
        ]
        signals = await signals_for(accesses, store, settings)
        found += list(zip(described, signals, strict=True))
        if not page.more_after or not page.items or len(found) >= REPORT_MAX:
            return found[:REPORT_MAX], len(found) > REPORT_MAX or (
                len(found) >= REPORT_MAX and page.more_after
            )
        batch = dataclasses.replace(batch, after=page.cursor_of(page.items[-1], batch.sort))


def _echo(query: EventQuery) -> list[tuple[str, str]]:
    """The report's query as search parameters, for the event recording the access."""
    echo = [("patient", query.patient)] if query.patient else []
    echo += [("agent", query.agent)] if query.agent else []
    echo += [("date", f"ge{query.date_from.isoformat()}")] if query.date_from else []
    echo += [("date", f"lt{query.date_to.isoformat()}")] if query.date_to else []
    return echo


def _group(
    key: str, value: str, events: Sequence[tuple[Described, frozenset[Signal]]]
) -> dict[str, Any]:
    """One group of a report: its events (newest first) summed up, then listed."""
    described = [d for d, _ in events]

    def distinct(pick: Callable[[Described], Sequence[str] | str]) -> list[str]:
        seen: dict[str, None] = {}
        for d in described:
            picked = pick(d)
            for v in [picked] if isinstance(picked, str) else picked:
                if v:
                    seen[v] = None
        return list(seen)

    return {
        key: value,
        "names": distinct(lambda d: d.user_name),
        "roles": distinct(lambda d: d.roles),
        "clients": distinct(lambda d: d.client),
        "addresses": distinct(lambda d: d.address),
        "events": len(events),
        "first": _iso(min(d.ts for d in described)),
        "last": _iso(max(d.ts for d in described)),
        "interactions": dict(Counter(d.interaction for d in described).most_common()),
        "outcomes": dict(Counter(d.outcome_words for d in described).most_common()),
        "signals": dict(Counter(str(s) for _, ss in events for s in ss).most_common()),
        "items": [d.as_json(s) for d, s in events],
    }


def _report(
    kind: str,
    start: datetime | None,
    end: datetime | None,
    events: Sequence[tuple[Described, frozenset[Signal]]],
    truncated: bool,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "period": {
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
        },
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": len(events),
        "truncated": truncated,
        "signals": dict(Counter(str(s) for _, ss in events for s in ss).most_common()),
    }


def _filename(kind: str, subject: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", subject)[:80]
    return f"{kind}-{safe}-{date.today().isoformat()}.csv"


def _csv(
    events: Sequence[tuple[Described, frozenset[Signal]]], zone: tzinfo, filename: str
) -> web.Response:
    return web.Response(
        text=csv_rows([(d, [str(s) for s in ss]) for d, ss in events], zone, header=True),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """A report's parameters, checked."""

    subject: str
    """The patient (``Patient/…``) or the user the report is about."""
    query: EventQuery
    start: datetime | None
    end: datetime | None
    zone: ZoneInfo
    csv: bool

    @classmethod
    def of(cls, params: MultiMapping[str], subject: str, hint: str) -> ReportRequest:
        """The request for a report about ``params[subject]`` (``hint`` says what it is
        when missing)."""
        _known(params, (subject, "from", "to", "format", "tz", "admin-access"))
        value = params.get(subject, "").strip()
        if not value:
            raise BadQuery(f"{subject} is required: {hint}")
        start, end = _period(params)
        unmarked = () if _include_admin(params) else (Mark.ADMIN_ACCESS.value,)
        query = EventQuery(date_from=start, date_to=end, unmarked=unmarked)
        if subject == "patient":
            value = value if "/" in value else f"Patient/{value}"
            query = dataclasses.replace(query, patient=value)
        else:  # the requestor's id, its term walked
            query = dataclasses.replace(query, agent=value, user=value)
        return cls(value, query, start, end, _zone(params), _format(params) == "csv")


Found = list[tuple[Described, frozenset[Signal]]]
"""A report's events, described, each with its signals."""


def _report_route(
    kind: str, subject: str, hint: str, parts: Callable[[ReportRequest, Found], dict[str, Any]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of one report: its request checked, its events read, then CSV or the
    JSON ``parts`` makes (beside what every report says)."""

    async def report(request: web.Request) -> web.Response:
        try:
            asked = ReportRequest.of(request.query, subject, hint)
        except BadQuery as exc:
            return outcome_response(400, "invalid", str(exc))
        events, truncated = await _events_of(request, asked.query)
        if asked.csv:
            return _csv(events, asked.zone, _filename(kind, asked.subject))
        body = _report(kind, asked.start, asked.end, events, truncated)
        body.update(parts(asked, events))
        return _json(body)

    return report


def _patient_access(asked: ReportRequest, events: Found) -> dict[str, Any]:
    """Every access to the patient's record, grouped by user."""
    by_user: dict[str, Found] = {}
    for d, s in events:
        by_user.setdefault(d.user or "(anonymous)", []).append((d, s))
    groups = [_group("user", user, own) for user, own in by_user.items()]
    groups.sort(key=lambda g: g["last"], reverse=True)
    return {"patient": asked.subject, "users": len(groups), "groups": groups}


def _user_activity(asked: ReportRequest, events: Found) -> dict[str, Any]:
    """What the user did: by patient, and by day."""
    zone = asked.zone
    by_patient: dict[str, Found] = {}
    days: dict[str, tuple[int, set[str]]] = {}
    for d, s in events:
        for patient in d.patients or ("(no patient)",):
            by_patient.setdefault(patient, []).append((d, s))
        day = datetime.fromtimestamp(d.ts, zone).date().isoformat()
        count, patients = days.get(day, (0, set()))
        days[day] = (count + 1, patients | set(d.patients))
    groups = [_group("patient", patient, own) for patient, own in by_patient.items()]
    groups.sort(key=lambda g: g["last"], reverse=True)
    described = [d for d, _ in events]
    return dict(
        user=asked.subject,
        names=list(dict.fromkeys(d.user_name for d in described if d.user_name)),
        patients=len([g for g in groups if g["patient"] != "(no patient)"]),
        zone=str(zone),
        days=[
            {"date": day, "events": count, "patients": len(patients)}
            for day, (count, patients) in sorted(days.items())
        ],
        groups=groups,
    )


patient_access = _report_route("patient-access", "patient", "Patient/123", _patient_access)
user_activity = _report_route(
    "user-activity", "user", "the user id the events record", _user_activity
)


def _search_params(params: MultiMapping[str], own: Sequence[str]) -> MultiMapping[str]:
    """The search parameters of a request that also has parameters of its own."""
    return MultiDictProxy(MultiDict([(k, v) for k, v in params.items() if k not in own]))


class LocalSlots:
    """The local hour or day of each quarter-hour slot in a zone, by integer arithmetic:
    a zone's offset is looked up once per UTC day; in the days it changes, once per UTC
    hour; and in the hour it changes (which may be on a half hour), per slot."""

    def __init__(self, zone: tzinfo, step_s: int) -> None:
        self._zone = zone
        self._step_s = step_s
        self._days: dict[int, int | None] = {}
        self._hours: dict[int, int | None] = {}

    def _offset_at(self, ts: float) -> int:
        offset = datetime.fromtimestamp(ts, self._zone).utcoffset()
        return int(offset.total_seconds()) if offset is not None else 0

    def _steady(self, cache: dict[int, int | None], span: int, n: int) -> int | None:
        """The offset all through span ``n`` (``span`` seconds long), or None when it
        changes within it."""
        if n not in cache:
            first, last = self._offset_at(n * span), self._offset_at(n * span + span - 1)
            cache[n] = first if first == last else None
        return cache[n]

    def bucket(self, slot: int) -> int:
        """The local bucket (hour or day number in local wall time) of ``slot``."""
        ts = slot * SLOT_S
        offset = self._steady(self._days, 86_400, ts // 86_400)
        if offset is None:
            offset = self._steady(self._hours, 3600, ts // 3600)
        if offset is None:
            offset = self._offset_at(ts)
        return (ts + offset) // self._step_s

    def start(self, bucket: int) -> datetime:
        """The bucket's first instant: its local wall time, in the zone."""
        wall = datetime(1970, 1, 1) + timedelta(seconds=bucket * self._step_s)
        return wall.replace(tzinfo=self._zone)


async def activity(request: web.Request) -> web.Response:
    """Events per hour or day for a search, by action and by outcome."""
    params = request.query
    try:
        zone = _zone(params)
        bucket = params.get("bucket", "auto")
        if bucket not in ("auto", "hour", "day"):
            raise BadQuery("bucket takes auto, hour or day")
        asked = event_query(_search_params(params, ("tz", "bucket")))
    except BadQuery as exc:
        return outcome_response(400, "invalid", str(exc))
    if asked.signals:
        return outcome_response(
            400, "not-supported", "the activity chart counts by index: it takes no signal filter"
        )
    query = asked.query
    counts = await request.app[STORE].activity(query)
    span = 0.0
    if counts:
        low = query.date_from.timestamp() if query.date_from else counts[0].slot * SLOT_S
        high = query.date_to.timestamp() if query.date_to else (counts[-1].slot + 1) * SLOT_S
        span = high - low
    hourly = bucket == "hour" or (bucket == "auto" and span <= AUTO_HOURLY_S)
    local = LocalSlots(zone, 3600 if hourly else 86_400)
    buckets: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
    for item in counts:
        key = local.bucket(item.slot)
        tally = buckets.get(key)
        if tally is None:
            tally = buckets[key] = ({}, {})
        by_action, by_outcome = tally
        action, outcome = item.action or "?", item.outcome or "?"
        by_action[action] = by_action.get(action, 0) + item.events
        by_outcome[outcome] = by_outcome.get(outcome, 0) + item.events
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    rows = []
    for key, (by_action, by_outcome) in sorted(buckets.items()):
        start = local.start(key)
        rows.append(
            {
                "start": start.isoformat(),
                # Wall-clock arithmetic: a day ends at the next local midnight, 23 or 25
                # hours later on the days daylight saving starts or ends.
                "end": (start + step).isoformat(),
                "events": sum(by_action.values()),
                "byAction": by_action,
                "byOutcome": by_outcome,
            }
        )
    return _json(
        {
            "bucket": "hour" if hourly else "day",
            "zone": str(zone),
            "events": sum(row["events"] for row in rows),
            "buckets": rows,
        }
    )


async def export_csv(request: web.Request) -> web.StreamResponse:
    """Every event a search matches, as CSV (its order; no paging, no count)."""
    params = request.query
    try:
        zone = _zone(params)
        asked = event_query(_search_params(params, ("tz",)))
    except BadQuery as exc:
        return outcome_response(400, "invalid", str(exc))
    store = request.app[STORE]
    settings = request.app[SETTINGS].signals
    query = dataclasses.replace(asked.query, limit=EXPORT_BATCH, count_total=False, before=None)

    async def batches() -> AsyncIterator[tuple[list[QueuedEvent], list[frozenset[Signal]]]]:
        nonlocal query
        while True:
            if asked.scanned:
                found = await signal_page(store, settings, query, asked.signals)
                yield found.items, found.signals
                if found.after is None:
                    return
                query = dataclasses.replace(query, after=found.after)
            else:
                page = await store.search_page(query)
                yield page.items, await signals_of(page.items, store, settings)
                if not page.more_after or not page.items:
                    return
                query = dataclasses.replace(query, after=page.cursor_of(page.items[-1], query.sort))

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{_filename("audit-events", "search")}"',
        }
    )
    recorded = False
    header = True
    async for items, signals in batches():
        if not recorded and discloses(items):
            # Before the first byte: an export that cannot be recorded is not sent.
            await record_access(request, search=asked.echo)
            recorded = True
        if not response.prepared:
            await response.prepare(request)
        described = [
            (describe(item.event, item.recorded_ts), [str(s) for s in ss])
            for item, ss in zip(items, signals, strict=True)
        ]
        await response.write(csv_rows(described, zone, header=header).encode())
        header = False
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response
