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

Each also gives each event's leaf hash in the shard's Merkle log (:mod:`proxy.log`), so
that the store's writer, one process for the whole proxy, need not parse each event again
to make its entry (the RFC 8785 JSON of the event without ``meta``,
:func:`proxy.log.entry.entry_of`). :class:`EntryParts` joins the entries of R4 events from
parts as their JSON is joined; an R5 or tagged event's entry is its dict serialized with
sorted keys. Either holds only where orjson's sorted output is the RFC 8785 form
(:func:`~proxy.log.entry.sorted_json_is_canonical`: no number in it, and every key ASCII,
as every key the builder writes is an element name); elsewhere the leaf is None and the
writer makes it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import orjson

from proxy.audit.r5 import to_r5
from proxy.audit.vocabulary import PERSON, PROFILE_BASE, ROLE_PATIENT, TYPE_REST
from proxy.log.entry import sorted_json_is_canonical
from proxy.store.records import member_id


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
_LEAF_PREFIX = b"\x00"
"""RFC 6962: a leaf hash is SHA-256 of this byte and the entry (proxy.log.tree)."""
_SORTED_BEFORE_REFERENCE, _SORTED_AFTER_REFERENCE = orjson.dumps(
    patient_entity("%s"), option=_SORTED
).split(b'"%s"')


class Encoded(NamedTuple):
    """One event as an encoding writes it."""

    body: bytes
    """Its JSON."""
    leaf: bytes | None
    """Its leaf hash in the log, or None when the writer is to make it."""


def entry_head(action: str, agents: list[dict[str, Any]]) -> Any | None:
    """SHA-256 fed an R4 event's leaf prefix and its log entry up to its entities' ``[``
    (``{"action":…,"agent":[…],"entity":[``): the same for every event of one client's
    requests of one kind, made once with its agents; None when orjson's sorted output of
    the agents is not their RFC 8785 form."""
    agents_json = orjson.dumps(agents, option=_SORTED)
    if not sorted_json_is_canonical(agents_json):
        return None
    return hashlib.sha256(
        _LEAF_PREFIX
        + b'{"action":'
        + orjson.dumps(action)
        + b',"agent":'
        + agents_json
        + b',"entity":['
    )


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
    """What the log entries of one interaction's R4 events share, in RFC 8785 form (keys
    sorted): the head (``action``, ``agent``: :func:`entry_head`, hashed once per
    client), the entities after the patients' (the main entity's and the X-Request-Id's,
    serialized once per main entity), and after ``id`` the moment's members
    (``outcome``, ``outcomeDesc``, ``period``, ``recorded``) and :func:`entry_end`. An
    entry is joined from them as the event's JSON is joined from its parts; a member
    added to R4 events must be placed here too (the builder's tests compare every leaf
    with :func:`proxy.log.entry.entry_of` of its event)."""

    __slots__ = ("_after", "_head", "_main", "_main_tail", "_transaction")

    def __init__(self, head: Any, after: bytes, transaction: Mapping[str, Any]) -> None:
        self._head = head
        """:func:`entry_head`."""
        self._after = after
        """From the end of the id's value to the end."""
        self._transaction = transaction
        self._main: Mapping[str, Any] | None = None
        self._main_tail: bytes | None = None

    @classmethod
    def of(
        cls,
        head: Any | None,
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

    def _tail(self, main: Mapping[str, Any]) -> bytes | None:
        """The entities after the patients' (``main`` then the X-Request-Id's) and the
        list's end, in RFC 8785 form, or None."""
        if main is not self._main:
            tail = orjson.dumps([main, self._transaction], option=_SORTED)[1:]
            self._main = main
            self._main_tail = tail if sorted_json_is_canonical(tail) else None
        return self._main_tail

    def _leaf(self, tail: bytes, event_id: str, patients: tuple[str, ...]) -> bytes:
        parts: list[bytes] = []
        for p in patients:
            parts += (_SORTED_BEFORE_REFERENCE, orjson.dumps(p), _SORTED_AFTER_REFERENCE, b",")
        parts += (tail, b',"id":', orjson.dumps(event_id), self._after)
        h = self._head.copy()
        h.update(b"".join(parts))
        digest: bytes = h.digest()
        return digest

    def leaf(
        self, event_id: str, patients: tuple[str, ...], main: Mapping[str, Any]
    ) -> bytes | None:
        """The leaf hash of the event ``event_id`` naming ``patients``, or None."""
        tail = self._tail(main)
        return None if tail is None else self._leaf(tail, event_id, patients)

    def fan_leaves(
        self, first_id: str, patients: tuple[str, ...], main: Mapping[str, Any]
    ) -> bytes | None:
        """The leaf hashes of a fan-out's events (one patient each, their ids numbered
        from ``first_id``), one after the other, or None."""
        tail = self._tail(main)
        if tail is None:
            return None
        return b"".join(
            self._leaf(tail, member_id(first_id, i), (p,)) for i, p in enumerate(patients)
        )


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
        entries = self._entries
        leaf = None if entries is None else entries.leaf(event_id, patients, main)
        return Encoded(b"".join(parts), leaf)

    def fan_tail(self, main: Mapping[str, Any], profile: str | None) -> bytes:
        """What follows a fanned event's patient reference: the rest of its JSON."""
        return _PATIENT_ENTITY_SUFFIX + orjson.dumps([main, self._transaction])[1:] + _end(profile)

    def fan_leaves(
        self, first_id: str, patients: tuple[str, ...], main: Mapping[str, Any]
    ) -> bytes | None:
        """The leaf hashes of a fan-out's events, one after the other, or None."""
        entries = self._entries
        return None if entries is None else entries.fan_leaves(first_id, patients, main)


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
        self._base = shared_members(subtypes, action, moment, agents, source)
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
        entry = orjson.dumps({k: v for k, v in event.items() if k != "meta"}, option=_SORTED)
        leaf = (
            hashlib.sha256(_LEAF_PREFIX + entry).digest()
            if sorted_json_is_canonical(entry)
            else None
        )
        return Encoded(orjson.dumps(event), leaf)


def shared_members(
    subtypes: list[dict[str, str]],
    action: str,
    moment: Mapping[str, Any],
    agents: list[dict[str, Any]],
    source: Mapping[str, Any],
) -> dict[str, Any]:
    """The members of an R4 event other than ``id``, ``entity`` and ``meta``, in their
    order in its JSON."""
    base: dict[str, Any] = {"resourceType": "AuditEvent", "type": TYPE_REST}
    if subtypes:
        base["subtype"] = subtypes
    base["action"] = action
    base.update(moment)
    base["agent"] = agents
    base["source"] = source
    return base
