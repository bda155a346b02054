"""The suite's BALP conformance check can fail: events broken in the ways BALP forbids are
rejected, by the profiles through Medplum's validator or, where Medplum does not look
(inside slices, required bindings), by the checks named after the profile's element."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from proxy.audit import pipeline
from tests.conformance import ProfileValidator
from tests.factories import BALP, NOW, OBSERVATION, context, events_of, exchange, unsigned_jwt

OBS = OBSERVATION
CLIENT_JWT = unsigned_jwt({"sub": "u1", "name": "Ann", "client_id": "app-1", "jti": "j1"})


def _read() -> dict[str, Any]:
    (event,) = events_of(exchange("GET", "Observation/o1", response=OBS))
    assert event["meta"]["profile"] == [BALP + "PatientRead"]
    return event


def _create(**headers: str) -> dict[str, Any]:
    (event,) = events_of(
        exchange("POST", "Observation", body=OBS, status=201, response=OBS, headers=headers)
    )
    assert event["meta"]["profile"] == [BALP + "PatientCreate"]
    return event


def _agent(event: dict[str, Any], code: str) -> dict[str, Any]:
    agent: dict[str, Any] = next(
        a for a in event["agent"] if code in {c["code"] for c in a["type"]["coding"]}
    )
    return agent


def _entity(event: dict[str, Any], role: str) -> dict[str, Any]:
    entity: dict[str, Any] = next(
        e for e in event["entity"] if e.get("role", {}).get("code") == role
    )
    return entity


def test_the_events_the_builder_makes_pass(balp_validator: ProfileValidator) -> None:
    assert balp_validator.check(_read()) == []
    assert balp_validator.check(_create()) == []


def test_the_oauth_client_of_the_comprehensive_pattern_is_no_second_user(
    balp_validator: ProfileValidator,
) -> None:
    """Medplum matches any agent to a Create's ``user`` slice (bound to DataSources); the
    OAuth client (DCM 110150) belongs to no slice under open slicing."""
    event = _create(Authorization=f"Bearer {CLIENT_JWT}")
    assert "110150" in {c["code"] for a in event["agent"] for c in a["type"]["coding"]}
    assert balp_validator.check(event) == []


Breaking = Callable[[dict[str, Any]], Any]


def _without_patient(event: dict[str, Any]) -> None:
    event["entity"] = [e for e in event["entity"] if e.get("role", {}).get("code") != "1"]


@pytest.mark.parametrize(
    ("make", "breaking", "expected"),
    [
        (_read, _without_patient, "slice 'patient'"),
        (_read, lambda e: e.update(outcome="4"), "AuditEvent.outcome"),
        (_read, lambda e: e.update(unknown=1), "AuditEvent.unknown"),
        (_read, lambda e: e.pop("recorded"), "AuditEvent: AuditEvent.recorded"),
        (
            _read,
            lambda e: e["meta"].update(profile=[BALP + "Nothing"]),
            "which the suite does not hold",
        ),
        (_read, lambda e: _agent(e, "110152").pop("network"), "AuditEvent.agent:client.network"),
        (_read, lambda e: _agent(e, "110152").pop("who"), "AuditEvent.agent:client.who"),
        (_read, lambda e: _agent(e, "110153").pop("network"), "AuditEvent.agent:server.network"),
        (_read, lambda e: _entity(e, "1").pop("what"), "AuditEvent.entity:patient.what"),
        (_read, lambda e: _entity(e, "4").pop("what"), "AuditEvent.entity:data.what"),
        (
            _read,
            lambda e: _entity(e, "4")["role"].update(code="24"),
            "AuditEvent.entity:data.role",
        ),
        (_read, lambda e: e["subtype"][0].update(code="create"), "AuditEvent.subtype:anyRead"),
        (
            _read,
            lambda e: e["entity"][-1]["what"]["identifier"].pop("value"),
            "AuditEvent.entity:transaction.what.identifier.value",
        ),
        (
            lambda: _create(Authorization=f"Bearer {CLIENT_JWT}"),
            lambda e: next(a for a in e["agent"] if a["requestor"])["type"]["coding"].pop(0),
            "AuditEvent.agent:user.type",
        ),
        (
            lambda: _create(Authorization=f"Bearer {CLIENT_JWT}"),
            lambda e: next(a for a in e["agent"] if a["requestor"]).update(
                network={"address": "10.0.0.1", "type": "2"}
            ),
            "AuditEvent.agent:user.network",
        ),
    ],
    ids=[
        "PatientRead without its patient",
        "outcome fixed to success",
        "an element AuditEvent has not",
        "base AuditEvent: recorded",
        "an unknown profile",
        "client without network",
        "client without who",
        "server without network",
        "patient entity without what",
        "data entity without what",
        "data entity role outside RestObjectRoles",
        "Read's subtype outside AllReadVS",
        "X-Request-Id without its value",
        "user type outside DataSources",
        "user with a network",
    ],
)
def test_an_event_broken_as_balp_forbids_is_rejected(
    balp_validator: ProfileValidator,
    make: Callable[[], dict[str, Any]],
    breaking: Breaking,
    expected: str,
) -> None:
    event = copy.deepcopy(make())
    breaking(event)
    errors = balp_validator.check(event)
    assert any(expected in error for error in errors), errors


def test_r5_events_are_not_sent_to_the_r4_definitions(balp_validator: ProfileValidator) -> None:
    (event,) = events_of(
        exchange("GET", "Observation/o1", response=OBS), context(fhir_version="R5")
    )
    assert "code" in event
    assert balp_validator.check(event) == []


def test_what_the_builder_makes_in_this_process_is_checked(
    balp_validator: ProfileValidator,
) -> None:
    """Through the pipeline's name for the builder and the factories', compiled by mypyc or
    not (compiled, build_events calls interaction_events past any patched name), each event
    built is submitted to the session's check, once."""
    balp_validator.settle()
    before = balp_validator.validated
    pipelines_builder = vars(pipeline)["build_events"]  # the name the pipeline calls
    pipelines_builder(exchange("GET", "Observation/o2", response=OBS), context(), NOW)
    events_of(exchange("GET", "Observation/o3", response=OBS))
    balp_validator.settle()
    assert balp_validator.validated == before + 2
