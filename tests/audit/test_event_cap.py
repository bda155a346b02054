"""Bounded cost per request: one request concerning 10,000 patients makes one event of
bounded size (not 10,000 copies of its query), still conformant to BALP's basic profile."""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web

from proxy.audit.validate import validate_event
from tests.factories import StartProxy, events_of, exchange, request_id_of, serving

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."


def _bundle(ids: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(ids),
        "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ids],
    }


async def _search(
    start_proxy: StartProxy, http: aiohttp.ClientSession, n: int, **audit: Any
) -> list[dict[str, Any]]:
    ids = [f"p{i}" for i in range(n)]

    async def upstream(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(_bundle(ids), content_type="application/fhir+json")

    async with serving(("*", "/{tail:.*}", upstream)) as server:
        proxy = await start_proxy(str(server.make_url("/fhir")), audit=audit)
        form = urlencode([("_id", i) for i in ids]).encode()
        async with http.post(
            f"{proxy.url}/Patient/_search",
            data=form,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Request-Id": f"many-{n}",
            },
        ) as r:
            assert r.status == 200
        return [e for e in await proxy.stored_events() if request_id_of(e) == f"many-{n}"]


async def test_a_search_naming_10000_patients_makes_one_bounded_basic_query_event(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    (event,) = await _search(start_proxy, http, 10_000)
    assert event["meta"]["profile"] == [BALP + "Query"], "PatientQuery names one patient"
    patients = [e for e in event["entity"] if e.get("role", {}).get("code") == "1"]
    assert len(patients) == 1000, "audit.max_patients_listed"
    assert patients[0]["what"]["reference"] == "Patient/p0"
    query = next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")
    assert "10000 patients, 9000 not listed" in query["description"]
    assert "request cut to 4096" in query["description"] and "sha256" in query["description"]
    assert len(base64.b64decode(query["query"])) == 4096
    assert len(orjson.dumps(event)) < 300_000, "~240 bytes per listed patient"
    assert validate_event(event, "R4") is None


async def test_up_to_the_cap_each_patient_gets_its_own_patient_query_event(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    events = await _search(start_proxy, http, 3, max_patient_events=3)
    assert len(events) == 3
    assert {e["meta"]["profile"][0] for e in events} == {BALP + "PatientQuery"}
    (capped,) = await _search(start_proxy, http, 4, max_patient_events=3)
    assert capped["meta"]["profile"] == [BALP + "Query"]
    assert len([e for e in capped["entity"] if e.get("role", {}).get("code") == "1"]) == 4


def test_a_cut_request_gives_the_sha256_of_the_whole_request_labelled_so() -> None:
    """``entity.query`` keeps the first 4096 bytes of the request; the description gives
    the SHA-256 of all of it (what ties the event to the request a client logged; the
    kept bytes anyone can hash from ``query``), and says that is what it is."""
    query = urlencode([("_id", f"p{n}") for n in range(1000)])
    ex = exchange(
        "GET",
        "Patient",
        query=query,
        request_id="cut-1",
        response={"resourceType": "Bundle", "type": "searchset"},
    )
    (event,) = events_of(ex)
    (entity,) = [e for e in event["entity"] if e.get("role", {}).get("code") == "24"]
    whole = f"GET /fhir/Patient?{query} HTTP/1.1\r\nX-Request-Id: cut-1\r\n".encode()
    kept = base64.b64decode(entity["query"])
    assert kept == whole[:4096]
    assert (
        f" [request cut to 4096 of {len(whole)} bytes;"
        f" sha256 of all {len(whole)} bytes: {hashlib.sha256(whole).hexdigest()}]"
    ) in entity["description"]
    assert hashlib.sha256(kept).hexdigest() not in entity["description"]
