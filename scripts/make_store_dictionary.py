"""Trains the zstd dictionary the store compresses event bodies with (proxy/store/events.zdict).

The samples are events this proxy builds, R4 and R5, for the interactions it audits: reads,
searches with and without patients, writes, operations, batches, failures, outcome-unknown
events, with and without a bearer token. Host names, ids and dates here differ from the
benchmark's, so bench/bench_store.py measures a dictionary that has not seen its event.

Run after the event builder changes what every event carries:

    python scripts/make_store_dictionary.py

Stores keep every dictionary they were written with (table ``dictionaries``), so a new
dictionary never makes old rows unreadable.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import orjson
import zstandard

from proxy.audit.balp import AuditContext, build_events
from proxy.audit.identity import identity_from_headers
from proxy.audit.intents import build_unknown_outcome_events, intent_summary
from proxy.exchange import Exchange
from proxy.fhir.interaction import classify
from proxy.settings import IdentitySettings

OUT = Path(__file__).resolve().parent.parent / "proxy/store/events.zdict"
SIZE = 16 * 1024
"""16 KiB: measured ~150-byte events (from ~2.6 KB); a larger one gained little."""


def _exchange(rng: random.Random, method: str, path: str, **kw: Any) -> Exchange:
    headers = {"accept": "application/fhir+json", "user-agent": rng.choice(["curl/8", "app/2"])}
    if rng.random() < 0.7:
        claims = {
            "sub": f"user-{rng.randint(1, 9999)}",
            "iss": rng.choice(["https://idp.hospital.test/realms/ehr", "https://login.test"]),
            "client_id": f"client-{rng.randint(1, 50)}",
            "jti": f"{rng.getrandbits(64):x}",
            "purpose_of_use": "TREAT",
        }
        headers["authorization"] = "Bearer " + jwt.encode(claims, "k" * 32, "HS256")
    body = kw.pop("body", None)
    raw = orjson.dumps(body) if body is not None else None
    if raw is not None:
        headers["content-type"] = "application/fhir+json"
    response = kw.pop("response", None)
    started = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 10**8))
    query = kw.pop("query", "")
    ex = Exchange(
        request_id=f"{rng.getrandbits(128):032x}",
        method=method,
        path=path,
        query_string=query,
        request_headers=headers,
        client_address=rng.choice(["172.16.4.20", "10.244.1.17", "fd00::1:2"]),
        started_at=started,
        base_url=rng.choice(["http://hapi:8080/fhir", "https://fhir.hospital.test/r4"]),
        request_body=raw,
        request_content_type=headers.get("content-type", ""),
        status=kw.pop("status", 200),
        response_headers=kw.pop("response_headers", {"content-type": "application/fhir+json"}),
        response_body=orjson.dumps(response) if response is not None else None,
        error=kw.pop("error", None),
        finished_at=started + timedelta(milliseconds=rng.randint(1, 900)),
    )
    ex.interaction = classify(method, path, query, headers, raw)
    ex.identity = identity_from_headers(headers, IdentitySettings())
    return ex


def _exchanges(rng: random.Random) -> list[Exchange]:
    pid = str(rng.randint(1, 10**6))
    other = str(rng.randint(1, 10**6))
    patient = {"resourceType": "Patient", "id": pid, "meta": {"versionId": "4"}}
    obs = {"resourceType": "Observation", "id": "o1", "subject": {"reference": f"Patient/{pid}"}}
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found", "diagnostics": "Resource not found"}],
    }
    searchset = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": obs}]}
    tx = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": f"Patient/{other}"}},
        ],
    }
    tx_response = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {"response": {"status": "201 Created", "location": "Observation/o2/_history/1"}},
            {"response": {"status": "200 OK"}, "resource": patient},
        ],
    }
    return [
        _exchange(rng, "GET", f"Patient/{pid}", response=patient),
        _exchange(rng, "GET", f"Patient/{pid}/_history/4", response=patient),
        _exchange(rng, "GET", "Observation", query=f"patient={pid}", response=searchset),
        _exchange(rng, "GET", "Patient", query="name=smith&_count=10", response=searchset),
        _exchange(rng, "POST", "Observation/_search", body=None, response=searchset),
        _exchange(rng, "GET", f"Patient/{pid}/Condition", response=searchset),
        _exchange(rng, "GET", f"Patient/{pid}/$everything", response=searchset),
        _exchange(rng, "GET", "metadata", response={"resourceType": "CapabilityStatement"}),
        _exchange(rng, "GET", "Patient/_history", response={"resourceType": "Bundle"}),
        _exchange(
            rng,
            "POST",
            "Observation",
            body=obs,
            status=201,
            response=obs,
            response_headers={"location": "Observation/o1/_history/1"},
        ),
        _exchange(rng, "PUT", f"Patient/{pid}", body=patient, response=patient),
        _exchange(rng, "PATCH", f"Patient/{pid}", body=[{"op": "add"}], response=patient),
        _exchange(rng, "DELETE", f"Patient/{pid}", status=204),
        _exchange(rng, "POST", "", body=tx, response=tx_response),
        _exchange(rng, "GET", f"Patient/{other}", status=404, response=outcome),
        _exchange(rng, "PUT", f"Patient/{pid}", body=patient, status=None, error="timed out"),
    ]


def samples(count: int = 40) -> list[bytes]:
    rng = random.Random(20261123)
    r4 = AuditContext.default()
    r5 = dataclasses.replace(r4, fhir_version="R5")
    out: list[bytes] = []
    for _ in range(count):
        for ex in _exchanges(rng):
            for ctx in (r4, r5):
                out.extend(b.row.body for b in build_events(ex, ctx, ex.finished_at))
                if ex.method in ("POST", "PUT", "DELETE") and ex.status is not None:
                    summary = orjson.loads(orjson.dumps(intent_summary(ex)))
                    unknown = build_unknown_outcome_events(summary, ctx, ex.finished_at)
                    out.extend(b.row.body for b in unknown)
    return out


def main() -> None:
    trained = zstandard.train_dictionary(SIZE, samples(), level=3, threads=1)
    OUT.write_bytes(trained.as_bytes())
    print(f"wrote {OUT} ({len(trained.as_bytes())} bytes, dictionary id {trained.dict_id()})")


if __name__ == "__main__":
    main()
