"""BALP AuditEvents as DICOM audit messages: every profile the builder makes validates
against the DICOM audit message schema, and the elements FHIR maps land where DICOM
expects them."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from lxml import etree

from proxy.delivery.atna import audit_message
from tests.factories import audit_event, events_of, exchange, search_exchange, unsigned_jwt

TOKEN = unsigned_jwt({"sub": "u-7", "name": "Dr Who", "client_id": "ward-app", "jti": "j1"})
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PATIENT = {"resourceType": "Patient", "id": "1"}
OBSERVATION = {"resourceType": "Observation", "id": "9", "subject": {"reference": "Patient/2"}}

EXCHANGES = {
    "read": exchange("GET", "/Patient/1", headers=BEARER, response=PATIENT),
    "create": exchange(
        "POST", "/Observation", headers=BEARER, body=OBSERVATION, status=201, response=OBSERVATION
    ),
    "search": exchange("GET", "/Observation", query="subject=Patient/3&code=x", headers=BEARER),
    "failed delete": exchange("DELETE", "/Patient/5", status=500, error="upstream failed"),
    "fan-out": search_exchange(["Patient/1", "Patient/2"]),
}


@pytest.mark.parametrize("kind", list(EXCHANGES))
def test_balp_events_validate_against_the_dicom_schema(kind: str, dicom_audit_schema: Any) -> None:
    events = events_of(EXCHANGES[kind])
    assert events
    for event in events:
        document = etree.fromstring(audit_message(event))
        assert dicom_audit_schema.validate(document), dicom_audit_schema.error_log


def test_the_elements_fhir_maps_land_in_their_dicom_places(dicom_audit_schema: Any) -> None:
    (event,) = events_of(EXCHANGES["read"])
    message = etree.fromstring(audit_message(event))
    identification = message.find("EventIdentification")
    assert identification is not None
    assert identification.get("EventActionCode") == event["action"] == "R"
    assert identification.get("EventOutcomeIndicator") == event["outcome"]
    assert identification.get("EventDateTime") == event["period"]["start"], "FHIR: period"
    event_id = identification.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == event["type"]["code"]
    assert [e.get("csd-code") for e in identification.findall("EventTypeCode")] == [
        c["code"] for c in event["subtype"]
    ]
    users = {p.get("UserID"): p for p in message.findall("ActiveParticipant")}
    assert users["u-7"].get("UserIsRequestor") == "true"
    assert users["u-7"].get("UserName") == "Dr Who"
    source = message.find("AuditSourceIdentification")
    assert source is not None
    assert source.get("AuditSourceID") == event["source"]["observer"]["reference"]
    roles = {
        (o.get("ParticipantObjectTypeCode"), o.get("ParticipantObjectTypeCodeRole")): o
        for o in message.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectID") == "Patient/1"
    }
    assert set(roles) == {("1", "1"), ("2", "4")}, "the patient, and the resource read"
    patient = roles[("1", "1")]
    id_type = patient.find("ParticipantObjectIDTypeCode")
    assert id_type is not None and id_type.get("csd-code") == "Patient"


def test_details_and_queries_are_base64_and_r5_events_map_too(dicom_audit_schema: Any) -> None:
    r5 = {
        "resourceType": "AuditEvent",
        "id": "e1",
        "category": [
            {
                "coding": [
                    {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"}
                ]
            }
        ],
        "code": {"coding": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}]},
        "action": "R",
        "recorded": "2026-12-05T10:00:00.123+01:00",
        "outcome": {
            "code": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-event-outcome",
                "code": "4",
            }
        },
        "patient": {"reference": "Patient/42"},
        "agent": [
            {
                "who": {"identifier": {"value": "u-1"}},
                "requestor": True,
                "networkString": "10.0.0.7",
            }
        ],
        "source": {"observer": {"display": "proxy"}, "site": {"display": "ward-7"}},
        "entity": [
            {
                "what": {"reference": "Observation/1/_history/3"},
                "detail": [{"type": "note", "valueString": "a <b> & c"}],
            },
            {
                "query": base64.b64encode(b"GET /Patient?name=x").decode(),
                "what": {"identifier": {"value": "q"}},
            },
        ],
    }
    message = etree.fromstring(audit_message(r5))
    assert dicom_audit_schema.validate(message), dicom_audit_schema.error_log
    objects = {
        o.get("ParticipantObjectID"): o for o in message.findall("ParticipantObjectIdentification")
    }
    assert objects["Patient/42"].get("ParticipantObjectTypeCodeRole") == "1"
    detail = objects["Observation/1/_history/3"].find("ParticipantObjectDetail")
    assert detail is not None and base64.b64decode(detail.get("value") or "") == b"a <b> & c"
    id_type = objects["Observation/1/_history/3"].find("ParticipantObjectIDTypeCode")
    assert id_type is not None and id_type.get("csd-code") == "Observation"
    assert objects["q"].find("ParticipantObjectQuery") is not None
    identification = message.find("EventIdentification")
    assert identification is not None and identification.get("EventOutcomeIndicator") == "4"
    source = message.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditEnterpriseSiteID") == "ward-7"


def test_a_minimal_event_still_makes_a_valid_message(dicom_audit_schema: Any) -> None:
    assert dicom_audit_schema.validate(etree.fromstring(audit_message(audit_event(1))))
