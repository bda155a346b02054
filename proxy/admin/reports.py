"""The privacy officer's reports, as JSON (for other tools and the viewer) and CSV:

- ``GET /api/reports/patient-access?patient=…&from=…&to=…``: every access to one
  patient's record in a period, grouped by user (who, role, client, how many, first and
  last, interactions, outcomes, signals), each group with its events: an accounting of
  who has seen the record, as a patient may ask for it.
- ``GET /api/reports/user-activity?user=…&from=…&to=…``: what one user did, grouped by
  patient, and counted by day.
- ``GET /api/reports/{patient-access|user-activity}/events?<the report's parameters>
  &group=…&after=…&count=…``: the report's events (of the group named, or all), newest
  first, ``count`` (default :data:`GROUP_PAGE`) at a time: ``{"items": […], "next":
  link}``, ``next`` null after the last.
- ``GET /api/activity?<search parameters>&bucket=hour|day|auto&tz=…``: the events of a
  search counted per hour or day, by action and by outcome (the viewer's chart).
- ``GET /api/export.csv?<search parameters>&tz=…``: every event a search matches, as CSV.

A report's summaries (its counts, and each group's) cover all its events and are read
from the store's index columns; each group then lists its first page of events
(``items``, read whole) while the report has listed fewer than :data:`REPORT_LISTED`,
and links to the rest (``next``, null when ``items`` holds them all). ``format=csv``
gives every event of a report, streamed.

``from`` and ``to`` are FHIR dates or dateTimes, both inclusive at their precision;
``tz`` (an IANA zone, default UTC) is the zone of the CSV's times and of the days and
hours counted. Reports leave out admin reads of the trail unless
``admin-access=include``. Each answer that shows events is itself audited
(proxy/admin/access.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from aiohttp import web
from multidict import MultiDict, MultiDictProxy, MultiMapping

from proxy.admin.access import discloses, record_access
from proxy.admin.describe import OUTCOME_WORDS, csv_rows, describe, interaction_words
from proxy.admin.fhir_api import event_query
from proxy.admin.keys import SETTINGS, STORE
from proxy.admin.links import public_base
from proxy.admin.query import BadQuery, parse_count, parse_instant
from proxy.admin.signals import Signal, signal_page, signals_for, signals_of
from proxy.fhir.operation_outcome import outcome_response
from proxy.store.index import Who
from proxy.store.marks import Mark
from proxy.store.records import Cursor, EventQuery, IndexedEvent, QueuedEvent
from proxy.store.search import SLOT_S

REPORT_MAX = 100_000
"""Most events one report covers (the newest); past it the report says it was cut."""
GROUP_PAGE = 50
"""Events of a group in one page: the most a report lists in each group, and what a page
of the events endpoint holds unless asked for another ``count``."""
REPORT_LISTED = 100
"""Most events a report lists in its groups: each group's first page, most recent group
first, while they fit; a group whose events are not all listed links to the rest
(``next``)."""
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


def _filename(kind: str, subject: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", subject)[:80]
    return f"{kind}-{safe}-{date.today().isoformat()}.csv"


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
    def of(
        cls, params: MultiMapping[str], subject: str, hint: str, own: Sequence[str] = ()
    ) -> ReportRequest:
        """The request for a report about ``params[subject]`` (``hint`` says what it is
        when missing); ``own`` names parameters the endpoint takes beside a report's."""
        _known(params, (subject, "from", "to", "format", "tz", "admin-access", *own))
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


def _echo(query: EventQuery) -> list[tuple[str, str]]:
    """The report's query as search parameters, for the event recording the access."""
    echo = [("patient", query.patient)] if query.patient else []
    echo += [("agent", query.agent)] if query.agent else []
    echo += [("date", f"ge{query.date_from.isoformat()}")] if query.date_from else []
    echo += [("date", f"lt{query.date_to.isoformat()}")] if query.date_to else []
    return echo


NOBODY = Who(name="", roles=(), client="", address="")
"""Who acted in an event whose row does not say (its body could not be read)."""


@dataclass(frozen=True, slots=True)
class Entries:
    """Events of a report as its summaries read them, from their rows (not their JSON):
    ``events[i]`` has the signals ``signals[i]``, and who acted in it is
    ``whos[events[i].who]``. Lists side by side rather than a record per event: a report
    has thousands of events, and each object made is one more for the collector."""

    events: Sequence[IndexedEvent]
    """Newest first."""
    signals: list[frozenset[Signal]]
    whos: dict[str | None, Who]
    """Who acted, by the ``who`` column that says it."""


async def _indexed(request: web.Request, query: EventQuery) -> tuple[list[IndexedEvent], bool]:
    """The events of a report, newest first, as their rows say them; and whether there
    were more than :data:`REPORT_MAX` (the newest are kept)."""
    found = await request.app[STORE].indexed(
        dataclasses.replace(query, limit=REPORT_MAX + 1, newest_first=True, after=None)
    )
    return found[:REPORT_MAX], len(found) > REPORT_MAX


async def _record(request: web.Request, query: EventQuery, shown: Sequence[IndexedEvent]) -> None:
    """Record the answer as an access to the trail when it shows an event that is not
    itself such a record (before its first byte: an answer that cannot be recorded is
    not sent)."""
    if any(Mark.ADMIN_ACCESS not in item.marks for item in shown):
        await record_access(request, search=_echo(query))


async def _entries(request: web.Request, found: Sequence[IndexedEvent]) -> Entries:
    """``found`` with their signals and who acted in each."""
    signals = await signals_for(found, request.app[STORE], request.app[SETTINGS].signals)
    whos: dict[str | None, Who] = {None: NOBODY}
    for item in found:
        if item.who not in whos:
            whos[item.who] = Who.of_column(item.who) if item.who else NOBODY
    return Entries(found, signals, whos)


async def _listed(
    request: web.Request, entries: Entries, chosen: Iterable[int]
) -> dict[int, dict[str, Any]]:
    """The ``chosen`` events of ``entries`` (by position) as a report lists them (their
    JSON read and described), by seq; an event pruned since it was found is left out."""
    signals = {entries.events[i].seq: entries.signals[i] for i in chosen}
    events = await request.app[STORE].events_at(list(signals))
    return {
        item.seq: describe(item.event, item.recorded_ts).as_json(str(s) for s in signals[item.seq])
        for item in events
    }


def _counted(values: Iterable[str]) -> dict[str, int]:
    """How many times each value occurs, most frequent first."""
    return dict(Counter(values).most_common())


def _outcome_words(outcome: str | None) -> str:
    return OUTCOME_WORDS.get(outcome or "", outcome or "")


def _named(counts: Counter[Any], words: Callable[[Any], Iterable[str]]) -> dict[str, int]:
    """``counts`` of values, each value counted under each of its ``words``: most frequent
    first, then in the order each word first occurs."""
    named: Counter[str] = Counter()
    for value, n in counts.items():
        for word in words(value):
            named[word] += n
    return dict(named.most_common())


def _summary(key: str, value: str, entries: Entries, members: Sequence[int]) -> dict[str, Any]:
    """What a group of a report says of its events (``members``, positions in
    ``entries``, newest first), before it lists them. The events' values are counted
    first (a group's events share a few), then put in words."""
    events, flags = entries.events, entries.signals
    columns: dict[str | None, None] = {}
    interactions: Counter[tuple[str, ...]] = Counter()
    outcomes: Counter[str | None] = Counter()
    signals: Counter[frozenset[Signal]] = Counter()
    for i in members:
        event = events[i]
        columns[event.who] = None
        interactions[event.subtypes] += 1
        outcomes[event.outcome] += 1
        signals[flags[i]] += 1
    whos = [entries.whos[column] for column in columns]

    def distinct(values: Iterable[str]) -> list[str]:
        return list(dict.fromkeys(v for v in values if v))

    return {
        key: value,
        "names": distinct(w.name for w in whos),
        "roles": distinct(role for w in whos for role in w.roles),
        "clients": distinct(w.client for w in whos),
        "addresses": distinct(w.address for w in whos),
        "events": len(members),
        "first": _iso(events[members[-1]].ts),
        "last": _iso(events[members[0]].ts),
        "interactions": _named(interactions, lambda codes: [interaction_words(codes)]),
        "outcomes": _named(outcomes, lambda outcome: [_outcome_words(outcome)]),
        "signals": _named(signals, lambda flagged: [str(s) for s in flagged]),
    }


def _cursor_text(event: IndexedEvent) -> str:
    return f"{event.ts!r}_{event.seq}"


def _after(value: str | None) -> Cursor | None:
    """The ``after`` parameter of a page of a report's events: ``{recorded}_{seq}``."""
    if not value:
        return None
    try:
        ts, seq = value.split("_")
        return float(ts), int(seq)
    except ValueError:
        raise BadQuery(f"after: {value!r} is not a position this server gave") from None


@dataclass(frozen=True, slots=True)
class ReportKind:
    """One of the reports: what it is about and how it groups its events."""

    name: str
    """Its path under ``/api/reports/``."""
    subject: str
    """The parameter naming what it is about."""
    hint: str
    """What the subject is, for the answer when it is missing."""
    group: str
    """What its groups are of: the key that names each group."""
    keys: Callable[[IndexedEvent], Sequence[str]]
    """The groups an event belongs to."""
    parts: Callable[[ReportRequest, Entries, list[dict[str, Any]]], dict[str, Any]]
    """What this report says beside what every report says, from its events and groups."""

    def links(self, request: web.Request) -> Callable[[str | None, str | None, int | None], str]:
        """Where the events of the report of ``request`` are: given a group (None: all),
        a position to follow (None: from the newest) and a page size (None: the
        default)."""
        asked = [(k, v) for k, v in request.query.items() if k in (self.subject, *_PERIOD_PARAMS)]
        base = f"{public_base(request)}/api/reports/{self.name}/events?{urlencode(asked)}"

        def link(group: str | None, after: str | None, count: int | None) -> str:
            params = [("group", group)] if group is not None else []
            params += [("after", after)] if after is not None else []
            params += [("count", str(count))] if count is not None else []
            return f"{base}&{urlencode(params)}" if params else base

        return link


_PERIOD_PARAMS = ("from", "to", "admin-access")
"""The parameters that choose a report's events beside its subject."""
_PAGE_PARAMS = ("group", "after", "count")
"""The parameters of a page of a report's events."""


def _report_route(kind: ReportKind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of one report: its request checked, its events read from their rows
    and grouped; then CSV (every event read whole, streamed) or JSON (each group's
    summary and its first page of events)."""

    async def report(request: web.Request) -> web.StreamResponse:
        try:
            asked = ReportRequest.of(request.query, kind.subject, kind.hint)
        except BadQuery as exc:
            return outcome_response(400, "invalid", str(exc))
        found, truncated = await _indexed(request, asked.query)
        await _record(request, asked.query, found)
        if asked.csv:
            return await _report_csv(
                request, found, asked.zone, _filename(kind.name, asked.subject)
            )
        entries = await _entries(request, found)
        events = entries.events
        members: dict[str, list[int]] = {}  # each group's events, by position
        for i, event in enumerate(events):
            for key in kind.keys(event):
                members.setdefault(key, []).append(i)
        groups = [
            (key, own, _summary(kind.group, key, entries, own)) for key, own in members.items()
        ]
        groups.sort(key=lambda g: str(g[2]["last"]), reverse=True)
        pages: list[list[int]] = []
        room = REPORT_LISTED
        for _, own, _ in groups:
            pages.append(own[: min(GROUP_PAGE, room)])
            room -= len(pages[-1])
        listed = await _listed(request, entries, (i for page in pages for i in page))
        link = kind.links(request)
        summaries = []
        for (key, own, summary), page in zip(groups, pages, strict=True):
            summary["items"] = [listed[events[i].seq] for i in page if events[i].seq in listed]
            summary["next"] = (
                link(key, _cursor_text(events[page[-1]]) if page else None, None)
                if len(page) < len(own)
                else None
            )
            summaries.append(summary)
        body = {
            "kind": kind.name,
            "period": {
                "start": asked.start.isoformat() if asked.start else None,
                "end": asked.end.isoformat() if asked.end else None,
            },
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "events": len(events),
            "truncated": truncated,
            "signals": _named(Counter(entries.signals), lambda flagged: [str(s) for s in flagged]),
        }
        body.update(kind.parts(asked, entries, summaries))
        return _json(body)

    return report


def _events_route(kind: ReportKind) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of the pages of one report's events (of one of its groups, or all):
    ``count`` at a time, newest first, each read whole and described, with its signals."""

    async def events(request: web.Request) -> web.Response:
        params = request.query
        try:
            _known(params, (kind.subject, *_PERIOD_PARAMS, *_PAGE_PARAMS))
            asked = ReportRequest.of(params, kind.subject, kind.hint, _PAGE_PARAMS)
            group = params.get("group")
            after = _after(params.get("after"))
            count = parse_count(params.get("count"), "count", GROUP_PAGE)
        except BadQuery as exc:
            return outcome_response(400, "invalid", str(exc))
        found, _ = await _indexed(request, asked.query)
        if group is not None:
            found = [item for item in found if group in kind.keys(item)]
        if after is not None:
            found = [item for item in found if (item.ts, item.seq) < after]
        await _record(request, asked.query, found[:count])
        page = await _entries(request, found[:count])
        listed = await _listed(request, page, range(len(page.events)))
        last = _cursor_text(page.events[-1]) if page.events else None
        return _json(
            {
                "items": [listed[e.seq] for e in page.events if e.seq in listed],
                "next": kind.links(request)(group, last, count) if len(found) > count > 0 else None,
            }
        )

    return events


def _patient_access(
    asked: ReportRequest, entries: Entries, groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every access to the patient's record, grouped by user."""
    return {"patient": asked.subject, "users": len(groups), "groups": groups}


NO_PATIENT = "(no patient)"
"""The group of a user's events that name no patient."""
ANONYMOUS = "(anonymous)"
"""The group of a patient's accesses by no known user."""


def _user_activity(
    asked: ReportRequest, entries: Entries, groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """What the user did: by patient, and by day."""
    zone = asked.zone
    days: dict[str, tuple[int, set[str]]] = {}
    for event in entries.events:
        day = datetime.fromtimestamp(event.ts, zone).date().isoformat()
        count, patients = days.get(day, (0, set()))
        days[day] = (count + 1, patients | set(event.patients))
    whos = [entries.whos[column] for column in dict.fromkeys(e.who for e in entries.events)]
    return dict(
        user=asked.subject,
        names=list(dict.fromkeys(w.name for w in whos if w.name)),
        patients=len([g for g in groups if g["patient"] != NO_PATIENT]),
        zone=str(zone),
        days=[
            {"date": day, "events": count, "patients": len(patients)}
            for day, (count, patients) in sorted(days.items())
        ],
        groups=groups,
    )


PATIENT_ACCESS = ReportKind(
    name="patient-access",
    subject="patient",
    hint="Patient/123",
    group="user",
    keys=lambda item: (item.user or ANONYMOUS,),
    parts=_patient_access,
)
USER_ACTIVITY = ReportKind(
    name="user-activity",
    subject="user",
    hint="the user id the events record",
    group="patient",
    keys=lambda item: item.patients or (NO_PATIENT,),
    parts=_user_activity,
)
patient_access = _report_route(PATIENT_ACCESS)
patient_access_events = _events_route(PATIENT_ACCESS)
user_activity = _report_route(USER_ACTIVITY)
user_activity_events = _events_route(USER_ACTIVITY)


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

    return await _stream_csv(
        request, _filename("audit-events", "search"), zone, batches(), record=asked.echo
    )


CsvBatches = AsyncIterator[tuple[Sequence[QueuedEvent], Sequence[frozenset[Signal]]]]
"""Events to write as CSV, a batch at a time, each with its signals."""


async def _stream_csv(
    request: web.Request,
    filename: str,
    zone: tzinfo,
    batches: CsvBatches,
    *,
    record: list[tuple[str, str]] | None,
) -> web.StreamResponse:
    """The CSV of ``batches``, written as they come. ``record``: the search to record as
    an access to the trail before the first event is sent (None: recorded already)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
    )
    header = True
    async for items, signals in batches:
        if record is not None and discloses(items):
            # Before the first byte: an export that cannot be recorded is not sent.
            await record_access(request, search=record)
            record = None
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
    if header:
        await response.write(csv_rows([], zone, header=True).encode())
    await response.write_eof()
    return response


async def _report_csv(
    request: web.Request, found: Sequence[IndexedEvent], zone: tzinfo, filename: str
) -> web.StreamResponse:
    """Every event of a report as CSV, newest first, read whole :data:`EXPORT_BATCH` at a
    time (its reading is recorded already)."""

    async def batches() -> CsvBatches:
        for start in range(0, len(found), EXPORT_BATCH):
            batch = await _entries(request, found[start : start + EXPORT_BATCH])
            signals = {
                e.seq: flagged for e, flagged in zip(batch.events, batch.signals, strict=True)
            }
            events = await request.app[STORE].events_at(list(signals))
            yield events, [signals[item.seq] for item in events]

    return await _stream_csv(request, filename, zone, batches(), record=None)
