"""Which patients an exchange concerns: URL, search parameters, bodies through the Patient
compartment, Location headers, and bundles (with urn:uuid references resolved)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.fhir.bundle import bundle_entries
from proxy.fhir.interaction import InteractionKind, classify
from proxy.fhir.patients import (
    patient_reference,
    patients_in_resource,
    patients_of_exchange,
    patients_of_location,
    patients_of_request,
)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/1", "Patient/1"),
        ("Patient/1/_history/7", "Patient/1"),
        ("http://fhir.example.org/fhir/Patient/abc-1", "Patient/abc-1"),
        ("https://x/fhir/Patient/abc/_history/2", "Patient/abc"),
        ("Practitioner/1", None),
        ("urn:uuid:0f1d6a2e-7f3b-4a55-9d3c-1a2b3c4d5e6f", None),
        ("#contained-patient", None),
        # a contained or urn: reference names no server resource, whatever its tail
        ("#/Patient/1", None),
        ("Patient/7?_format=json", "Patient/7"),
        ("https://x/fhir/Patient/7?a=b?c", "Patient/7"),
        ("urn:example:/Patient/1", None),
        ("Patient", None),
        ("Patient/", None),
        ("Patient?identifier=x|1", None),
        ("", None),
        ("MyPatient/1", None),
    ],
)
def test_patient_reference(reference: str, expected: str | None) -> None:
    assert patient_reference(reference) == expected


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "Patient/123", "", ("Patient/123",)),
        ("GET", "Patient/123/_history/2", "", ("Patient/123",)),
        ("PUT", "Patient/123", "", ("Patient/123",)),
        ("DELETE", "Patient/123", "", ("Patient/123",)),
        ("GET", "Patient/123/$everything", "", ("Patient/123",)),
        ("GET", "Patient/1/Observation", "code=x", ("Patient/1",)),
        ("GET", "Patient/1/*", "", ("Patient/1",)),
        ("GET", "Observation", "patient=123", ("Patient/123",)),
        ("GET", "Observation", "patient=Patient/123", ("Patient/123",)),
        ("GET", "Observation", "patient=1,2", ("Patient/1", "Patient/2")),
        ("GET", "Observation", "subject=Patient/9", ("Patient/9",)),
        ("GET", "Observation", "subject:Patient=9", ("Patient/9",)),
        ("GET", "Observation", "patient:Patient=9", ("Patient/9",)),
        ("GET", "Observation", "subject=Group/9", ()),
        ("GET", "Observation", "subject=9", ()),
        ("GET", "Patient", "_id=5", ("Patient/5",)),
        ("GET", "Patient", "_id=5,6", ("Patient/5", "Patient/6")),
        ("GET", "Observation", "_id=5", ()),
        ("GET", "Observation", "patient.name=smith", ()),
        ("GET", "Observation", "patient.identifier=http://mrn|1", ()),
        ("GET", "Observation", "patient:identifier=http://mrn|1", ()),
        ("GET", "Observation", "subject:missing=true", ()),
        ("GET", "Encounter", "patient=Patient/3&patient=Patient/3", ("Patient/3",)),
        ("GET", "Observation", "code=1234-5", ()),
        ("GET", "Practitioner/1", "", ()),
        ("GET", "Encounter/1/Observation", "", ()),
    ],
)
def test_patients_of_request(method: str, path: str, query: str, expected: tuple[str, ...]) -> None:
    assert patients_of_request(classify(method, path, query, {}, None)) == expected


def test_post_search_form_body_names_patients() -> None:
    interaction = classify(
        "POST",
        "Observation/_search",
        "",
        {"content-type": "application/x-www-form-urlencoded"},
        b"subject=Patient%2F44",
    )
    assert patients_of_request(interaction) == ("Patient/44",)


OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "subject": {"reference": "Patient/7"},
    "performer": [{"reference": "Practitioner/2"}, {"reference": "Patient/8"}],
}


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Patient", "id": "p1"}, ("Patient/p1",)),
        ({"resourceType": "Patient"}, ()),
        (OBSERVATION, ("Patient/7", "Patient/8")),
        (
            {"resourceType": "Encounter", "subject": {"reference": "http://h/fhir/Patient/3"}},
            ("Patient/3",),
        ),
        (
            {"resourceType": "Condition", "subject": {"reference": "Patient/4/_history/1"}},
            ("Patient/4",),
        ),
        ({"resourceType": "Practitioner", "id": "2"}, ()),
        (
            {"resourceType": "Observation", "subject": {"reference": "Group/1"}},
            (),
        ),
        (
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [
                    {"resource": {"resourceType": "Patient", "id": "a"}},
                    {"resource": OBSERVATION},
                    {"resource": {"resourceType": "Patient", "id": "a"}},
                ],
            },
            ("Patient/a", "Patient/7", "Patient/8"),
        ),
        ({"resourceType": "Observation", "subject": "Patient/1"}, ()),
        ({"resourceType": "Observation", "subject": [{"reference": 5}]}, ()),
        (None, ()),
    ],
)
def test_patients_in_resource(resource: dict[str, Any] | None, expected: tuple[str, ...]) -> None:
    assert patients_in_resource(resource) == expected


def test_location_headers() -> None:
    assert patients_of_location({"location": "http://h/fhir/Patient/9/_history/1"}) == (
        "Patient/9",
    )
    assert patients_of_location({"content-location": "Patient/2"}) == ("Patient/2",)
    assert patients_of_location({"location": "Observation/1/_history/1"}) == ()


def test_exchange_combines_url_bodies_and_location_without_duplicates() -> None:
    create = classify("POST", "Observation", "", {}, None)
    got = patients_of_exchange(
        create,
        OBSERVATION,
        {**OBSERVATION, "id": "o9"},
        {"location": "http://h/fhir/Observation/o9/_history/1"},
    )
    assert got == ("Patient/7", "Patient/8")
    created_patient = patients_of_exchange(
        classify("POST", "Patient", "", {}, None),
        {"resourceType": "Patient"},
        None,
        {"location": "Patient/new1/_history/1"},
    )
    assert created_patient == ("Patient/new1",)
    failed = patients_of_exchange(
        classify("GET", "Observation/1", "", {}, None),
        None,
        {"resourceType": "OperationOutcome", "issue": []},
        {},
    )
    assert failed == (), "an OperationOutcome names no patient"


def test_read_takes_patients_from_the_response_not_the_request_body() -> None:
    read = classify("GET", "Observation/o1", "", {}, None)
    assert patients_of_exchange(read, {"resourceType": "Patient", "id": "x"}, OBSERVATION, {}) == (
        "Patient/7",
        "Patient/8",
    )


def test_transaction_entries_resolve_urn_uuid_to_created_patients() -> None:
    ann, obs = "urn:uuid:11111111-1111-4111-8111-111111111111", "urn:uuid:2"
    request = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": ann,
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": obs,
                "resource": {"resourceType": "Observation", "subject": {"reference": ann}},
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": {"resourceType": "Patient", "id": "b"},
                "request": {"method": "PUT", "url": "Patient/b"},
            },
            {"request": {"method": "DELETE", "url": "Observation?subject=Patient/b"}},
            {"request": {"method": "GET"}},
        ],
    }
    response = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {"response": {"status": "201 Created", "location": "Patient/a1/_history/1"}},
            {"response": {"status": "201", "location": "Observation/o1/_history/1"}},
            {"response": {"status": "200 OK", "location": "Patient/b/_history/2"}},
            {"response": {"status": "204"}},
        ],
    }
    entries = bundle_entries(request, response)
    assert [e.index for e in entries] == [0, 1, 2, 3, 4]
    assert [e.interaction.kind for e in entries] == [
        InteractionKind.CREATE,
        InteractionKind.CREATE,
        InteractionKind.UPDATE,
        InteractionKind.DELETE,
        InteractionKind.UNKNOWN,
    ]
    assert [e.status for e in entries] == [201, 201, 200, 204, None]
    assert [e.patients for e in entries] == [
        ("Patient/a1",),
        ("Patient/a1",),
        ("Patient/b",),
        ("Patient/b",),
        (),
    ]
    assert entries[1].location == "Observation/o1/_history/1"
    assert entries[3].interaction.conditional
    assert entries[4].interaction.detail


def test_bundle_without_response_or_entries() -> None:
    request = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient/1"}}, "garbage"],
    }
    entries = bundle_entries(request, None)
    assert entries[0].status is None and entries[0].patients == ("Patient/1",)
    assert entries[1].interaction.kind is InteractionKind.UNKNOWN
    assert bundle_entries(None, None) == ()
    assert bundle_entries({"resourceType": "Bundle", "entry": "nope"}, None) == ()


def test_long_references_are_resolved_but_never_remembered() -> None:
    """Short references are cached (a search answer repeats its patients); one a client
    made long is not, so the cache cannot be filled with megabytes of references."""
    from proxy.fhir import patients

    patients._cached_patient_reference.cache_clear()
    before = patients._cached_patient_reference.cache_info().currsize
    long_ref = "https://fhir.example.org/" + "a/" * 5_000 + "Patient/123"
    assert patients.patient_reference(long_ref) == "Patient/123"
    assert patients._cached_patient_reference.cache_info().currsize == before
    assert patients.patient_reference("Patient/cached-1") == "Patient/cached-1"
    assert patients._cached_patient_reference.cache_info().currsize == before + 1


def test_any_mapping_is_read_and_odd_input_names_no_patient() -> None:
    from types import MappingProxyType

    from proxy.fhir.patients import patients_in_resource

    observation = {"resourceType": "Observation", "subject": {"reference": "Patient/9"}}
    assert patients_in_resource(MappingProxyType(observation)) == ("Patient/9",)
    for odd in ("Patient/9", ["Patient/9"], 9, None):
        assert patients_in_resource(odd) == ()
