"""Signals: what makes an access stand out to a privacy monitor, as privacy-monitoring
products flag it. Each event gets a set of them, computed when it is shown (a page, a
report), from the event itself, the settings (``admin.signals``) and the store's index
(the report face, :class:`~proxy.store.faces.ReportReader`):

- ``first-access``: the first event, in the retained history, by this user about this
  patient (one seek into ``access_pairs`` per user and patient shown);
- ``many-patients``: the user touched more than ``patients_per_hour`` patients in the
  hour up to this event (the user's events in that hour, read once per run of events
  shown);
- ``after-hours``: recorded outside ``working_hours`` (the event alone);
- ``denied``: the server answered 401 or 403; ``failed``: any other failure outcome
  (the event alone);
- ``break-glass``: the user's token claimed an emergency purpose of use, ``ETREAT`` or
  ``BTG`` (the event alone).

Admin reads of the trail are no access to a patient's record: they get no signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol
from zoneinfo import ZoneInfo

from proxy.settings import WEEKDAYS, SignalSettings, WorkingHours
from proxy.store.faces import AdminStore, ReportReader
from proxy.store.index import outcome_code_of, patients_of, user_of
from proxy.store.marks import Mark, marks_of_event
from proxy.store.records import (
    Cursor,
    EventQuery,
    QueuedEvent,
    SortKey,
    UserAccess,
)

HOUR_S = 3600.0


class Signal(StrEnum):
    """Why an access stands out."""

    FIRST_ACCESS = "first-access"
    MANY_PATIENTS = "many-patients"
    AFTER_HOURS = "after-hours"
    DENIED = "denied"
    FAILED = "failed"
    BREAK_GLASS = "break-glass"


INDEXED = {Signal.DENIED: Mark.DENIED, Signal.BREAK_GLASS: Mark.BREAK_GLASS}
"""Signals that are marks in the index: a filter on one of them walks its term."""


@dataclass(frozen=True, slots=True)
class Access:
    """What the signals of one stored event are computed from, read from its JSON."""

    ts: float
    """``recorded`` as a POSIX timestamp."""
    seq: int
    """The event's global seq: with ``ts``, its position in the trail."""
    user: str | None
    """The requestor's id, as the store keeps it."""
    patients: tuple[str, ...]
    outcome: str | None
    marks: frozenset[Mark]

    @classmethod
    def of(cls, item: QueuedEvent) -> Access:
        """The access a stored event is, read from its JSON."""
        event = item.event
        return cls(
            ts=item.recorded_ts,
            seq=item.seq,
            user=user_of(event),
            patients=tuple(patients_of(event)),
            outcome=outcome_code_of(event),
            marks=frozenset(marks_of_event(event)),
        )


class Accessed(Protocol):
    """What the signals of one stored event are computed from: an :class:`Access` read
    from its JSON, or an :class:`~proxy.store.records.IndexedEvent` read from its row."""

    @property
    def ts(self) -> float: ...
    @property
    def seq(self) -> int: ...
    @property
    def user(self) -> str | None: ...
    @property
    def patients(self) -> tuple[str, ...]: ...
    @property
    def outcome(self) -> str | None: ...
    @property
    def marks(self) -> frozenset[Mark]: ...


def of_record(access: Accessed) -> bool:
    """Whether it is an access to a patient's record by a known user (not an admin read
    of the trail)."""
    return bool(access.user and access.patients and Mark.ADMIN_ACCESS not in access.marks)


def after_hours(ts: float, hours: WorkingHours) -> bool:
    """Whether POSIX time ``ts`` falls outside ``hours`` (in their zone)."""
    local = datetime.fromtimestamp(ts, ZoneInfo(hours.zone))
    day, at = WEEKDAYS[local.weekday()], local.time()
    if hours.start == hours.end:  # round the clock on the days named
        return day not in hours.days
    if hours.start < hours.end:
        inside = day in hours.days and hours.start <= at < hours.end
    else:  # a shift past midnight belongs to the day it started
        yesterday = WEEKDAYS[(local - timedelta(days=1)).weekday()]
        inside = (day in hours.days and at >= hours.start) or (
            yesterday in hours.days and at < hours.end
        )
    return not inside


def _spans(times: Sequence[float]) -> list[tuple[float, float]]:
    """The hours up to each of ``times``, overlapping ones joined."""
    spans: list[tuple[float, float]] = []
    for ts in sorted(times):
        if spans and ts - HOUR_S <= spans[-1][1]:
            spans[-1] = (spans[-1][0], ts)
        else:
            spans.append((ts - HOUR_S, ts))
    return spans


def _patients_in_hour(accesses: Sequence[Accessed], around: Sequence[UserAccess]) -> list[int]:
    """For each of ``accesses`` (one user's, any order), how many patients the user's
    events ``around`` (in time order) name in the hour up to it."""
    order = sorted(range(len(accesses)), key=lambda i: (accesses[i].ts, accesses[i].seq))
    counts = [0] * len(accesses)
    window: dict[str, int] = {}  # the events naming each patient in the hour
    start = end = 0
    for i in order:
        access = accesses[i]
        while end < len(around) and around[end].ts <= access.ts:
            for patient in around[end].patients:
                window[patient] = window.get(patient, 0) + 1
            end += 1
        while start < end and around[start].ts < access.ts - HOUR_S:
            for patient in around[start].patients:
                if window[patient] == 1:
                    del window[patient]
                else:
                    window[patient] -= 1
            start += 1
        counts[i] = len(window)
    return counts


async def signals_of(
    items: Sequence[QueuedEvent], reports: ReportReader, settings: SignalSettings
) -> list[frozenset[Signal]]:
    """The signals of each of ``items``."""
    return await signals_for([Access.of(item) for item in items], reports, settings)


async def signals_for(
    accesses: Sequence[Accessed], reports: ReportReader, settings: SignalSettings
) -> list[frozenset[Signal]]:
    """The signals of each of ``accesses``."""
    by_user: dict[str, list[Accessed]] = {}
    for access in accesses:
        if access.user and of_record(access):
            by_user.setdefault(access.user, []).append(access)
    found = await reports.first_accesses(
        [(user, p) for user, own in by_user.items() for p in {p for a in own for p in a.patients}]
    )
    firsts: dict[str, dict[str, Cursor]] = {}
    for (user, patient), position in found.items():
        firsts.setdefault(user, {})[patient] = position
    windows = [
        (user, since, until)
        for user, own in by_user.items()
        for since, until in _spans([a.ts for a in own])
    ]
    around = await reports.user_accesses(windows)
    crowded: set[int] = set()
    for user, own in by_user.items():
        counts = _patients_in_hour(own, around.get(user, []))
        for access, count in zip(own, counts, strict=True):
            if count > settings.patients_per_hour:
                crowded.add(id(access))
    # Each event's signals as bits of ``Signal``'s order: most events share a few sets,
    # each made once.
    sets: dict[int, frozenset[Signal]] = {}
    out: list[frozenset[Signal]] = []
    for access in accesses:
        bits = 0
        if Mark.ADMIN_ACCESS not in access.marks:
            if access.user and of_record(access):
                own_firsts = firsts.get(access.user, {})
                for patient in access.patients:
                    # The user's first access to the patient is not before this one.
                    first = own_firsts.get(patient)
                    if first is not None and (
                        first[0] > access.ts or (first[0] == access.ts and first[1] >= access.seq)
                    ):
                        bits |= _BIT[Signal.FIRST_ACCESS]
                        break
            if id(access) in crowded:
                bits |= _BIT[Signal.MANY_PATIENTS]
            if after_hours(access.ts, settings.working_hours):
                bits |= _BIT[Signal.AFTER_HOURS]
            if Mark.DENIED in access.marks:
                bits |= _BIT[Signal.DENIED]
            elif access.outcome not in (None, "", "0"):
                bits |= _BIT[Signal.FAILED]
            if Mark.BREAK_GLASS in access.marks:
                bits |= _BIT[Signal.BREAK_GLASS]
        flagged = sets.get(bits)
        if flagged is None:
            flagged = sets[bits] = frozenset(s for s, bit in _BIT.items() if bits & bit)
        out.append(flagged)
    return out


_BIT = {signal: 1 << n for n, signal in enumerate(Signal)}


SCAN_LIMIT = 20_000
"""Most events a signal-filtered page examines: past them it returns what it found and a
link that goes on from where it stopped, so that no request walks the whole store."""
SCAN_BATCH = 500


@dataclass(frozen=True, slots=True)
class SignalPage:
    """A page of the events a search matches that have one of the wanted signals."""

    items: list[QueuedEvent]
    """In the query's order."""
    signals: list[frozenset[Signal]]
    """Each item's signals."""
    after: Cursor | None
    """Where the next page starts (None: no events follow)."""
    before: Cursor | None
    """Where the previous page ends (None: no events precede)."""
    examined: int
    """Events looked at for this page."""
    stopped: bool
    """The page stopped at :data:`SCAN_LIMIT` events examined, not at a full page or the
    end of the matches."""


async def signal_page(
    store: AdminStore,
    settings: SignalSettings,
    query: EventQuery,
    wanted: frozenset[Signal],
) -> SignalPage:
    """The events ``query`` matches that have any of ``wanted``, ``query.limit`` at most,
    from its cursor on (``after``, or backwards from ``before``), examining at most
    :data:`SCAN_LIMIT` events."""
    reverse = query.before is not None
    cursor = query.before if reverse else query.after
    found: list[tuple[QueuedEvent, frozenset[Signal]]] = []
    examined = 0
    more = True
    while len(found) <= query.limit and examined < SCAN_LIMIT and more:
        batch = replace(
            query,
            limit=SCAN_BATCH,
            offset=0,
            count_total=False,
            after=None if reverse else cursor,
            before=cursor if reverse else None,
        )
        page = await store.search_page(batch)
        if not page.items:
            more = False
            break
        pairs = list(zip(page.items, await signals_of(page.items, store, settings), strict=True))
        if reverse:
            pairs.reverse()  # walking away from the cursor
        more = page.more_before if reverse else page.more_after
        for n, (item, flagged) in enumerate(pairs):
            examined += 1
            cursor = _position(item, query)
            if flagged & wanted:
                found.append((item, flagged))
            if len(found) > query.limit or examined >= SCAN_LIMIT:
                more = more or n + 1 < len(pairs)
                break
    full = len(found) > query.limit
    kept = found[: query.limit]
    beyond = _position(kept[-1][0], query) if full and kept else cursor if more else None
    back = query.after if not reverse else query.before
    items = [item for item, _ in kept]
    signals = [flagged for _, flagged in kept]
    start = _position(items[0], query) if items else back
    if reverse:
        items.reverse()
        signals.reverse()
        return SignalPage(
            items, signals, after=back, before=beyond, examined=examined, stopped=not full and more
        )
    return SignalPage(
        items,
        signals,
        after=beyond,
        before=start if query.after is not None else None,
        examined=examined,
        stopped=not full and more,
    )


def _position(item: QueuedEvent, query: EventQuery) -> Cursor:
    """The keyset position of ``item`` in ``query``'s order."""
    return (item.recorded_ts if query.sort is SortKey.RECORDED else 0.0, item.seq)
