"""Events built for one exchange: outcomes and failures, one event per patient, the entities
(data, query, transaction), the source, R5, and the outcome-unknown events of a crash."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson
import pytest

from proxy.audit.balp import outcome_of
from proxy.audit.intents import (
    UNKNOWN_OUTCOME_DESC,
    build_unknown_outcome_events,
    intent_summary,
)
from proxy.audit.r5 import to_r5
from proxy.audit.validate import validate_event
from proxy.audit.vocabulary import OPERATION_SYSTEM
from tests.factories import (
    NOW,
    OBSERVATION,
    codes,
    context,
    events_of,
    exchange,
    patients_of,
    profile_of,
    query_entity,
    recorded_request,
    request_id_of,
    unsigned_jwt,
)

OBS = OBSERVATION


def _outcome(diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": diagnostics}],
    }


def _valid(events: list[dict[str, Any]], version: str = "R4") -> None:
    for event in events:
        assert validate_event(event, version) is None, validate_event(event, version)


# --- outcomes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "response", "code", "desc"),
    [
        (200, None, None, "0", None),
        (201, None, None, "0", None),
        (304, None, None, "0", None),
        (400, None, _outcome("bad date"), "4", "HTTP 400: bad date"),
        (404, None, None, "4", "HTTP 404: HTTP 404"),
        (409, None, _outcome("version conflict"), "4", "HTTP 409: version conflict"),
        (401, None, None, "8", "access denied (HTTP 401)"),
        (403, None, _outcome("scope"), "8", "access denied (HTTP 403): scope"),
        (500, None, _outcome("boom"), "8", "HTTP 500: boom"),
        (503, None, None, "8", "HTTP 503"),
        (None, "upstream unreachable: connection refused", None, "12", "upstream unreachable"),
        (504, "upstream timed out", None, "12", "upstream timed out"),
    ],
)
def test_outcome_from_status_error_and_operation_outcome(
    status: int | None, error: str | None, response: Any, code: str, desc: str | None
) -> None:
    got_code, got_desc = outcome_of(status, error, response)
    assert got_code == code
    if desc is None:
        assert got_desc is None
    else:
        assert got_desc is not None and desc in got_desc


@pytest.mark.parametrize(
    ("method", "path", "status", "outcome"),
    [
        ("GET", "Observation/o1", 404, "4"),
        ("GET", "Observation/o1", 401, "8"),
        ("GET", "Observation/o1", 403, "8"),
        ("POST", "Observation", 422, "4"),
        ("PUT", "Observation/o1", 500, "8"),
        ("DELETE", "Observation/o1", 405, "4"),
        ("GET", "Observation", 400, "4"),
    ],
)
def test_failures_are_audited_without_claiming_a_balp_profile(
    method: str, path: str, status: int, outcome: str
) -> None:
    body = OBS if method in ("POST", "PUT") else None
    ex = exchange(method, path, body=body, status=status, response=_outcome("no"))
    events = events_of(ex)
    assert len(events) >= 1
    for event in events:
        assert event["outcome"] == outcome
        assert "no" in event["outcomeDesc"]
        assert profile_of(event) is None, "a failure violates the profiles' fixed outcome 0"
    _valid(events)


def test_upstream_unreachable_is_a_major_failure_with_the_reason() -> None:
    ex = exchange("GET", "Patient/p1", status=502, response=None, error="upstream unreachable")
    (event,) = events_of(ex)
    assert event["outcome"] == "12"
    assert event["outcomeDesc"] == "upstream unreachable"
    assert patients_of(event) == ["Patient/p1"], "the patient is known from the URL alone"
    _valid([event])


def test_unknown_paths_are_audited_with_the_reason() -> None:
    ex = exchange("GET", "not a/fhir path", status=404, response=_outcome("unknown resource"))
    (event,) = events_of(ex)
    assert "subtype" not in event
    assert event["outcome"] == "4"
    assert "unknown resource" in event["outcomeDesc"]
    assert profile_of(event) is None
    query = next(e for e in event["entity"] if "24" in codes(e["role"]))
    assert base64.b64decode(query["query"]).startswith(b"GET /fhir/not a/fhir path HTTP/1.1")
    _valid([event])


# --- profiles, patients -------------------------------------------------------------------------


def test_read_of_a_patient_is_patient_read_of_that_patient() -> None:
    patient = {"resourceType": "Patient", "id": "p9", "meta": {"versionId": "3"}}
    (event,) = events_of(exchange("GET", "Patient/p9", response=patient))
    assert profile_of(event) == "PatientRead"
    assert patients_of(event) == ["Patient/p9"]
    data = next(e for e in event["entity"] if "4" in codes(e.get("role")))
    assert data["what"]["reference"] == "Patient/p9/_history/3"


def test_vread_and_update_name_the_version() -> None:
    obs = {**OBS, "meta": {"versionId": "7"}}
    (vread,) = events_of(exchange("GET", "Observation/o1/_history/7", response=obs))
    (update,) = events_of(exchange("PUT", "Observation/o1", body=OBS, response=obs))
    for event, subtype in ((vread, "vread"), (update, "update")):
        data = next(e for e in event["entity"] if "4" in codes(e.get("role")))
        assert data["what"]["reference"] == "Observation/o1/_history/7"
        assert {c["code"] for c in event["subtype"]} == {subtype}
    assert profile_of(vread) == "PatientRead" and profile_of(update) == "PatientUpdate"


def test_create_takes_the_reference_from_location() -> None:
    created = {**OBS, "id": "new1", "meta": {"versionId": "1"}}
    ex = exchange(
        "POST",
        "Observation",
        body=OBS,
        status=201,
        response=created,
        response_headers={"Location": "http://server.example.com/fhir/Observation/new1/_history/1"},
    )
    (event,) = events_of(ex)
    assert profile_of(event) == "PatientCreate"
    data = next(e for e in event["entity"] if "4" in codes(e.get("role")))
    assert data["what"]["reference"] == "Observation/new1/_history/1"


def test_security_labels_are_copied_to_the_data_entity() -> None:
    label = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
    labelled = {**OBS, "meta": {"security": [label]}}
    (event,) = events_of(exchange("GET", "Observation/o1", response=labelled))
    data = next(e for e in event["entity"] if "4" in codes(e.get("role")))
    assert data["securityLabel"] == [label]


def test_search_result_gives_one_patient_query_event_per_patient() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {**OBS, "id": f"o{i}", "subject": {"reference": f"Patient/p{i % 3}"}}}
            for i in range(9)
        ],
    }
    events = events_of(exchange("GET", "Observation", query="code=weight", response=bundle))
    assert [patients_of(e) for e in events] == [["Patient/p0"], ["Patient/p1"], ["Patient/p2"]]
    assert {profile_of(e) for e in events} == {"PatientQuery"}
    assert len({e["id"] for e in events}) == 3, "each event has its own id"
    _valid(events)


def test_search_without_patients_gives_exactly_one_query_event() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    events = events_of(exchange("GET", "Organization", query="name=acme", response=bundle))
    assert len(events) == 1
    assert profile_of(events[0]) == "Query"
    assert patients_of(events[0]) == []


def test_patient_search_parameter_names_the_patient_even_with_no_results() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    ex = exchange("GET", "Observation", query="subject=Patient/p5&code=x", response=bundle)
    (event,) = events_of(ex)
    assert profile_of(event) == "PatientQuery"
    assert patients_of(event) == ["Patient/p5"]
    query = next(e for e in event["entity"] if "24" in codes(e["role"]))
    assert query["description"] == "Observation?subject=Patient%2Fp5&code=x"


def test_operation_is_named_in_a_second_subtype_coding() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": OBS}]}
    (event,) = events_of(exchange("GET", "Patient/p1/$everything", response=bundle))
    assert event["subtype"][0]["code"] == "operation"
    assert event["subtype"][1] == {"system": OPERATION_SYSTEM, "code": "$everything"}
    assert event["action"] == "E"
    assert patients_of(event) == ["Patient/p1"]
    _valid([event])


def test_query_entity_is_the_raw_request_without_credentials() -> None:
    ex = exchange(
        "POST",
        "Observation/_search",
        body=b"patient=p1&code=x",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/fhir+json",
            "Authorization": "Bearer secret-token-value-that-must-not-leak",
            "Cookie": "session=also-secret",
        },
        request_id="rid-1",
        response={"resourceType": "Bundle", "type": "searchset"},
    )
    (event,) = events_of(ex)
    query = next(e for e in event["entity"] if "24" in codes(e["role"]))
    raw = base64.b64decode(query["query"])
    assert raw == (
        b"POST /fhir/Observation/_search HTTP/1.1\r\nAccept: application/fhir+json\r\n"
        b"X-Request-Id: rid-1\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n"
        b"patient=p1&code=x"
    )
    assert request_id_of(event) == "rid-1"


PARAMETERS_WITH_A_SECRET = {
    "resourceType": "Parameters",
    "parameter": [
        {"name": "start", "valueDate": "2020-01-01"},
        {"name": "client_secret", "valueString": "op-secret-1"},
    ],
}
PARAMETERS_XML = (
    b'<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="start"/>'
    b'<valueDate value="2020-01-01"/></parameter><parameter><name value="client_secret"/>'
    b'<valueString value="op-secret-1"/></parameter></Parameters>'
)
PARAMETERS_YAML = (
    b"resourceType: Parameters\nparameter:\n- name: start\n  valueDate: '2020-01-01'\n"
    b"- name: client_secret\n  valueString: op-secret-1\n"
)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/fhir+json", orjson.dumps(PARAMETERS_WITH_A_SECRET)),
        ("application/fhir+xml", PARAMETERS_XML),
        ("application/x-yaml", PARAMETERS_YAML),
        ("application/x-www-form-urlencoded", b"start=2020-01-01&client_secret=op-secret-1"),
    ],
    ids=["json", "xml", "yaml", "form"],
)
def test_an_operation_body_is_recorded_with_its_credentials_redacted(
    content_type: str, body: bytes
) -> None:
    ex = exchange(
        "POST",
        "Patient/p1/$everything",
        body=body,
        headers={"Content-Type": content_type},
        request_id="rid-op",
        response={"resourceType": "Bundle", "type": "searchset"},
    )
    (event,) = events_of(ex)
    head, _, recorded = recorded_request(event).partition(b"\r\n\r\n")
    assert head == (
        b"POST /fhir/Patient/p1/$everything HTTP/1.1\r\nX-Request-Id: rid-op\r\n"
        + f"Content-Type: {content_type}".encode()
    )
    assert b"op-secret-1" not in recorded
    assert b"REDACTED" in recorded
    assert b"2020-01-01" in recorded, "everything else is recorded as sent"


def test_a_graphql_body_is_recorded_as_sent() -> None:
    query = b'{"query":"{ PatientList(name: \\"Smith\\") { id name { family } } }"}'
    ex = exchange(
        "POST",
        "$graphql",
        body=query,
        headers={"Content-Type": "application/json"},
        response={"data": {"PatientList": []}},
    )
    (event,) = events_of(ex)
    assert recorded_request(event).endswith(b"\r\n\r\n" + query)
    assert event["subtype"][1]["code"] == "$graphql"


@pytest.mark.parametrize(
    ("content_type", "body", "secret"),
    [
        (
            "application/json",
            b'{"query":"{ x(access_token: \\"gq-secret-2\\") { id } }","variables":'
            b'{"password":"gq-secret-3"}}',
            b"gq-secret",
        ),
        ("application/graphql", b'{ x(api_key: "gq-secret-4") { id } }', b"gq-secret"),
    ],
)
def test_graphql_arguments_and_variables_that_are_credentials_are_redacted(
    content_type: str, body: bytes, secret: bytes
) -> None:
    ex = exchange(
        "POST", "$graphql", body=body, headers={"Content-Type": content_type}, response={}
    )
    (event,) = events_of(ex)
    recorded = recorded_request(event)
    assert secret not in recorded
    assert recorded.count(b"REDACTED") == body.count(secret)


def test_an_operation_body_in_a_format_that_hides_credentials_is_not_recorded() -> None:
    ex = exchange(
        "POST",
        "Binary/$upload",
        body=b"\x00\x01opaque-bytes-password=x",
        headers={"Content-Type": "application/octet-stream"},
        response={},
    )
    (event,) = events_of(ex)
    assert b"opaque-bytes" not in recorded_request(event)
    query = query_entity(event)
    assert "[body of 25 bytes (application/octet-stream) not recorded]" in query["description"]


def test_a_long_operation_body_is_cut_at_max_query_bytes_with_its_length_and_digest() -> None:
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": f"p{i}", "valueString": "x" * 50} for i in range(40)],
    }
    body = orjson.dumps(parameters)
    ex = exchange("POST", "$process-message", body=body, request_id="rid-cut", response={})
    (event,) = events_of(ex, context(max_query_bytes=1024))
    query = query_entity(event)
    kept = base64.b64decode(query["query"])
    assert len(kept) == 1024
    whole = (
        b"POST /fhir/$process-message HTTP/1.1\r\nX-Request-Id: rid-cut\r\n"
        b"Content-Type: application/fhir+json\r\n\r\n" + body
    )
    assert whole.startswith(kept)
    digest = hashlib.sha256(whole).hexdigest()
    assert query["description"].endswith(
        f"[request cut to 1024 of {len(whole)} bytes; sha256 of all {len(whole)} bytes: {digest}]"
    )


def test_the_body_of_a_write_or_a_batch_is_not_put_in_a_query_entity() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient?name=secretive"}}],
    }
    rid = b"rid-batch"
    ex = exchange(
        "POST", "", body=bundle, request_id=rid.decode(), response={"resourceType": "Bundle"}
    )
    queries = [e for e in events_of(ex) if any("24" in codes(x.get("role")) for x in e["entity"])]
    assert len(queries) == 2, "the batch's own event and its search entry's"
    for event in queries:
        assert recorded_request(event).endswith(b"HTTP/1.1\r\nX-Request-Id: " + rid + b"\r\n")


def test_source_comes_from_settings() -> None:
    ctx = context(observer={"reference": "Device/gw-1", "display": "gateway", "site": "eu-1"})
    (event,) = events_of(
        exchange("GET", "metadata", response={"resourceType": "CapabilityStatement"}), ctx
    )
    assert event["source"]["observer"] == {"reference": "Device/gw-1", "display": "gateway"}
    assert event["source"]["site"] == "eu-1"
    assert event["source"]["type"][0]["code"] == "4"
    assert profile_of(event) is None, "capabilities is not a BALP RESTful profile"


# --- secrets ------------------------------------------------------------------------------------

SECRET_JWT_CLAIMS = {"sub": "u1", "name": "Ann", "jti": "jti-1", "client_id": "app"}


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {unsigned_jwt(SECRET_JWT_CLAIMS)}",
        "Bearer OPAQUE-PREFIX-THAT-MUST-NOT-LEAK-" + "t" * 40,
        "Basic " + base64.b64encode(b"ann:hunter2-password").decode(),
        "Negotiate c2VjcmV0LWtlcmJlcm9zLXRpY2tldA==",
    ],
)
@pytest.mark.parametrize("pattern", ["opaque", "minimal", "comprehensive"])
def test_no_credential_reaches_an_event(authorization: str, pattern: str) -> None:
    ex = exchange(
        "POST",
        "Observation",
        body=OBS,
        status=201,
        response=OBS,
        headers={"Authorization": authorization, "Cookie": "sid=cookie-secret-value"},
    )
    summary = orjson.dumps(intent_summary(ex))
    ctx = context(identity={"token_pattern": pattern})
    dumped = orjson.dumps(events_of(ex, ctx)) + summary
    credential = authorization.split(" ", 1)[1]
    assert credential.encode() not in dumped
    assert b"cookie-secret-value" not in dumped
    assert b"hunter2" not in dumped
    assert b"OPAQUE-PREFIX" not in dumped
    if authorization.startswith("Bearer OPAQUE"):
        # Not BALP's "last 32 characters": a short token would be kept whole.
        assert credential[-32:].encode() not in dumped
        assert b"hmac-sha256:" in dumped, "an opaque token is recorded as its keyed hash"


# --- R5 -------------------------------------------------------------------------------------------


def _r5_cases() -> list[Any]:
    return [
        exchange("GET", "Patient/p1", response={"resourceType": "Patient", "id": "p1"}),
        exchange("POST", "Observation", body=OBS, status=201, response=OBS),
        exchange("DELETE", "Observation/o1", status=204),
        exchange("GET", "Observation", query="patient=p1", response={"resourceType": "Bundle"}),
        exchange("GET", "Observation/o1", status=403, response=_outcome("denied")),
        exchange("GET", "Observation/o1", status=None, error="upstream unreachable"),
        exchange(
            "GET",
            "Observation/o1",
            headers={"Authorization": f"Bearer {unsigned_jwt(SECRET_JWT_CLAIMS)}"},
            response=OBS,
        ),
    ]


@pytest.mark.parametrize("index", range(7))
def test_r5_events_are_valid_r5_with_the_same_facts(index: int) -> None:
    ex = _r5_cases()[index]
    r4 = events_of(ex)
    r5 = events_of(ex, context(fhir_version="R5"))
    assert len(r4) == len(r5)
    for old, new in zip(r4, r5, strict=True):
        assert validate_event(new, "R5") is None, validate_event(new, "R5")
        assert new == to_r5(old) | {"id": new["id"], "recorded": new["recorded"]}
        assert new["outcome"]["code"]["code"] == old["outcome"]
        assert new["code"]["coding"][0]["code"] == old.get("subtype", [{}])[0].get(
            "code", new["code"]["coding"][0]["code"]
        )
        assert new["action"] == old["action"]
        if patients_of(old):
            assert new["patient"] == {"reference": patients_of(old)[0]}
        assert "meta" not in new or "profile" not in new["meta"], "BALP is R4 only"


# --- outcome unknown: a write whose answer a crash hid ------------------------------------------


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_intent_without_completion_becomes_an_outcome_unknown_event(version: str) -> None:
    ex = exchange(
        "POST",
        "Observation",
        body=OBS,
        status=None,
        headers={"Authorization": f"Bearer {unsigned_jwt(SECRET_JWT_CLAIMS)}"},
        request_id="rid-crash",
    )
    summary = orjson.loads(orjson.dumps(intent_summary(ex)))  # as stored
    built = build_unknown_outcome_events(summary, context(fhir_version=version), NOW)
    assert len(built) == 1
    event = built[0].event
    assert validate_event(event, version) is None, validate_event(event, version)
    if version == "R4":
        assert event["outcome"] == "8"
        assert event["outcomeDesc"] == UNKNOWN_OUTCOME_DESC
        assert patients_of(event) == ["Patient/p1"]
        assert profile_of(event) is None
        assert event["subtype"][0]["code"] == "create"
        user = next(a for a in event["agent"] if a["requestor"])
        assert user["who"]["display"] == "Ann"
    else:
        assert event["outcome"]["code"]["code"] == "8"
        assert event["patient"] == {"reference": "Patient/p1"}
    assert "rid-crash" in orjson.dumps(event).decode()
