"""What the queue holds: events with their own delivery state, and write intents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from proxy.store.marks import Mark


class EventRow(NamedTuple):
    """One AuditEvent as the store writes it: the columns it indexes, and the event as
    JSON. The builder makes it beside the event (it knows every value); events from
    outside (ingest, tests) get it from :func:`proxy.store.index.event_row`.

    Its fields are the ``events`` table's columns that describe the event, declared here
    once: the SQL that inserts and reads them (:mod:`proxy.store.tables`) and the message
    to the writer process (:mod:`proxy.store.wire`) follow this declaration. Construct it
    with keywords (or ``_replace``), never by position. A NamedTuple rather than a frozen
    dataclass because one is made and pickled for every event on the request path, and
    it is the named record cheapest to make and to send (``bench/RESULTS.md``)."""

    event_id: str
    recorded: str
    """``AuditEvent.recorded`` as written in the event."""
    recorded_ts: float
    action: str | None
    outcome: str | None
    subtypes: str
    """``|a|b|``: searchable with ``LIKE '%|a|%'``."""
    patients: str
    """``|Patient/1|Patient/2|``, in the same form as ``subtypes``."""
    user_id: str | None
    body: bytes
    """The event as JSON (the writer compresses it)."""
    terms: str
    """A JSON array of the searchable values, each with its kind as a prefix: ``e:``
    entity reference, ``r:`` resource type, ``a:`` an agent's id, name or address."""
    type_code: str | None
    entity_types: str
    request_id: str | None
    updated_ts: float
    who: str | None
    """Who acted, as the privacy reports list it (:class:`~proxy.store.index.Who`, in
    the form of its ``column``); None only in rows stored before schema 8's backfill."""


FAN_MAX = 0x10000
"""Most events in one :class:`FanOut`: the last four hex digits of an id number them."""


def member_id(first_id: str, index: int) -> str:
    """The id of event ``index`` of a fan-out whose first event's id is ``first_id``
    (a UUID ending in ``0000``): the same UUID ending in ``index`` as four hex digits."""
    return f"{first_id[:-4]}{index:04x}"


class FanOut(NamedTuple):
    """Events that differ only in their id and in one patient (a search answered with
    seven patients' resources: seven events), handed to the store and stored as one
    row (:meth:`stored`); :meth:`row` makes the row of each of its events. Event ``i``
    is ``head + member_id(first_id, i) + before + json(patients[i]) + tail`` as JSON,
    with ``|patients[i]|`` as its ``patients``, ``["e:patients[i]"`` then ``terms_tail``
    as its ``terms``, and every other column as in ``columns``."""

    first_id: str
    """The first event's id, ending in ``0000`` (:func:`member_id`)."""
    patients: tuple[str, ...]
    """One per event, distinct, unversioned, none among the terms of ``terms_tail``."""
    head: bytes
    before: bytes
    tail: bytes
    terms_tail: str
    """The terms after the patient's: ``,"…",…]`` or ``]``."""
    columns: EventRow
    """The shared columns (its ``event_id``, ``patients``, ``body`` and ``terms`` unused)."""

    def row(self, index: int) -> EventRow:
        """The row of event ``index``."""
        patient = self.patients[index]
        event_id, body = self.event(index)
        return self.columns._replace(
            event_id=event_id,
            patients=f"|{patient}|",
            body=body,
            terms=f"[{orjson.dumps('e:' + patient).decode()}{self.terms_tail}",
        )

    def event(self, index: int) -> tuple[str, bytes]:
        """The id and the JSON of event ``index``."""
        event_id = member_id(self.first_id, index)
        patient = orjson.dumps(self.patients[index])
        return event_id, b"".join((self.head, event_id.encode(), self.before, patient, self.tail))

    def rows(self) -> list[EventRow]:
        """The row of every event, in order."""
        return [self.row(i) for i in range(len(self.patients))]

    def stored(self) -> EventRow:
        """The one row the store keeps for all the events: the first's id, every
        patient in ``patients`` (in order), every event's terms in ``terms``, and as its
        body the three parts the events share, separated by NUL (which JSON text never
        holds unescaped). :meth:`from_stored` reads it back."""
        return self.columns._replace(
            event_id=self.first_id,
            patients="|" + "|".join(self.patients) + "|",
            body=b"\0".join((self.head, self.before, self.tail)),
            terms=_patient_terms(self.patients) + self.terms_tail,
        )

    @classmethod
    def from_stored(cls, row: EventRow) -> FanOut:
        """The fan-out whose :meth:`stored` row is ``row`` (its body decompressed)."""
        patients = tuple(row.patients[1:-1].split("|"))
        head, before, tail = row.body.split(b"\0")
        return cls(
            first_id=row.event_id,
            patients=patients,
            head=head,
            before=before,
            tail=tail,
            terms_tail=row.terms[len(_patient_terms(patients)) :],
            columns=row,
        )


def _patient_terms(patients: Sequence[str]) -> str:
    """The patients' terms as a stored fan-out's ``terms`` begins: ``["e:…","e:…"``."""
    return orjson.dumps(["e:" + p for p in patients]).decode()[:-1]


def events_in(rows: Sequence[EventRow | FanOut]) -> int:
    """How many events ``rows`` holds."""
    return sum(len(r.patients) if type(r) is FanOut else 1 for r in rows)


class Capture(NamedTuple):
    """The bodies of one exchange, kept beside its events when ``audit.capture_bodies`` is
    on (size-limited, secrets redacted), and returned by the Smile CDR compatible
    ``GET /audit-log/event/{id}?includeBody=true``."""

    request_id: str
    request: bytes | None
    response: bytes | None


class EventStatus(StrEnum):
    """Where an event is in its life."""

    PENDING = "pending"
    """Waiting for (re)delivery."""
    DELIVERED = "delivered"
    """Acknowledged by the repository with a 2xx; kept for ``retention_days``."""
    DEAD = "dead"
    """Rejected by the repository (4xx after bisection); waits for ``dlq retry``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueuedEvent:
    """One AuditEvent in the queue, with its delivery bookkeeping."""

    seq: int
    """Queue order: delivery follows it."""
    event_id: str
    """``AuditEvent.id``, set when the event was built; stable across redeliveries."""
    event: dict[str, Any]
    """The AuditEvent resource as stored (R4 or R5)."""
    status: EventStatus
    attempts: int
    """Failed delivery attempts so far."""
    next_attempt_at: datetime | None
    """Not to be sent before this (backoff)."""
    last_error: str | None
    """The last delivery failure, or the repository's rejection for dead events."""
    recorded: str
    """``AuditEvent.recorded``."""
    recorded_ts: float = 0.0
    """``recorded`` as a POSIX timestamp, as the queue orders and pages by it."""
    leaf: int | None = None
    """Its leaf index in the shard's Merkle log; None for events stored before the log."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent:
    """A state-changing request committed before it was forwarded."""

    id: int
    created_at: datetime
    summary: dict[str, Any]
    """What ``proxy.audit.intents.intent_summary`` recorded (no secrets); opaque to the store."""
    reason: str | None = None
    """Why the request abandoned it, when noted
    (:meth:`~proxy.store.faces.EventWriter.note_intent_reasons`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    pending: int
    delivered: int
    dead: int
    intents: int
    size_bytes: int
    """Bytes in use by the database (free pages excluded)."""
    oldest_pending_recorded: float | None = None
    """``recorded`` (POSIX time) of the oldest undelivered event, or None when none is."""


class SortKey(StrEnum):
    """What search results are ordered by."""

    RECORDED = "recorded"
    """``AuditEvent.recorded`` (then queue order): FHIR's ``date``."""
    STORED = "stored"
    """Queue order, which is the order events were stored: ``_lastUpdated``/``createdAt``."""


Cursor = tuple[float, int]
"""A keyset position: (recorded time, seq) for RECORDED, (0.0, seq) for STORED."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventQuery:
    """A search over stored events (the admin API). Every filter given must hold."""

    patient: str | None = None
    """``Patient/1``: events with an entity referencing that patient."""
    user: str | None = None
    """The requestor agent's id."""
    agent: str | None = None
    """Any agent's user id, client id, name or network address."""
    entity: str | None = None
    """An entity's ``what.reference``."""
    entity_type: str | None = None
    """An entity's ``type`` code."""
    event_type: str | None = None
    """``AuditEvent.type`` code (R5: the first category's)."""
    address: str | None = None
    """An agent's network address (looked up among every agent value, as ``agent``)."""
    resource_type: str | None = None
    """A resource type the event is about (not the patient's own ``Patient``)."""
    request_id: str | None = None
    """Text the ``X-Request-Id`` entity contains."""
    action: str | None = None
    outcome: str | None = None
    subtype: str | None = None
    marked: tuple[str, ...] = ()
    """Marks (``proxy.store.marks.Mark`` values) the event must carry, every one."""
    unmarked: tuple[str, ...] = ()
    """Marks the event must not carry (the viewer leaves out admin-access events)."""
    date_from: datetime | None = None
    """Inclusive lower bound on ``recorded``."""
    date_to: datetime | None = None
    """Exclusive upper bound on ``recorded``."""
    updated_from: datetime | None = None
    """Inclusive lower bound on ``meta.lastUpdated`` (``recorded`` where absent)."""
    updated_to: datetime | None = None
    """Exclusive upper bound on ``meta.lastUpdated``."""
    sort: SortKey = SortKey.RECORDED
    newest_first: bool = True
    limit: int = 50
    offset: int = 0
    """Rows to skip: only for APIs that page by number; keyset paging uses ``after``."""
    after: Cursor | None = None
    """Only rows after this position in the result order (the next page)."""
    before: Cursor | None = None
    """Only rows before this position (the previous page); the page keeps result order."""
    count_total: bool = True
    """Whether to count every match (``total``); a count is one more index range walk."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventPage:
    """One page of a search."""

    items: list[QueuedEvent]
    total: int | None
    """Every match, when counted."""
    more_after: bool
    """Rows follow the last item in the result order."""
    more_before: bool
    """Rows precede the first item (known for ``after``/``before`` pages)."""

    @classmethod
    def walked(
        cls, query: EventQuery, items: list[QueuedEvent], total: int | None, *, more: bool
    ) -> EventPage:
        """The page of ``query`` whose events are ``items`` in the order they were walked
        from its cursor (backwards from ``before``: the page then turns them round),
        ``more`` saying whether the walk went on past them."""
        if query.before is not None:
            return cls(items=items[::-1], total=total, more_after=True, more_before=more)
        return cls(
            items=items,
            total=total,
            more_after=more,
            more_before=query.after is not None or query.offset > 0,
        )

    def cursor_of(self, item: QueuedEvent, sort: SortKey) -> Cursor:
        """The keyset position of ``item``."""
        return (item.recorded_ts if sort is SortKey.RECORDED else 0.0, item.seq)


Pair = tuple[str, str]
"""(user id, patient reference)."""
Window = tuple[str, float, float]
"""(user id, since, until): a user's events recorded in ``[since, until]``."""


class UserAccess(NamedTuple):
    """One of a user's events, as far as counting the patients they touched needs. A
    NamedTuple rather than a frozen dataclass: a report makes one for each event of its
    users in the hours around its events, and this record is the cheapest to make
    (``bench/RESULTS.md``). Construct it with keywords."""

    ts: float
    """``recorded`` as a POSIX timestamp."""
    seq: int
    """The seq of its row (a fan-out row: its last event's)."""
    patients: tuple[str, ...]
    """Every patient the row names (a fan-out row: all its events' patients)."""


class IndexedEvent(NamedTuple):
    """One stored event as its row's columns say it, its JSON unread: what the privacy
    reports sum up of each event (the events they list are read whole, a page at a
    time). A NamedTuple rather than a frozen dataclass, as :class:`UserAccess`: one is
    made for each event of a report. Construct it with keywords."""

    seq: int
    """The event's seq (a fan-out's event: its own, below its row's)."""
    ts: float
    """``recorded`` as a POSIX timestamp."""
    user: str | None
    """``EventRow.user_id``."""
    patients: tuple[str, ...]
    """The patients the event names (a fan-out's event: its one)."""
    outcome: str | None
    subtypes: tuple[str, ...]
    """``EventRow.subtypes``: the interaction's codes."""
    who: str | None
    """``EventRow.who``."""
    marks: frozenset[Mark]
    """The marks among its terms."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityCount:
    """How many events of one action and outcome were recorded in one quarter hour."""

    slot: int
    """The quarter hour: its start is ``slot * SLOT_S`` (POSIX time,
    :data:`proxy.store.search.SLOT_S`)."""
    action: str
    """``AuditEvent.action`` (empty when the event has none)."""
    outcome: str
    """The outcome code (empty when the event has none)."""
    events: int
