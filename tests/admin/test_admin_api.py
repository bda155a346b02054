"""The admin listener as an auditor meets it: FHIR search over the local store with paging,
the Smile-style audit-log, health, metrics, the dead-letter queue and the CLI over it."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import yaml

from proxy.admin.access import is_admin_access
from tests.factories import (
    FhirDouble,
    RunningProxy,
    StartProxy,
    audit_event_pages,
    guide_event,
    serving,
    unsigned_jwt,
)

ADMIN_TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Populated:
    proxy: RunningProxy
    patients: list[str]
    """``Patient/{id}`` of the patients created, in order."""
    before_reads: str
    """An instant after the proxied traffic and before any admin read (which is itself
    audited): ``date=lt{before_reads}`` selects the proxied events only."""


@pytest.fixture
async def populated(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> AsyncIterator[Populated]:
    """A proxy with an admin token and a few real events: 3 creates by alice, 3 reads by
    bob, one failed read (404) by bob."""
    proxy = await start_proxy(fhir_double, admin={"tokens": [ADMIN_TOKEN]})
    alice = {"Authorization": f"Bearer {unsigned_jwt({'sub': 'alice', 'iss': 'https://idp'})}"}
    bob = {"Authorization": f"Bearer {unsigned_jwt({'sub': 'bob', 'iss': 'https://idp'})}"}
    patients: list[str] = []
    for family in ("Ana", "Ben", "Cy"):
        async with http.post(
            f"{proxy.url}/Patient",
            json={"resourceType": "Patient", "name": [{"family": family}]},
            headers=alice,
        ) as r:
            assert r.status == 201
            patients.append(f"Patient/{(await r.json(content_type=None))['id']}")
    for ref in patients:
        async with http.get(f"{proxy.url}/{ref}", headers=bob) as r:
            assert r.status == 200
    async with http.get(f"{proxy.url}/Patient/does-not-exist", headers=bob) as r:
        assert r.status == 404
    await asyncio.sleep(0.002)  # events are recorded to the millisecond
    cutoff = quote(datetime.now(UTC).isoformat(timespec="milliseconds"))
    await asyncio.sleep(0.002)
    yield Populated(proxy=proxy, patients=patients, before_reads=cutoff)


async def search(http: aiohttp.ClientSession, url: str, status: int = 200) -> dict[str, Any]:
    async with http.get(url, headers=AUTH) as r:
        assert r.status == status, await r.text()
        body: dict[str, Any] = await r.json(content_type=None)
        return body


async def test_search_pages_through_every_event_newest_first(
    populated: Populated, http: aiohttp.ClientSession
) -> None:
    admin = populated.proxy.admin_url
    proxied = f"date=lt{populated.before_reads}"
    seen: list[dict[str, Any]] = []
    pages = 0
    async for page in audit_event_pages(http, f"{admin}/fhir/AuditEvent?_count=2&{proxied}", AUTH):
        assert page["resourceType"] == "Bundle" and page["type"] == "searchset"
        assert page["total"] == 7
        assert len(page["entry"]) <= 2
        seen.extend(e["resource"] for e in page["entry"])
        pages += 1
    assert pages == 4
    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)) == 7, "paging neither repeats nor skips"
    recorded = [e["recorded"] for e in seen]
    assert recorded == sorted(recorded, reverse=True), "_sort=-date is the default"
    oldest_first = await search(http, f"{admin}/fhir/AuditEvent?_sort=date&_count=100&{proxied}")
    assert [e["resource"]["id"] for e in oldest_first["entry"]] == ids[::-1]


async def test_search_parameters_narrow_the_result(
    populated: Populated, http: aiohttp.ClientSession
) -> None:
    admin = populated.proxy.admin_url
    first = populated.patients[0]
    proxied = f"date=lt{populated.before_reads}"

    def ids(bundle: dict[str, Any]) -> list[str]:
        return [e["resource"]["id"] for e in bundle.get("entry", [])]

    by_patient = await search(http, f"{admin}/fhir/AuditEvent?patient={first}&{proxied}")
    assert by_patient["total"] == 2, "the create and the read of that patient"
    for event in (e["resource"] for e in by_patient["entry"]):
        assert any(en.get("what", {}).get("reference") == first for en in event["entity"])
    bare_id = await search(http, f"{admin}/fhir/AuditEvent?patient={first.split('/')[1]}&{proxied}")
    assert ids(bare_id) == ids(by_patient), "a bare id means a Patient"

    creates = await search(http, f"{admin}/fhir/AuditEvent?action=C")
    assert creates["total"] == 3
    assert {e["resource"]["action"] for e in creates["entry"]} == {"C"}
    reads = await search(http, f"{admin}/fhir/AuditEvent?subtype=read")
    assert reads["total"] == 4
    failed = await search(http, f"{admin}/fhir/AuditEvent?outcome=4")
    assert failed["total"] == 1 and failed["entry"][0]["resource"]["outcome"] == "4"
    assert (await search(http, f"{admin}/fhir/AuditEvent?agent=alice"))["total"] == 3
    assert (await search(http, f"{admin}/fhir/AuditEvent?agent=bob&outcome=0"))["total"] == 3

    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (await search(http, f"{admin}/fhir/AuditEvent?date=ge{hour_ago}&{proxied}"))[
        "total"
    ] == 7
    assert (await search(http, f"{admin}/fhir/AuditEvent?date=lt2000"))["total"] == 0
    year = datetime.now(UTC).year
    assert (await search(http, f"{admin}/fhir/AuditEvent?date={year}&{proxied}"))["total"] == 7


@pytest.mark.parametrize(
    "query",
    [
        "nonsense=1",
        "_count=abc",
        "_count=-1",
        "_sort=outcome",
        "date=yesterday",
        "_getpagesoffset=x",
    ],
)
async def test_bad_search_is_a_400_operation_outcome(
    populated: Populated, http: aiohttp.ClientSession, query: str
) -> None:
    body = await search(http, f"{populated.proxy.admin_url}/fhir/AuditEvent?{query}", 400)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"


async def test_read_one_event_or_404(populated: Populated, http: aiohttp.ClientSession) -> None:
    admin = populated.proxy.admin_url
    newest = (await search(http, f"{admin}/fhir/AuditEvent?_count=1"))["entry"][0]["resource"]
    assert await search(http, f"{admin}/fhir/AuditEvent/{newest['id']}") == newest
    missing = await search(http, f"{admin}/fhir/AuditEvent/not-there", 404)
    assert missing["resourceType"] == "OperationOutcome"


async def test_admin_needs_the_token_but_probes_do_not(
    populated: Populated, http: aiohttp.ClientSession
) -> None:
    admin = populated.proxy.admin_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
        async with http.get(f"{admin}/fhir/AuditEvent", headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(f"{admin}{path}") as r:
            assert r.status == 200, (path, await r.text())
    async with http.get(f"{admin}/metrics") as r:
        text = await r.text()
    assert 'fhir_audit_queue_events{status="pending"}' in text
    assert ADMIN_TOKEN not in text


async def test_readyz_is_not_ready_when_the_upstream_is_down_or_the_store_full(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """``/readyz`` answers 503 and names the failing check; ``/healthz`` stays 200 (the
    process is alive, restarting it would not help)."""
    async with serving() as gone:
        down_url = str(gone.make_url("/fhir"))
    down = await start_proxy(down_url)
    async with http.get(f"{down.admin_url}/readyz") as r:
        assert r.status == 503
        report = await r.json(content_type=None)
    assert report["ready"] is False
    assert report["checks"]["upstream"]["ok"] is False
    assert report["checks"]["store"]["ok"] is True
    async with http.get(f"{down.admin_url}/healthz") as r:
        assert r.status == 200

    full = await start_proxy(fhir_double, store={"max_bytes": 1})
    async with http.get(f"{full.admin_url}/readyz") as r:
        assert r.status == 503
        report = await r.json(content_type=None)
    assert report["ready"] is False
    assert report["checks"]["store"]["ok"] is False
    assert report["checks"]["upstream"]["ok"] is True


async def test_audit_log_like_smile_cdr(populated: Populated, http: aiohttp.ClientSession) -> None:
    admin = populated.proxy.admin_url
    page0 = await search(http, f"{admin}/audit-log?userId=bob&pageSize=3&pageIndex=0")
    page1 = await search(http, f"{admin}/audit-log?userId=bob&pageSize=3&pageIndex=1")
    assert page0["total"] == page1["total"] == 4
    assert len(page0["audit-events"]) == 3 and len(page1["audit-events"]) == 1
    assert {e["userId"] for e in page0["audit-events"] + page1["audit-events"]} == {"bob"}
    one = page0["audit-events"][0]
    detail = await search(http, f"{admin}/audit-log/event/{one['id']}?includeBody=true")
    assert detail["body"]["resourceType"] == "AuditEvent" and detail["body"]["id"] == one["id"]
    plain = await search(http, f"{admin}/audit-log/event/{one['id']}")
    assert "body" not in plain
    today = datetime.now(UTC).date().isoformat()
    window = await search(http, f"{admin}/audit-log?from={today}&to={populated.before_reads}")
    assert window["total"] == 7
    assert (await search(http, f"{admin}/audit-log?from=never", 400))["resourceType"] == (
        "OperationOutcome"
    )


async def test_dead_letters_listed_and_retried_over_http(
    populated: Populated, http: aiohttp.ClientSession
) -> None:
    admin = populated.proxy.admin_url
    queue = populated.proxy.queue
    claimed = await queue.claim(100, datetime.now(UTC))
    await queue.dead_letter([claimed[0].seq, claimed[1].seq], "400 Bad Request: invalid")
    async with http.get(f"{admin}/dlq", headers=AUTH) as r:
        dead = await r.json(content_type=None)
    assert [d["seq"] for d in dead] == [claimed[0].seq, claimed[1].seq]
    assert dead[0]["lastError"].startswith("400")
    listed = [
        base64.b64decode(en["query"])
        for e in await populated.proxy.stored_events()
        if is_admin_access(e)
        for en in e["entity"]
        if "query" in en
    ]
    assert any(q.startswith(b"GET /dlq") for q in listed), "reading dead letters is audited"
    async with http.post(f"{admin}/dlq/retry", data=b"[1,2]", headers=AUTH) as r:
        assert r.status == 400
    async with http.post(f"{admin}/dlq/retry", json={"seqs": [claimed[0].seq]}, headers=AUTH) as r:
        assert (await r.json(content_type=None)) == {"requeued": 1}
    async with http.get(f"{admin}/dlq", headers=AUTH) as r:
        assert [d["seq"] for d in await r.json(content_type=None)] == [claimed[1].seq]
    assert (await queue.stats()).dead == 1


async def test_dlq_cli_lists_and_requeues(
    populated: Populated, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """``fhir-audit-proxy dlq list|retry`` on the store file; WAL lets it run beside the
    proxy."""
    queue = populated.proxy.queue
    claimed = await queue.claim(100, datetime.now(UTC))
    seqs = [c.seq for c in claimed[:3]]
    await queue.dead_letter(seqs, "422 Unprocessable: bad coding")
    config = tmp_path / "cli.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstream": {"url": "http://127.0.0.1:1/fhir"},
                "store": {"path": str(populated.proxy.settings.store.path)},
            }
        )
    )

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "-c", str(config), "dlq", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        return done.stdout

    listed = [orjson.loads(line) for line in cli("list").splitlines()]
    assert [row["seq"] for row in listed] == seqs
    assert all(row["error"].startswith("422") for row in listed)
    assert cli("retry", "--seq", str(seqs[0])).strip() == "requeued 1 event(s)"
    assert cli("retry").strip() == "requeued 2 event(s)"
    assert cli("list") == ""
    stats = await queue.stats()
    assert stats.dead == 0


async def test_admin_answers_are_neither_sniffed_nor_kept_nor_framed_nor_pointed_by_host(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Every API answer says ``nosniff`` and ``no-store``; the viewer may not be framed;
    links, ``fullUrl`` and ``Location`` use ``admin.public_url`` (else the address the
    client connected to), never the ``Host`` header."""
    plain = await start_proxy(fhir_double, admin={"tokens": [ADMIN_TOKEN]})
    public = await start_proxy(
        fhir_double,
        admin={"tokens": [ADMIN_TOKEN], "public_url": "https://audit.example.org/"},
    )
    for proxy in (plain, public):
        async with http.get(f"{proxy.url}/metadata") as r:
            assert r.status == 200
    evil = AUTH | {"Host": "evil.example"}
    event = guide_event()
    for proxy, base in ((plain, plain.admin_url), (public, "https://audit.example.org")):
        async with http.get(f"{proxy.admin_url}/fhir/AuditEvent?_count=1", headers=evil) as r:
            assert r.status == 200
            bundle = await r.json(content_type=None)
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Cache-Control"] == "no-store"
        urls = [link["url"] for link in bundle["link"]] + [e["fullUrl"] for e in bundle["entry"]]
        assert urls and all(u.startswith(f"{base}/fhir/AuditEvent") for u in urls), urls
        async with http.post(
            f"{proxy.admin_url}/fhir/AuditEvent",
            json=event,
            headers=evil | {"Content-Type": "application/fhir+json"},
        ) as r:
            assert r.status == 201
            assert r.headers["Location"].startswith(f"{base}/fhir/AuditEvent/")
    for path, headers in (("/fhir/AuditEvent/nope", AUTH), ("/api/queue", {}), ("/readyz", {})):
        async with http.get(f"{plain.admin_url}{path}", headers=headers) as r:
            assert r.status in (200, 401, 404)
            assert r.headers["X-Content-Type-Options"] == "nosniff", path
            assert r.headers["Cache-Control"] == "no-store", path
    async with http.get(f"{plain.admin_url}/ui/") as r:
        assert r.status == 200
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
