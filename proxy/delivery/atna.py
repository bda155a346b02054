"""A BALP AuditEvent as the DICOM audit message ATNA repositories parse (DICOM PS3.15
A.5, MSGID ``IHE+RFC-3881``), by the DICOM mapping the FHIR AuditEvent resource gives
for each element. Pure: a dict in, XML bytes out.

What maps (R4 names; R5's are read where they differ):

- ``type`` (R5 ``category``) -> ``EventID``; ``subtype`` (R5 ``code``) -> ``EventTypeCode``;
  ``action`` -> ``EventActionCode``; ``period.start``, else ``recorded`` (R5
  ``occurredDateTime``) -> ``EventDateTime``; ``outcome`` (R5 ``outcome.code``) ->
  ``EventOutcomeIndicator``; ``outcomeDesc`` -> ``EventOutcomeDescription``.
- each ``agent`` -> ``ActiveParticipant``: ``who`` (identifier, else reference, else
  display) -> ``UserID``, ``altId``, ``name``, ``requestor``, ``network`` address and type,
  ``type`` and ``role`` codings -> ``RoleIDCode``, ``media`` -> ``MediaType``.
- ``source`` -> ``AuditSourceIdentification``: ``observer`` -> ``AuditSourceID``,
  ``site`` -> ``AuditEnterpriseSiteID``, the first ``type`` code -> ``code``.
- each ``entity`` (and R5's ``patient``) -> ``ParticipantObjectIdentification``: ``what``
  -> ``ParticipantObjectID`` with the resource type (or the identifier's type) as
  ``ParticipantObjectIDTypeCode``, ``type`` (codes 1-4), ``role``, ``lifecycle``,
  ``name`` (else the reference) -> ``ParticipantObjectName``, or ``query`` ->
  ``ParticipantObjectQuery``, ``description``, ``detail`` (value base64) ->
  ``ParticipantObjectDetail``.

What does not map, and is left out: ``id``, ``meta`` (the BALP profile), extensions (the
token's claims beyond ``altId``, the event's place in the Merkle log: the schema has no
element for it, and RFC 5424 structured data would need a registered enterprise number),
``purposeOfEvent`` and ``agent.purposeOfUse`` (no element in the schema version ATNA
repositories validate against), ``agent.policy``,
``agent.location``, ``entity.securityLabel``, R5 ``authorization``, ``basedOn``,
``encounter`` and ``outcome.detail``. An entity type outside 1-4 (BALP's ``XrequestId``)
becomes the object's ``ParticipantObjectIDTypeCode`` instead of its type.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any
from xml.etree.ElementTree import Element, SubElement, tostring

RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
OUTCOMES = frozenset({"0", "4", "8", "12"})
ACTIONS = frozenset({"C", "R", "U", "D", "E"})
OBJECT_TYPES = frozenset({"1", "2", "3", "4"})
OBJECT_ROLES = frozenset(str(n) for n in range(1, 25))
LIFECYCLES = frozenset(str(n) for n in range(1, 16))
NETWORK_TYPES = frozenset({"1", "2", "3", "4", "5"})


def _codings(value: Any) -> list[Mapping[str, Any]]:
    """The codings of a Coding, a CodeableConcept, or a list of either."""
    if isinstance(value, list):
        return [c for v in value for c in _codings(v)]
    if not isinstance(value, dict):
        return []
    if "coding" in value:
        return [c for c in value["coding"] if isinstance(c, dict) and c.get("code")]
    return [value] if value.get("code") else []


def _coded(parent: Element, tag: str, coding: Mapping[str, Any]) -> None:
    """A DICOM CodedValueType: code, system, and the meaning (display, else the code)."""
    code = str(coding["code"])
    attributes = {
        "csd-code": code,
        "codeSystemName": str(coding.get("system") or "urn:unknown"),
        "originalText": str(coding.get("display") or code),
    }
    if coding.get("display"):
        attributes["displayName"] = str(coding["display"])
    SubElement(parent, tag, attributes)


def _first_code(value: Any) -> str | None:
    codings = _codings(value)
    return str(codings[0]["code"]) if codings else None


def _reference_text(value: Any) -> str | None:
    """A Reference as one string: its identifier's value, else the reference, else the
    display."""
    if not isinstance(value, dict):
        return None
    identifier = value.get("identifier") or {}
    return identifier.get("value") or value.get("reference") or value.get("display")


def _event_identification(event: Mapping[str, Any]) -> Element:
    period = event.get("period") or {}
    when = period.get("start") or event.get("occurredDateTime") or event.get("recorded")
    outcome = event.get("outcome")
    if isinstance(outcome, dict):  # R5: outcome.code
        outcome = _first_code(outcome.get("code"))
    element = Element(
        "EventIdentification",
        {
            "EventDateTime": str(when),
            "EventOutcomeIndicator": str(outcome) if str(outcome) in OUTCOMES else "0",
        },
    )
    if event.get("action") in ACTIONS:
        element.set("EventActionCode", str(event["action"]))
    kind = _codings(event.get("type") or event.get("category"))
    _coded(element, "EventID", kind[0] if kind else {"code": "rest", "system": "unknown"})
    r4_subtype = event.get("subtype")
    for coding in _codings(r4_subtype if r4_subtype is not None else event.get("code")):
        _coded(element, "EventTypeCode", coding)
    if event.get("outcomeDesc"):
        SubElement(element, "EventOutcomeDescription").text = str(event["outcomeDesc"])
    return element


def _active_participant(agent: Mapping[str, Any]) -> Element:
    user = _reference_text(agent.get("who")) or agent.get("name") or "unknown"
    element = Element(
        "ActiveParticipant",
        {"UserID": str(user), "UserIsRequestor": "true" if agent.get("requestor") else "false"},
    )
    if agent.get("altId"):
        element.set("AlternativeUserID", str(agent["altId"]))
    if agent.get("name"):
        element.set("UserName", str(agent["name"]))
    network = agent.get("network") or {}
    address = network.get("address") or agent.get("networkString")
    if address:
        element.set("NetworkAccessPointID", str(address))
        if str(network.get("type")) in NETWORK_TYPES:
            element.set("NetworkAccessPointTypeCode", str(network["type"]))
    for coding in [*_codings(agent.get("type")), *_codings(agent.get("role"))]:
        _coded(element, "RoleIDCode", coding)
    media = _codings(agent.get("media"))
    if media:
        _coded(SubElement(element, "MediaIdentifier"), "MediaType", media[0])
    return element


def _audit_source(source: Mapping[str, Any]) -> Element:
    observer = _reference_text(source.get("observer")) or "fhir-audit-proxy"
    element = Element(
        "AuditSourceIdentification",
        {"AuditSourceID": str(observer), "code": _first_code(source.get("type")) or "4"},
    )
    site = source.get("site")
    site_text = _reference_text(site) if isinstance(site, dict) else site
    if site_text:
        element.set("AuditEnterpriseSiteID", str(site_text))
    return element


def _participant_object(entity: Mapping[str, Any]) -> Element | None:
    what = entity.get("what") or {}
    identifier = what.get("identifier") or {}
    reference = what.get("reference")
    object_id = reference or identifier.get("value")
    if not object_id:
        return None
    element = Element("ParticipantObjectIdentification", {"ParticipantObjectID": str(object_id)})
    for attribute, value, allowed in (
        ("ParticipantObjectTypeCode", _first_code(entity.get("type")), OBJECT_TYPES),
        ("ParticipantObjectTypeCodeRole", _first_code(entity.get("role")), OBJECT_ROLES),
        ("ParticipantObjectDataLifeCycle", _first_code(entity.get("lifecycle")), LIFECYCLES),
    ):
        if value in allowed:
            element.set(attribute, str(value))
    if reference and "/" in str(reference):
        kind = str(reference).split("/_history/")[0].split("/")[-2]
        _coded(element, "ParticipantObjectIDTypeCode", {"code": kind, "system": RESOURCE_TYPES})
    else:
        id_type = _codings(identifier.get("type")) or [
            c for c in _codings(entity.get("type")) if str(c["code"]) not in OBJECT_TYPES
        ]
        _coded(
            element,
            "ParticipantObjectIDTypeCode",
            id_type[0] if id_type else {"code": "identifier", "system": "urn:unknown"},
        )
    if entity.get("query"):
        SubElement(element, "ParticipantObjectQuery").text = str(entity["query"])
    else:
        name = entity.get("name") or what.get("display") or object_id
        SubElement(element, "ParticipantObjectName").text = str(name)
    for detail in entity.get("detail") or ():
        value = _detail_value(detail)
        if detail.get("type") and value is not None:
            attributes = {"type": str(detail["type"]), "value": value}
            SubElement(element, "ParticipantObjectDetail", attributes)
    if entity.get("description"):
        SubElement(element, "ParticipantObjectDescription").text = str(entity["description"])
    return element


def _detail_value(detail: Mapping[str, Any]) -> str | None:
    """A detail's value as base64, as DICOM's ValuePair holds it."""
    if "valueBase64Binary" in detail:
        return str(detail["valueBase64Binary"])
    if "valueString" in detail:
        return base64.b64encode(str(detail["valueString"]).encode()).decode("ascii")
    return None


def _entities(event: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    patient = event.get("patient")  # R5: the patient is no entity
    if isinstance(patient, dict) and patient.get("reference"):
        yield {
            "what": patient,
            "type": {"code": "1"},
            "role": {"code": "1"},
        }
    yield from event.get("entity") or ()


def audit_message(event: Mapping[str, Any]) -> bytes:
    """The DICOM ``AuditMessage`` for ``event``, UTF-8 XML without a declaration."""
    root = Element("AuditMessage")
    root.append(_event_identification(event))
    agents = list(event.get("agent") or ())
    for agent in agents or [{"who": {"display": "unknown"}, "requestor": True}]:
        root.append(_active_participant(agent))
    root.append(_audit_source(event.get("source") or {}))
    for entity in _entities(event):
        participant = _participant_object(entity)
        if participant is not None:
            root.append(participant)
    xml: bytes = tostring(root, encoding="utf-8", xml_declaration=False)
    return xml
