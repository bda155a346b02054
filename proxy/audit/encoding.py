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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from proxy.audit.r5 import to_r5
from proxy.audit.vocabulary import PERSON, PROFILE_BASE, ROLE_PATIENT, TYPE_REST


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


class EventEncoding(Protocol):
    """Writes the events of one audited interaction."""

    def body(
        self,
        event_id: str,
        patients: tuple[str, ...],
        main: Mapping[str, Any],
        profile: str | None,
    ) -> bytes:
        """The JSON of the event ``event_id``: its entities are those naming
        ``patients``, then ``main``, then the X-Request-Id's; ``profile`` is the BALP
        profile it claims, if any."""
        ...


class PartsEncoding:
    """R4 events without tags, joined from parts serialized once (see the module)."""

    __slots__ = ("_transaction", "head")

    def __init__(
        self,
        start: bytes,
        moment: Mapping[str, Any],
        agents_json: bytes,
        source_json: bytes,
        transaction: Mapping[str, Any],
    ) -> None:
        """``start``: an event's JSON up to its ``period``; ``moment``: its ``period``,
        ``recorded``, ``outcome`` and ``outcomeDesc``; then its agents and source as
        JSON, and the X-Request-Id entity."""
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

    def body(
        self,
        event_id: str,
        patients: tuple[str, ...],
        main: Mapping[str, Any],
        profile: str | None,
    ) -> bytes:
        parts = [self.head, event_id.encode(), b'","entity":[']
        for p in patients:
            parts += (_BEFORE_REFERENCE, orjson.dumps(p), _PATIENT_ENTITY_SUFFIX)
        parts.append(orjson.dumps([main, self._transaction])[1:])
        parts.append(_end(profile))
        return b"".join(parts)

    def fan_tail(self, main: Mapping[str, Any], profile: str | None) -> bytes:
        """What follows a fanned event's patient reference: the rest of its JSON."""
        return _PATIENT_ENTITY_SUFFIX + orjson.dumps([main, self._transaction])[1:] + _end(profile)


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

    def body(
        self,
        event_id: str,
        patients: tuple[str, ...],
        main: Mapping[str, Any],
        profile: str | None,
    ) -> bytes:
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
        return orjson.dumps(event)
