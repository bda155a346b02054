"""Batch and transaction entries as :func:`bundle_entries` reads them: method, URL and
``ifNoneExist`` of each request entry, matched with the response entry at its position."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.fhir.bundle import bundle_entries
from proxy.fhir.interaction import InteractionKind, classify

OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "x"}]}
REQUEST: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:a",
            "resource": {"resourceType": "Patient"},
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=x|1"},
        },
        {"request": {"url": "Patient/1"}},
        {
            "request": {"method": "put", "url": "Patient/2"},
            "resource": {"resourceType": "Patient", "id": "2"},
        },
        {"fullUrl": "urn:uuid:c", "request": {"method": "POST"}},
        {"fullUrl": "urn:uuid:b", "request": {"method": "POST", "url": "Observation"}},
    ],
}
RESPONSE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [
        {"response": {"status": "201 Created", "location": "Patient/p1/_history/1"}},
        {"response": {"status": "200"}, "resource": {"resourceType": "Patient", "id": "1"}},
        {"response": {"status": " 404 Not Found", "outcome": OUTCOME}},
    ],
}


def test_each_entry_is_classified_from_its_request_and_matched_to_its_response() -> None:
    """Conditional create from ``ifNoneExist``; a missing method is GET; a lower-case one
    counts; an entry without URL is UNKNOWN; status, location, returned resource and
    outcome come from the response entry at the same position, and a short response
    leaves the rest unanswered rather than failing."""
    create, read, update, no_url, unanswered = bundle_entries(REQUEST, RESPONSE)

    assert (create.interaction.kind, create.interaction.conditional) == (
        InteractionKind.CREATE,
        True,
    )
    assert create.interaction.search == (("identifier", "x|1"),)
    assert (create.status, create.location) == (201, "Patient/p1/_history/1")
    assert create.patients == ("Patient/p1",)

    assert (read.interaction.kind, read.interaction.method) == (InteractionKind.READ, "GET")
    assert read.status == 200 and read.location is None
    assert read.response_resource == {"resourceType": "Patient", "id": "1"}
    assert read.patients == ("Patient/1",)

    assert (update.interaction.kind, update.interaction.method) == (InteractionKind.UPDATE, "PUT")
    assert update.status == 404 and update.outcome == OUTCOME
    assert update.request_resource == {"resourceType": "Patient", "id": "2"}

    assert no_url.interaction.kind is InteractionKind.UNKNOWN
    assert (no_url.interaction.method, no_url.interaction.detail) == (
        "POST",
        "entry without request.url",
    )

    assert (
        unanswered.interaction.kind is InteractionKind.CREATE
        and not unanswered.interaction.conditional
    )
    assert (unanswered.status, unanswered.location, unanswered.outcome) == (None, None, None)
    assert unanswered.response_resource is None and unanswered.patients == ()


@pytest.mark.parametrize(
    ("status", "expected"),
    [(201, 201), ("201 Created", 201), (" 404 Not Found", 404), ("200", 200), ("OK", None)],
)
def test_entry_status_is_the_leading_number(status: Any, expected: int | None) -> None:
    request = {"resourceType": "Bundle", "entry": [{"request": {"url": "Patient/1"}}]}
    response = {"resourceType": "Bundle", "entry": [{"response": {"status": status}}]}
    (entry,) = bundle_entries(request, response)
    assert entry.status == expected


@pytest.mark.parametrize(
    "body", [b"not json", b'{"resourceType":"Bundle","type":7}', b"[1]", b"null", None]
)
def test_a_post_to_the_base_that_is_no_bundle_is_unknown(body: bytes | None) -> None:
    got = classify("POST", "", "", {"content-type": "application/fhir+json"}, body)
    assert got.kind is InteractionKind.UNKNOWN
    assert got.detail == "POST to the base is not a batch or transaction Bundle"
