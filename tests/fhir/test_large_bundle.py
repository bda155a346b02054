"""A large response Bundle read entry by entry, cut to what the audit reads, gives the
same events and rows as the Bundle parsed whole; what cannot be read so is parsed whole."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest

from proxy.audit.balp import AuditContext, build_events
from proxy.fhir.large_bundle import audit_view
from tests.factories import NOW, TRANSACTION_BY_URN, exchange


def _observation(i: int, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{i}",
        "meta": {"versionId": "2", "lastUpdated": "2026-11-01T10:00:00Z"},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": patient},
        "performer": [{"reference": "Practitioner/dr"}, {"reference": "Patient/self-9"}],
        "valueQuantity": {"value": 60.5 + i, "unit": "/min"},
    }


SEARCHSET = {
    "resourceType": "Bundle",
    "id": "b1",
    "type": "searchset",
    "total": 9,
    "link": [{"relation": "self", "url": "http://x/fhir/Observation?code=8867-4"}],
    "entry": [
        *(
            {
                "fullUrl": f"http://x/fhir/Observation/o{i}",
                "resource": _observation(i, f"Patient/p{i % 4}"),
                "search": {"mode": "match"},
            }
            for i in range(6)
        ),
        {
            "resource": {"resourceType": "Patient", "id": "p1", "name": [{"family": "A"}]},
            "search": {"mode": "include"},
        },
        {
            "resource": {
                "resourceType": "Encounter",
                "id": "e1",
                "subject": {"reference": "Patient/p7"},
            }
        },
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "warning", "code": "informational", "diagnostics": "partial"}
                ],
            },
            "search": {"mode": "outcome"},
        },
    ],
}

TRANSACTION = TRANSACTION_BY_URN

TRANSACTION_RESPONSE = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [
        {
            "response": {"status": "201 Created", "location": "Patient/np/_history/1"},
            "resource": {"resourceType": "Patient", "id": "np", "meta": {"versionId": "1"}},
        },
        {
            "response": {"status": "201 Created", "location": "Observation/no/_history/1"},
            "resource": {
                "resourceType": "Observation",
                "id": "no",
                "meta": {"versionId": "1"},
                "subject": {"reference": "Patient/np"},
            },
        },
        {
            "response": {
                "status": "404 Not Found",
                "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "not-found", "diagnostics": "gone"}],
                },
            }
        },
    ],
}


def _comparable(ex_built: list[Any]) -> list[tuple[dict[str, Any], Any, Any]]:
    """Events without their ids, rows without id and body (both hold the random id)."""
    out = []
    for item in ex_built:
        event, row = item.event, item.row
        body = orjson.loads(row.body)
        body.pop("id")
        out.append(
            (
                {k: v for k, v in event.items() if k != "id"},
                row._replace(event_id="", body=b""),
                body,
            )
        )
    return out


@pytest.mark.parametrize(
    ("method", "path", "request_body", "response"),
    [
        ("GET", "Observation", None, SEARCHSET),
        ("POST", "", TRANSACTION, TRANSACTION_RESPONSE),
    ],
    ids=["searchset", "transaction"],
)
def test_the_cut_bundle_gives_the_events_of_the_whole_one(
    method: str, path: str, request_body: Any, response: dict[str, Any]
) -> None:
    raw = orjson.dumps(response)
    ctx = AuditContext.default()
    whole = exchange(
        method, path, query="code=8867-4", body=request_body, response=raw, request_id="r1"
    )
    cut = exchange(
        method, path, query="code=8867-4", body=request_body, response=raw, request_id="r1"
    )
    view = audit_view(io.BytesIO(raw))
    assert view is not None
    assert len(orjson.dumps(view)) <= len(raw)
    cut.response_body = None
    cut.use_response_json(view)
    expected = _comparable(build_events(whole, ctx, NOW))
    assert len(expected) > 1
    assert _comparable(build_events(cut, ctx, NOW)) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "searchset", "entry": [], "resourceType": "Bundle"}',  # its type after entry
        b'{"resourceType": "Observation", "id": "o1"}',
        b'{"resourceType": "Bundle", "type": "searchset"}',  # no entries
        b"[1, 2]",
        b"not json",
        b'{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": ',  # cut short
    ],
)
def test_what_cannot_be_read_entry_by_entry_is_parsed_whole(body: bytes) -> None:
    assert audit_view(io.BytesIO(body)) is None
