"""How an AuditEvent is written as JSON: the builder says what the events of one audited
interaction say (:mod:`proxy.audit.balp`), an encoding writes each of them, with its id,
its patients, its main entity and the profile it claims.

- :class:`PartsEncoding`, for R4 events without tags: the parts the events share (the
  start, the moment, the agents, the source, the X-Request-Id entity) are serialized once
  and each event's JSON is joined from them; the bytes are those ``orjson.dumps`` gives
  for the event as a dict, keys in the same order. Events that differ only in their
  patient can go to the store as one :class:`~proxy.store.records.FanOut`.
- :class:`DictEncoding`, for R5 events and events with tags: each event is made as a
  dict, converted or tagged, then serialized.

Neither changes what it is given: the fragments are shared between events.

:class:`PartsEncoding` also gives its events' entries in the shard's Merkle log (the RFC
8785 JSON of the event without ``meta``, :func:`proxy.log.entry.entry_of`) as parts in
that form, made once per interaction (:class:`EntryParts`), which the store's writer joins
and hashes: it need not parse each event again, and the proxy's event loop, busiest of
the proxy's processes, does not hash. They hold only where orjson's sorted output is the
RFC 8785 form (:func:`~proxy.log.entry.sorted_json_is_canonical`: no number in it, and
every key ASCII, as every key the builder writes is an element name); elsewhere, and for
R5 or tagged events, the writer makes the entry from the event's JSON.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import orjson

from proxy.audit.r5 import to_r5
from proxy.audit.vocabulary import PERSON, PROFILE_BASE, ROLE_PATIENT, TYPE_REST
from proxy.log.entry import EntryTemplate, sorted_json_is_canonical


def patient_entity(reference: str) -> dict[str, Any]:
    """The entity naming a patient (BALP's ``patient`` slice)."""
    return {"type": PERSON, "role": ROLE_PATIENT, "what": {"reference": reference}}


@functools.cache
def profile_meta(name: str) -> dict[str, Any]:
    """``meta`` claiming a BALP profile: one dict per profile, shared by its events."""
    return {"profile": [PROFILE_BASE + name]}


@functools.cache
def _profile_meta_json(name: str) -> bytes:
    """The end of an event's JSON whose last key is ``meta`` claiming that profile."""
    return b',"meta":' + orjson.dumps(profile_meta(name)) + b"}"


def _end(profile: str | None) -> bytes:
    return _profile_meta_json(profile) if profile is not None else b"}"


_BEFORE_REFERENCE, _AFTER_REFERENCE = orjson.dumps(patient_entity("%s")).split(b'"%s"')
PATIENT_ENTITY_PREFIX = b'","entity":[' + _BEFORE_REFERENCE
"""What comes between a fanned event's id and its patient's reference (as JSON)."""
_PATIENT_ENTITY_SUFFIX = _AFTER_REFERENCE + b","
"""What comes after a patient's reference (as JSON), up to the next entity."""


_SORTED = orjson.OPT_SORT_KEYS
_SORTED_BEFORE_REFERENCE, _SORTED_AFTER_REFERENCE = orjson.dumps(
    patient_entity("%s"), option=_SORTED
).split(b'"%s"')


class Encoded(NamedTuple):
    """One event as an encoding writes it."""

    body: bytes
    """Its JSON."""
    entry: EntryTemplate | None
    """How the store's writer joins its log entry, or None: the writer makes the entry
    from the JSON."""


def entry_head(action: str, agents: list[dict[str, Any]]) -> bytes | None:
    """An R4 event's log entry up to its entities' ``[`` (``{"action":…,"agent":[…],
    "entity":[``): the same for every event of one client's requests of one kind, made
    once with its agents; None when orjson's sorted output of the agents is not their
    RFC 8785 form."""
    agents_json = orjson.dumps(agents, option=_SORTED)
    if not sorted_json_is_canonical(agents_json):
        return None
    return b'{"action":' + orjson.dumps(action) + b',"agent":' + agents_json + b',"entity":['


@functools.lru_cache(maxsize=256)  # bounded: operation names come from clients
def entry_end(start: bytes, source_json: bytes) -> bytes | None:
    """The end of the log entries of R4 events whose JSON begins with ``start`` (up to
    ``action`` and its value) and whose source is ``source_json``: the members that sort
    after the moment's, ``"resourceType":…,"source":…,"subtype":…,"type":…}``; None when
    not in RFC 8785 form."""
    fields = orjson.loads(start[:-1] + b"}")
    del fields["action"]
    fields["source"] = orjson.loads(source_json)
    text = orjson.dumps(fields, option=_SORTED)
    return text[1:] if sorted_json_is_canonical(text) else None


class EntryParts:
    """The parts of the log entries of one interaction's R4 events
    (:class:`~proxy.log.entry.EntryTemplate`), in RFC 8785 form (keys sorted): the head
    (``action``, ``agent``: :func:`entry_head`, made once per client), the entities
    after the patients' (the main entity's and the X-Request-Id's, serialized once per
    main entity), and after ``id`` the moment's members (``outcome``, ``outcomeDesc``,
    ``period``, ``recorded``) and :func:`entry_end`. A member added to R4 events must be
    placed here too: the builder's tests compare every entry with
    :func:`proxy.log.entry.entry_of` of its event."""

    __slots__ = ("_after", "_head", "_main", "_template", "_transaction")

    def __init__(self, head: bytes, after: bytes, transaction: Mapping[str, Any]) -> None:
        self._head = head
        self._after = after
        """From the end of the id's value to the end."""
        self._transaction = transaction
        self._main: Mapping[str, Any] | None = None
        self._template: EntryTemplate | None = None

    @classmethod
    def of(
        cls,
        head: bytes | None,
        moment: Mapping[str, Any],
        end: bytes | None,
        transaction: Mapping[str, Any],
    ) -> EntryParts | None:
        """The parts of events with this :func:`entry_head`, moment, :func:`entry_end`
        and X-Request-Id entity; None when one of them is not in RFC 8785 form."""
        if head is None or end is None:
            return None
        members = orjson.dumps(moment, option=_SORTED)
        if not sorted_json_is_canonical(members):
            return None
        return cls(head, b"," + members[1:-1] + b"," + end, transaction)

    def template(self, main: Mapping[str, Any]) -> EntryTemplate | None:
        """The entries of the events whose entities after the patients' are ``main``'s
        and the X-Request-Id's (one template, and one object, per main entity), or None."""
        if main is not self._main:
            tail = orjson.dumps([main, self._transaction], option=_SORTED)[1:]
            self._main = main
            self._template = (
                EntryTemplate(
                    head=self._head,
                    patient_before=_SORTED_BEFORE_REFERENCE,
                    patient_after=_SORTED_AFTER_REFERENCE,
                    tail=tail + b',"id":',
                    after=self._after,
                )
                if sorted_json_is_canonical(tail)
                else None
            )
        return self._template


def _plain_patients(patients: tuple[str, ...]) -> bool:
    """Whether the store's row lists ``patients`` as they are, so that the writer can
    name them in an event's entry: each once, none holding the row's separator."""
    return all("|" not in p for p in patients) and len(set(patients)) == len(patients)


class EventEncoding(Protocol):
    """Writes the events of one audited interaction."""

    def event(
        self,
        event_id: str,
        patients: tuple[str, ...],
        main: Mapping[str, Any],
        profile: str | None,
    ) -> Encoded:
        """The event ``event_id``: its entities are those naming ``patients``, then
        ``main``, then the X-Request-Id's; ``profile`` is the BALP profile it claims, if
        any."""
        ...


class PartsEncoding:
    """R4 events without tags, joined from parts serialized once (see the module)."""

    __slots__ = ("_entries", "_transaction", "head")

    def __init__(
        self,
        start: bytes,
        moment: Mapping[str, Any],
        agents_json: bytes,
        source_json: bytes,
        transaction: Mapping[str, Any],
        entries: EntryParts | None,
    ) -> None:
        """``start``: an event's JSON up to its ``period``; ``moment``: its ``period``,
        ``recorded``, ``outcome`` and ``outcomeDesc``; then its agents and source as
        JSON, the X-Request-Id entity, and the parts of the events' log entries (None:
        the writer makes their leaves)."""
        self.head = b"".join(
            (
                start,
                orjson.dumps(moment)[1:-1],
                b',"agent":',
                agents_json,
                b',"source":',
                source_json,
                b',"id":"',
            )
        )
        """Every event's JSON up to its id."""
        self._transaction = transaction
        self._entries = entries

    def event(
        self,
        event_id: str,
        patients: tuple[str, ...],
        main: Mapping[str, Any],
        profile: str | None,
    ) -> Encoded:
        parts = [self.head, event_id.encode(), b'","entity":[']
        for p in patients:
            parts += (_BEFORE_REFERENCE, orjson.dumps(p), _PATIENT_ENTITY_SUFFIX)
        parts.append(orjson.dumps([main, self._transaction])[1:])
        parts.append(_end(profile))
        return Encoded(b"".join(parts), self.entry(patients, main))

    def fan_tail(self, main: Mapping[str, Any], profile: str | None) -> bytes:
        """What follows a fanned event's patient reference: the rest of its JSON."""
        return _PATIENT_ENTITY_SUFFIX + orjson.dumps([main, self._transaction])[1:] + _end(profile)

    def entry(self, patients: tuple[str, ...], main: Mapping[str, Any]) -> EntryTemplate | None:
        """How the writer joins the entries of events naming ``patients`` (an event, or a
        fan-out's events, one patient each) with ``main``, or None."""
        entries = self._entries
        if entries is None or not _plain_patients(patients):
            return None
        return entries.template(main)


class DictEncoding:
    """R5 events, or events with tags, each made as a dict first (see the module)."""

    __slots__ = ("_base", "_r5", "_tags", "_transaction")

    def __init__(
        self,
        *,
        subtypes: list[dict[str, str]],
        action: str,
        moment: Mapping[str, Any],
        agents: list[dict[str, Any]],
        source: Mapping[str, Any],
        transaction: Mapping[str, Any],
        r5: bool,
        tags: tuple[dict[str, str], ...],
    ) -> None:
        base: dict[str, Any] = {"resourceType": "AuditEvent", "type": TYPE_REST}
        if subtypes:
            base["subtype"] = subtypes
        base["action"] = action
        base.update(moment)
        base["agent"] = agents
        base["source"] = source
        self._base = base
        self._transaction = transaction
        self._r5 = r5
        self._tags = tags

    def event(
        self,
        event_id: str,
        patients: tuple[str, ...],
        main: Mapping[str, Any],
        profile: str | None,
    ) -> Encoded:
        event = dict(self._base)
        event["id"] = event_id
        entities: list[Mapping[str, Any]] = [patient_entity(p) for p in patients]
        entities.append(main)
        entities.append(self._transaction)
        event["entity"] = entities
        if profile is not None:
            event["meta"] = profile_meta(profile)
        if self._r5:
            event = to_r5(event)
        if self._tags:
            meta = event.get("meta") or {}
            event["meta"] = {**meta, "tag": [*meta.get("tag", ()), *self._tags]}
        # The writer makes the entry: an R5 event's members are not an R4 event's.
        return Encoded(orjson.dumps(event), None)
