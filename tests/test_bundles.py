"""Batch and transaction bundles with entries for several patients, search results with
several patients, and R5 output: end to end through the real test FHIR server."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

from proxy.audit.validate import validate_event
from tests.factories import (
    NodeFhirServer,
    RecordingRepository,
    StartProxy,
    new_patient,
    patient_refs,
    profile,
    request_id_of,
    subtypes,
)


def observation(subject: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": text},
        "subject": {"reference": subject},
    }


async def test_transaction_gives_one_event_per_entry_and_patient(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(
        fhir_server.base_url, repository={"url": repository.url, "flush_interval_ms": 20}
    )
    ann, bob = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": ann,
                "resource": {"resourceType": "Patient", "name": [{"family": "Ann"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": bob,
                "resource": {"resourceType": "Patient", "name": [{"family": "Bob"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": observation(ann, "ann's pulse"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": observation(bob, "bob's pulse"),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    async with http.post(proxy.url, json=bundle, headers={"X-Request-Id": "tx-1"}) as r:
        assert r.status == 200, (await r.text(), r.headers)
        answer = await r.json(content_type=None)
    assert answer["type"] == "transaction-response"
    created = [e["response"]["location"] for e in answer["entry"]]
    ann_ref = "Patient/" + created[0].split("Patient/")[1].split("/")[0]
    bob_ref = "Patient/" + created[1].split("Patient/")[1].split("/")[0]

    events = await repository.wait_for(5)
    assert len(events) == 5, "one for the bundle, one per entry (each entry has one patient)"
    for event in events:
        assert validate_event(event, "R4") is None
    (whole,) = [e for e in events if "transaction" in subtypes(e)]
    assert patient_refs(whole) == [], "the bundle's own event names no patient"
    entries = [e for e in events if e is not whole]
    assert all(subtypes(e)[0] == "create" and profile(e) == "PatientCreate" for e in entries)
    by_patient = sorted(patient_refs(e)[0] for e in entries)
    assert by_patient == sorted([ann_ref, ann_ref, bob_ref, bob_ref]), (
        "urn:uuid subjects resolve to the patients created in the same transaction"
    )
    assert {request_id_of(event) for event in events} == {"tx-1"}


async def test_batch_reads_several_patients_and_audits_each_entry_outcome(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    ann = await new_patient(http, fhir_server.base_url, name=[{"family": "Ann"}])
    bob = await new_patient(http, fhir_server.base_url, name=[{"family": "Bob"}])
    proxy = await start_proxy(
        fhir_server.base_url, repository={"url": repository.url, "flush_interval_ms": 20}
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{ann['id']}"}},
            {"request": {"method": "GET", "url": f"Patient/{bob['id']}"}},
            {"request": {"method": "GET", "url": f"Observation?subject=Patient/{bob['id']}"}},
            {"request": {"method": "GET", "url": "Patient/no-such-patient"}},
        ],
    }
    async with http.post(proxy.url, json=bundle) as r:
        assert r.status == 200
        answer = await r.json(content_type=None)
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses[0].startswith("200") and statuses[3].startswith("404")

    events = await repository.wait_for(5)
    assert len(events) == 5
    (whole,) = [e for e in events if "batch" in subtypes(e)]
    reads = [e for e in events if subtypes(e)[:1] == ["read"]]
    assert len(reads) == 3
    ok_reads = [e for e in reads if e["outcome"] == "0"]
    assert sorted(patient_refs(e)[0] for e in ok_reads) == sorted(
        [f"Patient/{ann['id']}", f"Patient/{bob['id']}"]
    )
    assert {profile(e) for e in ok_reads} == {"PatientRead"}
    (missing,) = [e for e in reads if e["outcome"] != "0"]
    assert missing["outcome"] == "4" and profile(missing) is None
    (query,) = [e for e in events if subtypes(e)[:1] == ["search-type"]]
    assert patient_refs(query) == [f"Patient/{bob['id']}"], "the patient named in the query"
    assert whole["outcome"] == "0"


async def test_search_result_with_several_patients_gives_one_event_each(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    family = f"Many{uuid.uuid4().hex[:8]}"
    made = [await new_patient(http, fhir_server.base_url, name=[{"family": family}]) for _ in "abc"]
    proxy = await start_proxy(
        fhir_server.base_url, repository={"url": repository.url, "flush_interval_ms": 20}
    )
    async with http.get(f"{proxy.url}/Patient", params={"family": family}) as r:
        assert r.status == 200
        assert len((await r.json(content_type=None))["entry"]) == 3
    async with http.get(f"{proxy.url}/Patient", params={"family": "NobodyHasThisName"}) as r:
        assert r.status == 200
    events = await repository.wait_for(4)
    assert len(events) == 4
    per_patient = [e for e in events if profile(e) == "PatientQuery"]
    assert sorted(patient_refs(e)[0] for e in per_patient) == sorted(
        f"Patient/{p['id']}" for p in made
    )
    assert all(len(patient_refs(e)) == 1 for e in per_patient)
    (basic,) = [e for e in events if profile(e) == "Query"]
    assert patient_refs(basic) == [], "exactly one basic Query event when no patient"


async def test_r5_mode_stores_and_ships_valid_r5_audit_events(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(
        fhir_server.base_url,
        audit={"fhir_version": "R5"},
        repository={"url": repository.url, "flush_interval_ms": 20},
    )
    patient = await new_patient(http, proxy.url, name=[{"family": "Five"}])
    async with http.get(f"{proxy.url}/Patient/{patient['id']}") as r:
        assert r.status == 200
    async with http.get(f"{proxy.url}/Patient/nope") as r:
        assert r.status == 404
    events = await repository.wait_for(3)
    for event in events:
        assert validate_event(event, "R5") is None, event
        assert "category" in event and "code" in event and isinstance(event["outcome"], dict)
        assert "subtype" not in event and "type" not in event
    read = next(e for e in events if e["action"] == "R" and e["outcome"]["code"]["code"] == "0")
    assert read["patient"]["reference"] == f"Patient/{patient['id']}"
    assert any("network" in a or "networkString" in a for a in read["agent"]) or any(
        k.startswith("network") for a in read["agent"] for k in a
    )
    failed = next(e for e in events if e["outcome"]["code"]["code"] == "4")
    assert failed["action"] == "R"
    async with http.get(f"{proxy.admin_url}/fhir/AuditEvent?patient={patient['id']}") as r:
        found = await r.json(content_type=None)
    assert found["total"] == 2, "R5 events are searchable by patient in the local store"
