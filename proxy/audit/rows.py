"""The rows the store writes for the events the builder makes: each event's index
columns, made from what the builder knows rather than read back out of its JSON (they
equal what :func:`proxy.store.index.event_row` reads out of it), and the events as the
builder hands them over (:data:`Built`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from proxy.audit.vocabulary import TYPE_REST
from proxy.log.entry import EntryTemplate
from proxy.store.marks import DENIED_STATUSES, marks_for
from proxy.store.records import EventRow, FanOut

_R4_ENTITY_TYPES = {0: "|2|XrequestId|", 1: "|1|2|XrequestId|"}
"""``EventRow.entity_types`` of R4 events naming no patient or one: the patient's, the
resource's or query's, then the X-Request-Id's."""

_TYPE_CODE: str = TYPE_REST["code"]
"""``EventRow.type_code`` of every event the builder makes (``AuditEvent.type``)."""


def joined(values: Iterable[str]) -> str:
    """``|a|b|``: searchable with ``LIKE '%|a|%'``."""
    text = "|".join(values)
    return f"|{text}|" if text else "|"


def recorded_ts(recorded: datetime) -> float:
    """``recorded`` as the store orders by it: the POSIX time of the millisecond written
    in the event (naive times are UTC)."""
    if recorded.tzinfo is None:
        recorded = recorded.replace(tzinfo=UTC)
    # Whole milliseconds since the epoch, divided: the float nearest to that millisecond,
    # as ``timestamp()`` of the time cut to it gives.
    return ((recorded - _EPOCH) // _MILLISECOND) / 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


# --- terms ---------------------------------------------------------------------------------


def entity_terms(entity: Mapping[str, Any], r5: bool) -> list[str]:
    """The search terms of one entity that is not a patient's (see ``EventRow.terms``)."""
    reference = (entity.get("what") or {}).get("reference")
    if reference:
        # Unversioned: ``Observation/1`` finds the event about its version 2.
        unversioned = f"e:{reference.split('/_history/')[0]}"
        if "/" not in reference:
            return [unversioned]
        return [unversioned, f"r:{_resource_type(reference)}"]
    if not r5 and entity.get("query") and entity.get("description"):
        # R5 has no entity.description.
        return [f"r:{str(entity['description']).split('?')[0].split('/')[0]}"]
    return []


def _resource_type(reference: str) -> str:
    """``Observation`` from ``Observation/1``, ``Observation/1/_history/2`` or an
    absolute URL ending in either."""
    parts = reference.split("/")
    at = parts.index("_history") if "_history" in parts else len(parts)
    return parts[max(at - 2, 0)]


def agent_terms(agents: Iterable[Mapping[str, Any]], r5: bool) -> list[str]:
    """The search terms naming the agents, each once, the FHIR server excepted (it is on
    every event): ids, names and network addresses."""
    terms: list[str] = []
    for agent in agents:
        network = agent.get("network") or {}
        if not agent["requestor"] and network.get("type") == "5":
            continue
        who = agent["who"]
        for value in (
            (who.get("identifier") or {}).get("value"),
            who.get("reference"),
            who.get("display"),
            None if r5 else agent.get("name"),  # R5 agents have no name
            network.get("address"),
        ):
            if value:
                terms.append(f"a:{value}")
    return list(dict.fromkeys(terms))


def terms_tail(agent_terms: list[str]) -> str:
    """``agent_terms`` as the end of a JSON list that entity terms began: ``,"a:x"]``."""
    tail = orjson.dumps(agent_terms).decode()[1:]
    return f",{tail}" if agent_terms else tail


class EventColumns:
    """The index columns the events of one audited interaction share, and the row of
    each of them (see ``EventRow``)."""

    __slots__ = (
        "_action",
        "_agent_terms",
        "_marks",
        "_outcome",
        "_r5",
        "_recorded",
        "_recorded_ts",
        "_request_id",
        "_subtypes",
        "_terms_tail",
        "_user_id",
        "_who",
    )

    def __init__(
        self,
        recorded: str,
        recorded_at: datetime,
        action: str,
        outcome: str,
        subtypes: str,
        user_id: str | None,
        agent_terms: list[str],
        agent_terms_tail: str,
        request_id: str,
        r5: bool,
        tags: tuple[dict[str, str], ...],
        status: int | None,
        who: str,
    ) -> None:
        """``recorded`` as written in the events (``recorded_at``); ``subtypes`` joined
        (:func:`joined`); ``agent_terms`` each once, ``agent_terms_tail`` as
        :func:`terms_tail` writes them; ``tags`` and ``status`` decide the marks; ``who``
        who acted, as the row keeps it (``EventRow.who``)."""
        self._recorded = recorded
        self._recorded_ts = recorded_ts(recorded_at)
        self._action = action
        self._outcome = outcome
        # R5's AuditEvent.code is the event type when there is no subtype.
        self._subtypes = joined([_TYPE_CODE]) if r5 and subtypes == "|" else subtypes
        self._user_id = user_id
        self._agent_terms = agent_terms
        self._terms_tail = agent_terms_tail
        self._request_id = request_id
        self._who = who
        self._r5 = r5
        self._marks = (
            [m.term for m in marks_for(tags=tags, purposes=(), status=status)]
            if tags or status in DENIED_STATUSES
            else []  # the common event: none can apply
        )
        """The admin-access and denied marks, which go with the entities' terms."""

    def main_terms(self, main: Mapping[str, Any]) -> list[str]:
        """The terms of an event's entities but its patients' (``main`` and the
        X-Request-Id's, which has none), then its marks."""
        return entity_terms(main, self._r5) + self._marks

    def terms(self, patients: tuple[str, ...], main_terms: list[str]) -> str:
        """``EventRow.terms``: the patients' entities, then the other entities'
        (``main_terms``), then the patients again as written, then the agents' (each
        term once, in that order; an agent's term is never an entity's)."""
        terms = [f"e:{p.split('/_history/')[0]}" for p in patients]
        terms += main_terms
        terms += [f"e:{p}" for p in patients]
        if not terms:
            return f"[{self._terms_tail[1:]}" if self._agent_terms else "[]"
        return orjson.dumps(list(dict.fromkeys(terms))).decode()[:-1] + self._terms_tail

    def row(self, event_id: str, patients: tuple[str, ...], body: bytes, terms: str) -> EventRow:
        """The row of the event ``event_id`` naming ``patients``, its JSON ``body``."""
        recorded_ts = self._recorded_ts
        return EventRow(
            event_id=event_id,
            recorded=self._recorded,
            recorded_ts=recorded_ts,
            action=self._action,
            outcome=self._outcome,
            subtypes=self._subtypes,
            patients=f"|{patients[0]}|" if len(patients) == 1 else joined(dict.fromkeys(patients)),
            user_id=self._user_id,
            body=body,
            terms=terms,
            type_code=_TYPE_CODE,
            entity_types=(
                "|"
                if self._r5
                else _R4_ENTITY_TYPES.get(len(patients))
                or joined([*("1" for _ in patients), "2", "XrequestId"])
            ),
            request_id=self._request_id,
            updated_ts=recorded_ts,
            who=self._who,
        )

    def shared(self) -> EventRow:
        """The columns the R4 events of a :class:`FanOut` share (one patient each); its
        ``event_id``, ``patients``, ``body`` and ``terms`` are the fan-out's to give."""
        return EventRow(
            event_id="",
            recorded=self._recorded,
            recorded_ts=self._recorded_ts,
            action=self._action,
            outcome=self._outcome,
            subtypes=self._subtypes,
            patients="",
            user_id=self._user_id,
            body=b"",
            terms="",
            type_code=_TYPE_CODE,
            entity_types=_R4_ENTITY_TYPES[1],
            request_id=self._request_id,
            updated_ts=self._recorded_ts,
            who=self._who,
        )


# --- what the builder hands over -------------------------------------------------------


class BuiltEvent(NamedTuple):
    """One AuditEvent, as the row the store writes for it."""

    row: EventRow
    """The columns the store indexes, made from what the builder knows, and the event as
    JSON: equal to what :func:`proxy.store.index.event_row` reads back out of it."""
    entry: EntryTemplate | None = None
    """How the store's writer joins its entry in the shard's Merkle log, as the encoding
    made it (:mod:`proxy.audit.encoding`), or None: the writer makes it from the JSON."""

    @property
    def event(self) -> dict[str, Any]:
        """The AuditEvent (R4, or R5 when configured), parsed from its JSON: a new dict
        at each call."""
        event: dict[str, Any] = orjson.loads(self.row.body)
        return event

    @property
    def outcome(self) -> str | None:
        return self.row.outcome


class FannedEvent(NamedTuple):
    """One of the events of a :class:`FanOut`: its row and its event are made when asked
    for (the store gets the fan-out whole, see :func:`store_rows`)."""

    fan: FanOut
    position: int
    entry: EntryTemplate | None = None
    """As :attr:`BuiltEvent.entry` (the fan-out's events share it)."""

    @property
    def row(self) -> EventRow:
        return self.fan.row(self.position)

    @property
    def event(self) -> dict[str, Any]:
        """The AuditEvent, parsed from its JSON: a new dict at each call."""
        event: dict[str, Any] = orjson.loads(self.row.body)
        return event

    @property
    def outcome(self) -> str | None:
        return self.fan.columns.outcome


Built = BuiltEvent | FannedEvent
"""An event as the builder hands it over."""


def _row_firsts(built: Iterable[Built]) -> list[Built]:
    """The first event of each row the store writes for ``built``: each event, and a
    fan-out's first (its events are one row)."""
    out: list[Built] = []
    last: FanOut | None = None
    for item in built:
        if type(item) is FannedEvent:
            if item.fan is last:
                continue
            last = item.fan
        out.append(item)
    return out


def store_entries(built: Iterable[Built]) -> list[EntryTemplate | None] | None:
    """How the store's writer joins the log entries of the rows :func:`store_rows` makes
    of ``built`` (one template per row, a fan-out's for all its events), given to the
    store beside them; None for a row, or for all, leaves the writer to make the entries
    from the events' JSON."""
    out = [item.entry for item in _row_firsts(built)]
    return out if any(t is not None for t in out) else None


def store_rows(built: Iterable[Built]) -> list[EventRow | FanOut]:
    """What the store is given for ``built``: each event's row, and each fan-out once."""
    return [item.fan if type(item) is FannedEvent else item.row for item in _row_firsts(built)]
