"""The search API the viewer and the products' guides need: agent (user id, client id, name
or address), entity, entity-type, type, address, resource type, request id, _lastUpdated,
_elements, _summary=count, Aidbox's _sort=-createdAt, keyset next/previous links, Smile
CDR's /audit-log parameters, and stores from before the search index."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from proxy.admin.access import is_admin_access
from proxy.store.codec import BodyCodec, dictionary_id, shipped_dictionary
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery
from proxy.store.schema import MIGRATIONS, split_statements
from tests.factories import (
    FhirDouble,
    RunningProxy,
    StartProxy,
    audit_event,
    patient_refs,
    profile,
    unsigned_jwt,
)


@dataclass
class Traffic:
    proxy: RunningProxy
    patient: str
    observation: str
    before_reads: str


@pytest.fixture
async def traffic(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> AsyncIterator[Traffic]:
    """alice (client ehr-app) creates a patient and an observation; bob reads both."""
    proxy = await start_proxy(fhir_double)
    alice = {
        "Authorization": "Bearer "
        + unsigned_jwt({"sub": "alice", "name": "Alice Adams", "client_id": "ehr-app"}),
    }
    bob = {"Authorization": f"Bearer {unsigned_jwt({'sub': 'bob'})}"}
    async with http.post(
        f"{proxy.url}/Patient",
        json={"resourceType": "Patient"},
        headers=alice | {"X-Request-Id": "req-alice-create-0001"},
    ) as r:
        patient = f"Patient/{(await r.json(content_type=None))['id']}"
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": patient},
    }
    async with http.post(f"{proxy.url}/Observation", json=obs, headers=alice) as r:
        observation = f"Observation/{(await r.json(content_type=None))['id']}"
    for ref in (patient, observation):
        async with http.get(f"{proxy.url}/{ref}", headers=bob) as r:
            assert r.status == 200
    await asyncio.sleep(0.002)  # events are recorded to the millisecond
    cutoff = quote(datetime.now(UTC).isoformat(timespec="milliseconds"))
    await asyncio.sleep(0.002)
    yield Traffic(proxy, patient, observation, cutoff)


async def fetch(http: aiohttp.ClientSession, url: str, status: int = 200) -> dict[str, Any]:
    async with http.get(url) as r:
        assert r.status == status, await r.text()
        body: dict[str, Any] = await r.json(content_type=None)
        return body


def actions(bundle: dict[str, Any]) -> list[str]:
    return sorted(e["resource"]["action"] for e in bundle["entry"])


async def test_every_search_parameter_narrows(
    traffic: Traffic, http: aiohttp.ClientSession
) -> None:
    base = f"{traffic.proxy.admin_url}/fhir/AuditEvent?date=lt{traffic.before_reads}&"

    async def total(query: str) -> int:
        body = await fetch(http, base + query)
        return int(body["total"])

    assert await total("") == 4
    assert await total("agent=alice") == 2, "user id"
    assert await total("agent=ehr-app") == 2, "client id"
    assert await total("agent=Alice%20Adams") == 2, "name"
    assert await total("agent=127.0.0.1") == 4, "network address"
    assert await total("address=127.0.0.1") == 4
    assert await total("agent=nobody") == 0
    assert await total(f"entity={traffic.observation}") == 2
    assert await total(f"entity={traffic.patient}") == 4, "the patient entity of all four"
    assert await total("resource-type=Observation") == 2
    assert await total("entity-type=2") == 4
    assert await total("entity-type=9") == 0
    # R4's AuditEventEntityType holds resource types too: the entity's type is searched.
    assert await total("entity-type=Observation") == 2
    assert await total("entity-type=Observation&resource-type=Observation") == 2
    assert await total("type=rest") == 4
    assert await total("type=110100") == 0
    assert await total("request-id=alice-create") == 1
    assert await total("request-id=%25") == 0, "LIKE wildcards are taken literally"
    assert await total("agent=bob&resource-type=Observation") == 1
    assert await total(f"patient={traffic.patient}&agent=alice") == 2
    hour_ago = quote((datetime.now(UTC) - timedelta(hours=1)).isoformat())
    assert await total(f"_lastUpdated=ge{hour_ago}") == 4
    assert await total("_lastUpdated=lt2000") == 0


async def test_elements_summary_count_and_aidbox_sort(
    traffic: Traffic, http: aiohttp.ClientSession
) -> None:
    admin = traffic.proxy.admin_url
    proxied = f"date=lt{traffic.before_reads}"
    subset = await fetch(http, f"{admin}/fhir/AuditEvent?_elements=action,recorded&{proxied}")
    for entry in subset["entry"]:
        assert set(entry["resource"]) == {"resourceType", "id", "meta", "action", "recorded"}
        assert entry["resource"]["meta"]["tag"][-1]["code"] == "SUBSETTED"
    count = await fetch(http, f"{admin}/fhir/AuditEvent?_summary=count&{proxied}")
    assert count["total"] == 4 and count["entry"] == []
    # Aidbox's guide, as written:
    newest = await fetch(http, f"{admin}/fhir/AuditEvent?_sort=-createdAt")
    oldest = await fetch(http, f"{admin}/fhir/AuditEvent?_sort=createdAt&{proxied}")
    assert [e["resource"]["action"] for e in oldest["entry"]] == ["C", "C", "R", "R"]
    stored_last = [e["resource"]["id"] for e in newest["entry"] if e["resource"]["action"] == "R"]
    assert stored_last[0] == oldest["entry"][-1]["resource"]["id"]
    lu = await fetch(http, f"{admin}/fhir/AuditEvent?_sort=-_lastUpdated&{proxied}")
    assert [e["resource"]["id"] for e in lu["entry"]] == [
        e["resource"]["id"] for e in reversed(oldest["entry"])
    ]
    bad = await fetch(http, f"{admin}/fhir/AuditEvent?_summary=text", 400)
    assert bad["resourceType"] == "OperationOutcome"
    await fetch(http, f"{admin}/fhir/AuditEvent?_cursor=zzz", 400)


async def test_counting_a_patients_events_is_a_read_of_them_audited_as_such(
    traffic: Traffic, http: aiohttp.ClientSession
) -> None:
    """``_summary=count&patient=X`` discloses how many events X has: when it finds any, it
    commits an admin-access PatientQuery naming X, as the search returning them would;
    when it finds none, nothing (as an empty page is not recorded)."""
    admin = traffic.proxy.admin_url

    async def access_events() -> list[dict[str, Any]]:
        return [e for e in await traffic.proxy.stored_events() if is_admin_access(e)]

    count = await fetch(http, f"{admin}/fhir/AuditEvent?_summary=count&patient={traffic.patient}")
    assert count["total"] == 4 and count["entry"] == []
    (access,) = await access_events()
    assert access["subtype"][0]["code"] == "search-type"
    assert profile(access) == "PatientQuery"
    assert patient_refs(access) == [traffic.patient]
    query = next(e for e in access["entity"] if e.get("role", {}).get("code") == "24")
    assert "_summary=count" in base64.b64decode(query["query"]).decode()
    none = await fetch(http, f"{admin}/fhir/AuditEvent?_summary=count&patient=Patient/nobody")
    assert none["total"] == 0
    assert await access_events() == [access], "a count that finds nothing discloses nothing"


async def test_keyset_links_walk_forward_and_back(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    # Several events share a recorded instant: the seq breaks the tie.
    events = [
        audit_event(i, recorded=(t0 + timedelta(seconds=i // 3)).isoformat()) for i in range(11)
    ]
    await proxy.queue.append(events)
    url: str | None = f"{proxy.admin_url}/fhir/AuditEvent?_count=3&date=lt2026-06"
    pages: list[list[str]] = []
    last: dict[str, Any] = {}
    while url:
        assert "_getpagesoffset" not in url
        last = await fetch(http, url)
        pages.append([e["resource"]["id"] for e in last["entry"]])
        url = next((lk["url"] for lk in last["link"] if lk["relation"] == "next"), None)
    assert [len(p) for p in pages] == [3, 3, 3, 2]
    flat = [i for p in pages for i in p]
    assert flat == [e["id"] for e in reversed(events)], "newest first, seq breaking ties"
    back: list[list[str]] = []
    prev: str | None = next(lk["url"] for lk in last["link"] if lk["relation"] == "previous")
    while prev:
        assert "_cursor=p" in prev
        body = await fetch(http, prev)
        back.append([e["resource"]["id"] for e in body["entry"]])
        prev = next((lk["url"] for lk in body["link"] if lk["relation"] == "previous"), None)
    assert back == pages[-2::-1], "back to the first page, which has no previous link"
    first = await fetch(http, f"{proxy.admin_url}/fhir/AuditEvent?_count=3&date=lt2026-06")
    assert [lk["relation"] for lk in first["link"]] == ["self", "next"]


async def test_audit_log_takes_smile_cdr_parameters(
    traffic: Traffic, http: aiohttp.ClientSession
) -> None:
    admin = traffic.proxy.admin_url
    today = datetime.now(UTC).date().isoformat()
    body = await fetch(
        http,
        f"{admin}/audit-log?moduleId=fhir-audit-proxy&userId=bob&from={today}&to={today}"
        "&pageIndex=0&pageSize=1",
    )
    assert body["pageIndex"] == 0 and body["pageSize"] == 1 and body["total"] == 2
    (event,) = body["audit-events"]
    assert event["userId"] == "bob" and event["typeCode"] == "rest"
    assert event["remoteAddress"] == "127.0.0.1"
    assert event["timestamp"] == event["recorded"]


async def test_audit_log_never_widens_a_query_it_cannot_answer(
    traffic: Traffic, http: aiohttp.ClientSession
) -> None:
    """A module id this proxy is not, or a parameter it does not know, is a 400: never
    every event of the store, as if the filter had not been given."""
    admin = traffic.proxy.admin_url
    refused = await fetch(http, f"{admin}/audit-log?moduleId=clustermgr&userId=bob", 400)
    assert "fhir-audit-proxy" in refused["issue"][0]["diagnostics"]
    await fetch(http, f"{admin}/audit-log?userid=bob", 400)
    own = await fetch(http, f"{admin}/audit-log?moduleId=fhir-audit-proxy&userId=bob")
    assert own["total"] == 2


async def test_a_store_from_before_the_index_is_searchable_after_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:2]:
        for statement in split_statements(migration):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    shipped = shipped_dictionary()
    conn.execute(
        "INSERT INTO dictionaries (id, data) VALUES (?, ?)", (dictionary_id(shipped), shipped)
    )
    codec = BodyCodec(shipped, {dictionary_id(shipped): shipped})
    old = audit_event(1, recorded="2026-02-01T10:00:00+00:00")
    conn.execute(
        "INSERT INTO events (event_id, recorded, recorded_ts, patients, user_id, body)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            old["id"],
            old["recorded"],
            datetime.fromisoformat(old["recorded"]).timestamp(),
            "|Patient/p1|Patient/p2|",
            "carol",
            codec.encode(old),
        ),
    )
    conn.close()
    queue = await AuditQueue.open(path, max_bytes=1 << 30)
    try:
        for query in (
            EventQuery(patient="Patient/p2"),
            EventQuery(agent="carol"),
            EventQuery(patient="Patient/p1", agent="carol"),
        ):
            items, total = await queue.search(query)
            assert total == 1 and items[0].event_id == old["id"], query
        await queue.prune(datetime(2030, 1, 1, tzinfo=UTC), timedelta(0))
    finally:
        await queue.close()


async def test_a_search_about_several_patients_is_read_back_one_event_per_patient(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Its events are stored as one row (proxy/store/fans.py): the admin API still finds,
    reads, pages and counts each as its own."""
    proxy = await start_proxy(fhir_double)
    family = f"Fan{datetime.now(UTC).timestamp():.0f}"
    made = [
        fhir_double.create({"resourceType": "Patient", "name": [{"family": family}]})
        for _ in range(3)
    ]
    doctor = {"Authorization": f"Bearer {unsigned_jwt({'sub': 'dr-fan'})}"}
    async with http.get(f"{proxy.url}/Patient", params={"family": family}, headers=doctor) as r:
        assert r.status == 200
    with sqlite3.connect(proxy.settings.store.path) as conn:
        assert conn.execute("SELECT fan FROM events WHERE fan IS NOT NULL").fetchall() == [(3,)]
    admin = f"{proxy.admin_url}/fhir/AuditEvent"
    ids = []
    for patient in made:
        body = await fetch(http, f"{admin}?patient=Patient/{patient['id']}")
        assert body["total"] == 1
        (entry,) = body["entry"]
        event = entry["resource"]
        named = [e.get("what", {}).get("reference") for e in event["entity"]]
        assert [r for r in named if r and r.startswith("Patient/")] == [f"Patient/{patient['id']}"]
        assert await fetch(http, f"{admin}/{event['id']}") == event
        assert (await fetch(http, f"{proxy.admin_url}/audit-log/event/{event['id']}"))["id"] == (
            event["id"]
        )
        ids.append(event["id"])
    assert len(set(ids)) == 3
    pages: list[str] = []
    url: str | None = f"{admin}?agent=dr-fan&_count=2"
    while url:
        body = await fetch(http, url)
        assert body["total"] == 3
        pages += [e["resource"]["id"] for e in body["entry"]]
        url = next((lk["url"] for lk in body["link"] if lk["relation"] == "next"), None)
    assert sorted(pages) == sorted(ids) and len(pages) == 3
