"""A DELETE names the patient of the resource it removes: the proxy reads the resource
first (``audit.read_before_delete``), because FHIR servers answer a delete without it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.audit.intents import build_unknown_outcome_events, intent_summary
from tests.factories import (
    NOW,
    NodeFhirServer,
    StartProxy,
    context,
    exchange,
    patient_refs,
    profile,
    serving,
)

Seen = list[dict[str, Any]]


async def _deletes(proxy: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in await proxy.stored_events()
        if any(c.get("code") == "delete" for c in e.get("subtype", []))
    ]


async def test_a_delete_names_the_patient_of_the_resource_it_removes(
    fhir_server: NodeFhirServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_server.base_url)
    async with http.post(f"{proxy.url}/Patient", json={"resourceType": "Patient"}) as r:
        pid = (await r.json(content_type=None))["id"]
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "pulse"},
        "subject": {"reference": f"Patient/{pid}"},
    }
    async with http.post(f"{proxy.url}/Observation", json=obs) as r:
        oid = (await r.json(content_type=None))["id"]
    async with http.delete(f"{proxy.url}/Observation/{oid}") as r:
        assert r.status in (200, 204)
    async with http.get(f"{fhir_server.base_url}/Observation/{oid}") as r:
        assert r.status in (404, 410), "the delete itself went through"
    (deleted,) = await _deletes(proxy)
    assert profile(deleted) == "PatientDelete"
    assert patient_refs(deleted) == [f"Patient/{pid}"]
    assert deleted["outcome"] == "0"


async def test_read_before_delete_can_be_turned_off(
    fhir_server: NodeFhirServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_server.base_url, audit={"read_before_delete": False})
    async with http.post(f"{proxy.url}/Patient", json={"resourceType": "Patient"}) as r:
        pid = (await r.json(content_type=None))["id"]
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    obs["subject"] = {"reference": f"Patient/{pid}"}
    async with http.post(f"{proxy.url}/Observation", json=obs) as r:
        oid = (await r.json(content_type=None))["id"]
    async with http.delete(f"{proxy.url}/Observation/{oid}") as r:
        assert r.status in (200, 204)
    (deleted,) = await _deletes(proxy)
    assert profile(deleted) == "Delete" and patient_refs(deleted) == []


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, Seen]]:
    """An upstream that records every request. ``Observation/mine`` belongs to
    Patient/p9 (``Observation/big`` too, in 300 KB); ``Observation/gone`` is 404,
    ``Observation/secret`` 403, ``Observation/odd`` answers with a Patient and
    ``Observation/text`` with no JSON."""
    seen: Seen = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": CIMultiDict(request.headers),
            }
        )
        name = request.match_info["tail"].rsplit("/", 1)[-1]
        if request.method == "DELETE":
            return web.json_response(
                {"resourceType": "OperationOutcome", "issue": [{"severity": "information"}]}
            )
        if name == "gone":
            return web.json_response({"resourceType": "OperationOutcome"}, status=404)
        if name == "secret":
            return web.json_response({"resourceType": "OperationOutcome"}, status=403)
        if name == "odd":
            return web.json_response({"resourceType": "Patient", "id": "p1"})
        if name == "text":
            return web.Response(text="not json")
        padding = "x" * 300_000 if name == "big" else ""  # arrives in many reads
        return web.json_response(
            {
                "resourceType": "Observation",
                "id": name,
                "note": [{"text": padding}],
                "subject": {"reference": "Patient/p9"},
            }
        )

    async with serving(("*", "/{tail:.*}", handle)) as server:
        yield str(server.make_url("/fhir")), seen


async def test_the_read_carries_the_callers_credentials_and_no_preconditions(
    upstream: tuple[str, Seen], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url, seen = upstream
    proxy = await start_proxy(url)
    token = "caller-" + "t" * 60  # opaque: events keep its last 32 characters at most
    headers = {"Authorization": f"Bearer {token}", "If-Match": 'W/"3"', "Accept": "*/*"}
    async with http.delete(f"{proxy.url}/Observation/mine", headers=headers) as r:
        assert r.status == 200
    read, delete = seen
    assert (read["method"], read["path"]) == ("GET", "/fhir/Observation/mine")
    assert read["headers"]["Authorization"] == f"Bearer {token}"
    assert read["headers"]["Accept"] == "application/fhir+json"
    assert "If-Match" not in read["headers"], "a precondition of the delete must not fail the read"
    assert (delete["method"], delete["path"]) == ("DELETE", "/fhir/Observation/mine")
    assert delete["headers"]["If-Match"] == 'W/"3"', "the delete itself is unchanged"
    assert read["headers"]["X-Request-Id"] == delete["headers"]["X-Request-Id"]
    (deleted,) = await _deletes(proxy)
    assert patient_refs(deleted) == ["Patient/p9"] and profile(deleted) == "PatientDelete"
    assert token not in orjson.dumps(deleted).decode()


async def test_a_large_resource_is_read_whole(
    upstream: tuple[str, Seen], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url, _ = upstream
    proxy = await start_proxy(url)
    async with http.delete(f"{proxy.url}/Observation/big") as r:
        assert r.status == 200
    (deleted,) = await _deletes(proxy)
    assert patient_refs(deleted) == ["Patient/p9"]


@pytest.mark.parametrize("name", ["gone", "secret", "odd", "text"])
async def test_a_failed_or_odd_read_leaves_the_delete_as_it_was(
    name: str, upstream: tuple[str, Seen], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url, seen = upstream
    proxy = await start_proxy(url)
    async with http.delete(f"{proxy.url}/Observation/{name}") as r:
        assert r.status == 200
    assert [s["method"] for s in seen] == ["GET", "DELETE"]
    (deleted,) = await _deletes(proxy)
    assert profile(deleted) == "Delete" and patient_refs(deleted) == []


async def test_an_unreachable_read_does_not_block_the_delete(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy("http://127.0.0.1:9/fhir")
    async with http.delete(f"{proxy.url}/Observation/1") as r:
        assert r.status == 502, "the delete was tried and failed on its own"
    (deleted,) = await _deletes(proxy)
    assert deleted["outcome"] != "0" and patient_refs(deleted) == []


@pytest.mark.parametrize(
    "target",
    ["Patient/p9", "Observation?code=1234", "ValueSet/vs1"],
    ids=["patient-itself", "conditional", "not-in-patient-compartment"],
)
async def test_no_read_where_it_cannot_help(
    target: str, upstream: tuple[str, Seen], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url, seen = upstream
    proxy = await start_proxy(url)
    async with http.delete(f"{proxy.url}/{target}") as r:
        assert r.status == 200
    assert [s["method"] for s in seen] == ["DELETE"]


def test_an_interrupted_delete_still_names_the_patient_read_before_it() -> None:
    ex = exchange("DELETE", "Observation/mine", status=None)
    ex.prior_patients = ("Patient/p9",)
    summary = orjson.loads(orjson.dumps(intent_summary(ex)))
    assert summary["patients"] == ["Patient/p9"]
    (built,) = build_unknown_outcome_events(summary, context(), NOW)
    event = built.event
    assert event["outcome"] == "8" and patient_refs(event) == ["Patient/p9"]
