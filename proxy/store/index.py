"""The columns the store indexes, read back out of an AuditEvent made elsewhere.

Events the proxy builds come with their row (:class:`~proxy.store.records.EventRow`) from
the builder; events that arrive from outside (the Auditbox-compatible ingest, the tests)
get it here, from the R4 or R5 JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.audit.r5 import REQUEST_ID_ROLE_TEXT
from proxy.store.marks import Mark, marks_of_event
from proxy.store.records import EventRow


def _timestamp(value: str) -> float:
    known = _last_timestamp.get(value)
    if known is not None:  # every event of an exchange has the same time
        return known
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    _last_timestamp.clear()
    _last_timestamp[value] = timestamp = parsed.timestamp()
    return timestamp


_last_timestamp: dict[str, float] = {}
"""The last ``recorded`` value parsed and its timestamp (event loop thread only)."""


def joined(values: Sequence[str]) -> str:
    """``|a|b|``: searchable with ``LIKE '%|a|%'``."""
    return "|" + "|".join(values) + "|" if values else "|"


def codes_of(value: Any) -> list[str]:
    """The codes of a Coding (R4) or a CodeableConcept (R5)."""
    if not isinstance(value, dict):
        return []
    if "code" in value:
        return [str(value["code"])]
    return [str(c["code"]) for c in value.get("coding", ()) if isinstance(c, dict) and "code" in c]


def _resource_type(reference: str) -> str:
    """``Observation`` from ``Observation/1``, ``Observation/1/_history/2`` or an
    absolute URL ending in either."""
    parts = reference.split("/")
    at = parts.index("_history") if "_history" in parts else len(parts)
    return parts[max(at - 2, 0)]


def _is_patient_role(entity: dict[str, Any]) -> bool:
    return "1" in codes_of(entity.get("role"))


def _is_request_id(entity: dict[str, Any]) -> bool:
    """The entity naming the request's X-Request-Id: by its type in R4, its role in R5."""
    return (
        "XrequestId" in codes_of(entity.get("type"))
        or (entity.get("role") or {}).get("text") == REQUEST_ID_ROLE_TEXT
    )


def _is_server_agent(agent: dict[str, Any]) -> bool:
    """The FHIR server the proxy records for: on every proxied event, so not worth an
    index entry each."""
    network = agent.get("network") or {}
    return not agent.get("requestor") and (network.get("type") == "5" or "networkUri" in agent)


def requestor_id(agent: dict[str, Any]) -> str | None:
    """The id the store keeps for a requestor agent (``EventRow.user_id``)."""
    who = agent.get("who") or {}
    user: str | None = (
        who.get("identifier", {}).get("value")
        or who.get("reference")
        or who.get("display")
        or agent.get("altId")
    )
    return user


def user_of(event: dict[str, Any]) -> str | None:
    """``EventRow.user_id`` of an R4 or R5 AuditEvent: its first requestor's id."""
    requestor = next((a for a in event.get("agent", ()) if a.get("requestor")), None)
    return requestor_id(requestor) if requestor is not None else None


def outcome_code_of(event: Mapping[str, Any]) -> str | None:
    """``EventRow.outcome``: the outcome code of an R4 (``outcome``) or R5
    (``outcome.code.code``) AuditEvent."""
    outcome = event.get("outcome")
    if isinstance(outcome, dict):  # R5
        outcome = (outcome.get("code") or {}).get("code")
    return str(outcome) if outcome is not None else None


def subtype_codes(event: Mapping[str, Any]) -> list[str]:
    """``EventRow.subtypes``: the codes of ``subtype`` (R4) or ``code.coding`` (R5)."""
    codings = event.get("subtype")
    if codings is None:  # R5: code.coding
        codings = (event.get("code") or {}).get("coding", ())
    return [str(c["code"]) for c in codings if isinstance(c, dict) and "code" in c]


APPLICATION_AGENT = "110150"
"""DICOM's Application: the OAuth client agent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Who:
    """Who acted in an event, as the privacy reports list it: what they show of the
    requestor and where the request came from (``EventRow.who`` keeps it, so that a
    report's summary reads no event's JSON)."""

    name: str
    """The requestor's name (``who.display``, else ``name``)."""
    roles: tuple[str, ...]
    """The requestor's roles: each one's text, else its first code."""
    client: str
    """The OAuth client's id: the identifier of an Application agent (110150) that is no
    requestor."""
    address: str
    """The network address of the first agent with a client's (type 2) address."""

    def column(self) -> str:
        """The form ``EventRow.who`` holds: a JSON array of the four, in their order."""
        return orjson.dumps([self.name, self.roles, self.client, self.address]).decode()

    @classmethod
    def of_column(cls, text: str) -> Who:
        """The ``Who`` that :meth:`column` wrote as ``text``."""
        name, roles, client, address = orjson.loads(text)
        return cls(name=name, roles=tuple(roles), client=client, address=address)


def who_of(agents: Sequence[Any]) -> Who:
    """Who acted, read from an event's agents (R4 or R5)."""
    agents = [a for a in agents if isinstance(a, dict)]
    requestor: dict[str, Any] = next((a for a in agents if a.get("requestor")), {})
    who = requestor.get("who") or {}
    client = next(
        (
            a["who"]["identifier"].get("value", "")
            for a in agents
            if not a.get("requestor")
            and APPLICATION_AGENT in codes_of(a.get("type"))
            and isinstance((a.get("who") or {}).get("identifier"), dict)
        ),
        "",
    )
    address = next(
        (
            (a.get("network") or {}).get("address") or a.get("networkString")
            for a in agents
            if (a.get("network") or {}).get("type") == "2" or a.get("networkString")
        ),
        "",
    )
    return Who(
        name=str(who.get("display") or requestor.get("name") or ""),
        roles=tuple(
            str(r.get("text") or next(iter(codes_of(r)), ""))
            for r in requestor.get("role", ())
            if isinstance(r, dict)
        ),
        client=str(client),
        address=str(address),
    )


def patients_of(event: dict[str, Any]) -> list[str]:
    """The patients an R4 or R5 AuditEvent names (``EventRow.patients``), in order."""
    patients: list[str] = []
    r5_patient = event.get("patient")
    if isinstance(r5_patient, dict) and r5_patient.get("reference"):
        patients.append(str(r5_patient["reference"]))
    for entity in event.get("entity", ()):
        reference = (entity.get("what") or {}).get("reference")
        if reference and _is_patient_role(entity) and reference not in patients:
            patients.append(str(reference))
    return patients


def event_row(event: dict[str, Any]) -> EventRow:
    """The columns the queue indexes, read from an R4 or R5 AuditEvent, and the body as
    JSON (the writer process compresses it). Runs on the event loop for every event, so it
    reads only what it indexes.

    ``terms`` (a JSON array) lists the event's searchable values, each with its kind as a
    prefix: ``e:`` entity reference (a patient is an entity referencing a Patient, as
    FHIR's ``patient`` search parameter defines it), ``r:`` resource type, ``a:`` any
    agent's id, name or network address, ``k:`` a mark (proxy/store/marks.py). A trigger
    copies them into the ``event_terms`` index (proxy/store/schema.py). Every term is an
    index entry written with the event, so there are as few kinds as the searches need."""
    recorded = str(event.get("recorded", ""))
    recorded_ts = _timestamp(recorded)
    subtypes = subtype_codes(event)
    terms: dict[str, None] = {}
    patients: list[str] = []
    r5_patient = event.get("patient")
    if isinstance(r5_patient, dict) and r5_patient.get("reference"):
        patients.append(str(r5_patient["reference"]))
    entity_types: list[str] = []
    request_id: str | None = None
    for entity in event.get("entity", ()):
        what = entity.get("what") or {}
        reference = what.get("reference")
        entity_types.extend(codes_of(entity.get("type")))
        if reference:
            # Unversioned: ``Observation/1`` finds the event about its version 2.
            terms[f"e:{str(reference).split('/_history/')[0]}"] = None
        if _is_patient_role(entity):
            if reference and reference not in patients:
                patients.append(str(reference))
        elif reference and "/" in reference:
            terms[f"r:{_resource_type(reference)}"] = None
        elif entity.get("query") and entity.get("description"):
            terms[f"r:{str(entity['description']).split('?')[0].split('/')[0]}"] = None
        if _is_request_id(entity):
            request_id = what.get("identifier", {}).get("value")
    marks = marks_of_event(event)
    for mark in marks:
        if mark is not Mark.BREAK_GLASS:
            terms[mark.term] = None
    for patient in patients:  # R5's AuditEvent.patient is not an entity
        terms[f"e:{patient}"] = None
    user: str | None = None
    for agent in event.get("agent", ()):
        who = agent.get("who") or {}
        if agent.get("requestor") and user is None:
            user = requestor_id(agent)
        if _is_server_agent(agent):
            continue
        address = (agent.get("network") or {}).get("address") or agent.get("networkString")
        for value in (
            who.get("identifier", {}).get("value"),
            who.get("reference"),
            who.get("display"),
            agent.get("altId"),
            agent.get("name"),
            address,
        ):
            if value:
                terms[f"a:{value}"] = None
    if Mark.BREAK_GLASS in marks:  # the agents' mark, after their terms (as the builder)
        terms[Mark.BREAK_GLASS.term] = None
    event_type = event.get("type")
    if event_type is None:  # R5: category
        event_type = next(iter(event.get("category", ())), None)
    type_code = next(iter(codes_of(event_type)), None)
    updated = (event.get("meta") or {}).get("lastUpdated")
    return EventRow(
        event_id=str(event["id"]),
        recorded=recorded,
        recorded_ts=recorded_ts,
        action=event.get("action"),
        outcome=outcome_code_of(event),
        subtypes=joined(subtypes),
        patients=joined(patients),
        user_id=user,
        body=orjson.dumps(event),
        terms=orjson.dumps(list(terms)).decode(),
        type_code=type_code,
        entity_types=joined(entity_types),
        request_id=str(request_id) if request_id is not None else None,
        updated_ts=_timestamp(str(updated)) if updated else recorded_ts,
        who=who_of(event.get("agent", ())).column(),
    )
