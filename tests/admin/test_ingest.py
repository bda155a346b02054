"""Ingestion on the admin listener as Auditbox's guide describes it: the guide's own
request bodies accepted with the documented changes, invalid bodies refused with nothing
stored, the store's refusal passed on, events surviving a SIGKILL right after their 201,
and ingested events reaching the repository."""

from __future__ import annotations

import asyncio
import copy
import gzip
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.admin.access import ADMIN_ACCESS_TAG, discloses, is_admin_access
from proxy.admin.ingest import INGESTED_TAG, SUBMITTER_EXT
from proxy.audit.vocabulary import TOKEN_VERIFICATION_EXT
from proxy.store.queue import AuditQueue
from tests.factories import (
    FhirDouble,
    ProxyProcess,
    RecordingRepository,
    RunningProxy,
    StartProxy,
    free_port,
    raw_status,
    request_id_of,
)

# The guide's single-event body, byte for byte as its curl example sends it.
GUIDE_SINGLE = b"""{
"resourceType": "AuditEvent",
"type": {
"system": "http://dicom.nema.org/resources/ontology/DCM",
"code": "110100",
"display": "Application Activity"
},
"action": "E",
"recorded": "2026-01-16T16:03:16Z",
"outcome": "0",
"agent": [
{
"requestor": true,
"altId": "user@example.com"
}
],
"source": {
"observer": {
"display": "My System"
}
}
}"""

# The guide's bulk body.
GUIDE_BUNDLE = b"""{
"resourceType": "Bundle",
"type": "collection",
"entry": [
{
"resource": {
"resourceType": "AuditEvent",
"type": {
"system": "http://dicom.nema.org/resources/ontology/DCM",
"code": "110100",
"display": "Application Activity"
},
"action": "E",
"recorded": "2026-01-16T16:03:16Z",
"outcome": "0",
"agent": [
{
"requestor": true,
"altId": "user@example.com"
}
],
"source": {
"observer": {
"display": "My System"
}
}
}
}
]
}"""

TOKEN = "ingest-token-for-tests"
FHIR = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def proxy(fhir_double: FhirDouble, start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy(fhir_double, admin={"tokens": [TOKEN]})


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], Any]:
    async with http.post(url, data=io.BytesIO(body), headers=headers or FHIR) as r:
        return r.status, CIMultiDict(r.headers), await r.json(content_type=None)


def without_stamps(event: dict[str, Any]) -> dict[str, Any]:
    """The event minus what ingestion adds: ``id``, ``meta``, the submitter extension."""
    rest = {k: v for k, v in event.items() if k not in ("id", "meta")}
    extensions = [e for e in rest.pop("extension", []) if e["url"] != SUBMITTER_EXT]
    if extensions:
        rest["extension"] = extensions
    return rest


async def test_the_guides_single_event_is_stored_with_the_documented_changes(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    before = datetime.now(UTC)
    sent = orjson.loads(GUIDE_SINGLE) | {"id": "client-chosen-id"}
    status, headers, body = await post(
        http, f"{proxy.admin_url}/fhir/AuditEvent", orjson.dumps(sent)
    )
    assert status == 201, body
    assert body["id"] != "client-chosen-id", "the id is replaced with a new value"
    assert datetime.fromisoformat(body["meta"]["lastUpdated"]) >= before
    assert headers["Location"] == f"{proxy.admin_url}/fhir/AuditEvent/{body['id']}/_history/1"
    assert headers["ETag"] == 'W/"1"'
    assert without_stamps(body) == {k: v for k, v in sent.items() if k != "id"}
    (submitter,) = [e for e in body["extension"] if e["url"] == SUBMITTER_EXT]
    assert submitter["valueReference"]["identifier"]["value"] == "token:1"
    stored = await proxy.queue.get_event(body["id"])
    assert stored is not None and stored.event == body
    async with http.get(
        f"{proxy.admin_url}/fhir/AuditEvent?agent=user@example.com&type=110100",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as r:
        found = await r.json(content_type=None)
    assert [e["resource"]["id"] for e in found["entry"]] == [body["id"]], "searchable at once"
    status, _, body = await post(http, f"{proxy.admin_url}/fhir/AuditEvent", GUIDE_SINGLE)
    assert status == 201 and body["action"] == "E"


async def test_the_guides_bundle_is_stored_and_answered_with_every_event(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    bundle = orjson.loads(GUIDE_BUNDLE)
    second = copy.deepcopy(bundle["entry"][0]) | {}
    second["resource"]["action"] = "R"
    bundle["entry"].append(second)
    status, _, body = await post(http, f"{proxy.admin_url}/fhir", orjson.dumps(bundle))
    assert status == 201, body
    assert body["resourceType"] == "Bundle" and body["type"] == "collection"
    assert [e["resource"]["action"] for e in body["entry"]] == ["E", "R"]
    for entry in body["entry"]:
        assert entry["fullUrl"].endswith(f"/AuditEvent/{entry['resource']['id']}")
        assert (await proxy.queue.get_event(entry["resource"]["id"])) is not None
    status, _, body = await post(http, f"{proxy.admin_url}/fhir", GUIDE_BUNDLE)
    assert status == 201 and len(body["entry"]) == 1


def post_entries(kind: str, *resources: Any) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [
                {"resource": r, "request": {"method": "POST", "url": "AuditEvent"}}
                for r in resources
            ],
        }
    )


async def test_batch_and_transaction_are_answered_as_fhir_does(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    good = orjson.loads(GUIDE_SINGLE)
    bad = {k: v for k, v in good.items() if k != "recorded"}
    url = f"{proxy.admin_url}/fhir"
    status, _, body = await post(http, url, post_entries("transaction", good, good))
    assert status == 200 and body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created"] * 2
    for entry in body["entry"]:
        assert entry["response"]["location"] == f"AuditEvent/{entry['resource']['id']}/_history/1"
    stored_before = (await proxy.queue.stats()).pending
    status, _, body = await post(http, url, post_entries("transaction", good, bad))
    assert status == 400, "a transaction is all or nothing"
    assert body["issue"][0]["expression"] == ["Bundle.entry[1]"]
    assert (await proxy.queue.stats()).pending == stored_before
    status, _, body = await post(http, url, post_entries("batch", bad, good))
    assert status == 200 and body["type"] == "batch-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["400 Bad Request", "201 Created"]
    assert "recorded" in body["entry"][0]["response"]["outcome"]["issue"][0]["diagnostics"]
    assert (await proxy.queue.stats()).pending == stored_before + 1


def r5_only(event: dict[str, Any]) -> dict[str, Any]:
    return event | {"patient": {"reference": "Patient/1"}}


GUIDE = orjson.loads(GUIDE_SINGLE)
INVALID: dict[str, tuple[str, bytes, int, str]] = {
    "wrong resourceType": (
        "/fhir/AuditEvent",
        orjson.dumps(GUIDE | {"resourceType": "Patient"}),
        400,
        "resourceType must be AuditEvent",
    ),
    "missing recorded": (
        "/fhir/AuditEvent",
        orjson.dumps({k: v for k, v in GUIDE.items() if k != "recorded"}),
        400,
        "recorded",
    ),
    "missing source": (
        "/fhir/AuditEvent",
        orjson.dumps({k: v for k, v in GUIDE.items() if k != "source"}),
        400,
        "source",
    ),
    "bad JSON": ("/fhir/AuditEvent", GUIDE_SINGLE[:-3], 400, "not valid JSON"),
    "R5-only element in R4": ("/fhir/AuditEvent", orjson.dumps(r5_only(GUIDE)), 400, "patient"),
    "bundle with a bad entry": (
        "/fhir",
        orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": GUIDE}, {"resource": r5_only(GUIDE)}],
            }
        ),
        400,
        "Bundle.entry[1]",
    ),
    "10 MB body": (
        "/fhir/AuditEvent",
        orjson.dumps(GUIDE | {"outcomeDesc": "x" * 10_000_000}),
        413,
        "larger than",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
async def test_invalid_bodies_are_refused_and_nothing_is_stored(
    proxy: RunningProxy, http: aiohttp.ClientSession, case: str
) -> None:
    path, body, status, says = INVALID[case]
    got, _, outcome = await post(http, f"{proxy.admin_url}{path}", body)
    assert got == status, outcome
    assert outcome["resourceType"] == "OperationOutcome"
    assert says in orjson.dumps(outcome).decode()
    assert (await proxy.queue.stats()).pending == 0


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/xml", "application/fhir+json; fhirVersion=5.0"],
)
async def test_content_type_and_fhir_version_rules(
    proxy: RunningProxy, http: aiohttp.ClientSession, content_type: str
) -> None:
    headers = FHIR | {"Content-Type": content_type}
    status, _, body = await post(http, f"{proxy.admin_url}/fhir/AuditEvent", GUIDE_SINGLE, headers)
    assert status == 415 and body["resourceType"] == "OperationOutcome"
    assert (await proxy.queue.stats()).pending == 0
    for accepted in ("application/json", "application/fhir+json; fhirVersion=4.0"):
        headers = FHIR | {"Content-Type": accepted}
        status, _, _ = await post(http, f"{proxy.admin_url}/fhir/AuditEvent", GUIDE_SINGLE, headers)
        assert status == 201, accepted


async def test_a_body_that_cannot_be_decoded_or_stops_arriving_gets_an_outcome(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Junk under ``Content-Encoding: deflate`` or ``gzip`` is a 400 OperationOutcome
    (it was a plain 500), as is one aiohttp cannot decode (br without Brotli installed); an
    encoding it passes on undecoded is a 415; a gzip body is taken,
    and a body that stops arriving a 408; nothing of the refused ones is stored."""
    proxy = await start_proxy(
        fhir_double, admin={"tokens": [TOKEN], "body_timeout_s": 0.3}
    )
    url = f"{proxy.admin_url}/fhir/AuditEvent"
    junk = b"\x78\x9c" + bytes(range(256)) * 4
    for encoding, body, status in (
        ("deflate", junk, 400),
        ("deflate", b"junkjunkjunk", 400),
        ("gzip", junk, 400),
        ("br", junk, 400),
        ("compress", junk, 415),
    ):
        got, _, outcome = await post(http, url, body, FHIR | {"Content-Encoding": encoding})
        assert got == status, (encoding, outcome)
        assert outcome["resourceType"] == "OperationOutcome", encoding
    assert (await proxy.queue.stats()).pending == 0
    got, _, _ = await post(
        http, url, gzip.compress(GUIDE_SINGLE), FHIR | {"Content-Encoding": "gzip"}
    )
    assert got == 201
    # A body that stops: answered at once, though aiohttp keeps reading it a little
    # longer (its lingering time) before it closes the connection.
    reader, writer = await asyncio.open_connection(
        URL(proxy.admin_url).host, URL(proxy.admin_url).port
    )
    try:
        writer.write(
            b"POST /fhir/AuditEvent HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + f"Content-Length: {len(GUIDE_SINGLE)}\r\n\r\n".encode()
            + GUIDE_SINGLE[:20]
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            outcome = orjson.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert raw_status(head) == 408 and b"Connection: close" in head
    assert outcome["issue"][0]["code"] == "timeout"
    assert (await proxy.queue.stats()).pending == 1


async def test_r5_mode_validates_against_r5(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double, audit={"fhir_version": "R5"})
    r5 = {
        "resourceType": "AuditEvent",
        "category": [
            {
                "coding": [
                    {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"}
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"}]
        },
        "action": "E",
        "recorded": "2026-01-16T16:03:16Z",
        "outcome": {
            "code": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-event-outcome",
                "code": "0",
            }
        },
        "agent": [{"who": {"display": "user@example.com"}, "requestor": True}],
        "source": {"observer": {"display": "My System"}},
        "patient": {"reference": "Patient/1"},
    }
    url = f"{proxy.admin_url}/fhir/AuditEvent"
    headers = {"Content-Type": "application/fhir+json; fhirVersion=5.0"}
    status, _, body = await post(http, url, orjson.dumps(r5), headers)
    assert status == 201, body
    async with http.get(
        f"{proxy.admin_url}/fhir/AuditEvent?patient=Patient/1&agent=user@example.com&type=110100"
    ) as r:
        found = await r.json(content_type=None)
    assert [e["resource"]["id"] for e in found["entry"]] == [body["id"]], "R5 fields indexed"
    status, _, body = await post(http, url, GUIDE_SINGLE, {"Content-Type": "application/fhir+json"})
    assert status == 400, "the guide's R4 event is not a valid R5 AuditEvent"

    # The proxy's own R5 events are found by the request's X-Request-Id, as R4 ones are.
    async with http.get(f"{proxy.url}/metadata", headers={"X-Request-Id": "r5-rid-1"}) as r:
        assert r.status == 200
    async with http.get(f"{proxy.admin_url}/fhir/AuditEvent?request-id=r5-rid-1") as r:
        found = await r.json(content_type=None)
    (entry,) = found["entry"]
    (named,) = [e for e in entry["resource"]["entity"] if e.get("role", {}).get("text")]
    assert named == {
        "what": {"identifier": {"value": "r5-rid-1"}},
        "role": {"text": "X-Request-Id"},
    }


async def test_a_store_that_cannot_take_them_answers_507_or_503(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    full = await start_proxy(fhir_double, store={"max_bytes": 4096})
    status, _, body = await post(http, f"{full.admin_url}/fhir/AuditEvent", GUIDE_SINGLE)
    assert status == 507, body
    await full.queue.close()
    status, _, body = await post(http, f"{full.admin_url}/fhir", GUIDE_BUNDLE)
    assert status == 503, body
    assert body["resourceType"] == "OperationOutcome"


async def test_ingested_events_reach_the_repository(
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(
        fhir_double, repository={"url": repository.url, "flush_interval_ms": 50}
    )
    status, _, single = await post(http, f"{proxy.admin_url}/fhir/AuditEvent", GUIDE_SINGLE)
    assert status == 201
    status, _, bundle = await post(http, f"{proxy.admin_url}/fhir", GUIDE_BUNDLE)
    assert status == 201
    received = await repository.wait_for(2)
    ids = {e["id"] for e in received}
    assert {single["id"], bundle["entry"][0]["resource"]["id"]} <= ids


@pytest.mark.slow
async def test_sigkill_right_after_201_loses_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store" / "audit.db"
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstream": {"url": FhirDouble.url},  # never asked: only the admin API is
        "store": {"path": str(store)},
        "log_level": "WARNING",
    }
    proxy = ProxyProcess(config, tmp_path)
    acknowledged: list[str] = []
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:

            async def one() -> None:
                status, _, body = await post(
                    http,
                    f"{proxy.admin}/fhir/AuditEvent",
                    GUIDE_SINGLE,
                    {"Content-Type": "application/fhir+json"},
                )
                assert status == 201
                acknowledged.append(body["id"])

            await asyncio.gather(*(one() for _ in range(20)))
            status, _, body = await post(
                http, f"{proxy.admin}/fhir", GUIDE_BUNDLE, {"Content-Type": "application/json"}
            )
            assert status == 201
            acknowledged.append(body["entry"][0]["resource"]["id"])
        finally:
            await proxy.kill()  # the moment the last 201 arrived
    queue = await AuditQueue.open(store, max_bytes=1 << 30)
    try:
        missing = [i for i in acknowledged if await queue.get_event(i) is None]
    finally:
        await queue.close()
    assert len(acknowledged) == 21
    assert missing == []


PROXY_TAG = "urn:fhir-audit-proxy:tag"


async def test_an_ingested_admin_access_tag_is_removed_whatever_its_display(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    """Only the proxy records accesses to the trail: the ``admin-access`` tag of an
    ingested event goes, with the proxy's display, another or none; a tag of another
    system stays."""
    foreign = {"system": "urn:example:tag", "code": "admin-access"}
    for tag in (
        {"system": PROXY_TAG, "code": "admin-access", "display": "something else"},
        {"system": PROXY_TAG, "code": "admin-access"},
        {"system": PROXY_TAG, "code": "admin-access", "display": ADMIN_ACCESS_TAG["display"]},
    ):
        sent = orjson.loads(GUIDE_SINGLE) | {"meta": {"tag": [tag, foreign]}}
        status, _, body = await post(http, f"{proxy.admin_url}/fhir/AuditEvent", orjson.dumps(sent))
        assert status == 201, body
        stored = await proxy.queue.get_event(body["id"])
        assert stored is not None
        assert stored.event["meta"]["tag"] == [foreign, INGESTED_TAG], tag
        assert not is_admin_access(stored.event)
        assert discloses([stored]), "an ingested event is part of the trail a reader sees"


async def test_an_ingested_event_cannot_pass_as_the_proxys_or_be_backdated(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    """A forged ``submitted-by`` and token verification, and the proxy's tag, are
    replaced by the proxy's own; an event naming the proxy as its observer is refused;
    an event claiming a ``recorded`` in 2001 keeps the claim but takes its place in the
    trail (date order, date search) at the time it was received, marked as ingested."""
    async with http.get(f"{proxy.url}/metadata", headers={"X-Request-Id": "own-1"}) as r:
        assert r.status == 200
    forged_submitter = {
        "url": SUBMITTER_EXT,
        "valueReference": {"display": "fhir-audit-proxy", "identifier": {"value": "proxy"}},
    }
    theirs = {"url": "urn:example:ext", "valueString": "kept"}
    sent = orjson.loads(GUIDE_SINGLE) | {
        "recorded": "2001-01-01T00:00:00Z",
        "extension": [forged_submitter, theirs],
        "agent": [
            {
                "requestor": True,
                "altId": "mallory",
                "extension": [{"url": TOKEN_VERIFICATION_EXT, "valueString": "verified"}],
            }
        ],
    }
    received = datetime.now(UTC)
    status, _, body = await post(http, f"{proxy.admin_url}/fhir/AuditEvent", orjson.dumps(sent))
    assert status == 201, body
    ingested_id = body["id"]
    stored = await proxy.queue.get_event(ingested_id)
    assert stored is not None
    event = stored.event
    assert event["recorded"] == "2001-01-01T00:00:00Z", "the claim is kept as claimed"
    submitters = [e for e in event["extension"] if e["url"] == SUBMITTER_EXT]
    assert [s["valueReference"]["identifier"]["value"] for s in submitters] == ["token:1"]
    assert theirs in event["extension"]
    assert event["agent"] == [{"requestor": True, "altId": "mallory"}]
    assert event["meta"]["tag"] == [INGESTED_TAG]

    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def ids(query: str) -> list[str]:
        async with http.get(f"{proxy.admin_url}/fhir/AuditEvent?{query}", headers=auth) as r:
            assert r.status == 200
            page = await r.json(content_type=None)
        return [e["resource"]["id"] for e in page.get("entry", [])]

    oldest_first = await ids("_sort=date&_count=100")
    (own_id,) = [e["id"] for e in await proxy.stored_events() if request_id_of(e) == "own-1"]
    assert oldest_first.index(own_id) < oldest_first.index(ingested_id), "not placed in 2001"
    newest_first = await ids("_sort=-date&_count=100")
    assert newest_first.index(ingested_id) < newest_first.index(own_id), "received last"
    assert ingested_id not in await ids("date=lt2002-01-01")
    since = (received - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    assert ingested_id in await ids(f"date=ge{since}&agent=mallory")
    async with http.get(f"{proxy.admin_url}/fhir/AuditEvent?agent=mallory", headers=auth) as r:
        (entry,) = (await r.json(content_type=None))["entry"]
    assert INGESTED_TAG in entry["resource"]["meta"]["tag"], "marked in search results"

    for observer in (
        {"reference": "Device/fhir-audit-proxy", "display": "fhir-audit-proxy"},
        {"display": "fhir-audit-proxy"},
        {"reference": "device/FHIR-audit-proxy "},
    ):
        claim = orjson.loads(GUIDE_SINGLE) | {"source": {"observer": observer}}
        status, _, outcome = await post(
            http, f"{proxy.admin_url}/fhir/AuditEvent", orjson.dumps(claim)
        )
        assert status == 400, observer
        assert "source.observer names this proxy" in outcome["issue"][0]["diagnostics"]
        status, _, answer = await post(
            http,
            f"{proxy.admin_url}/fhir",
            post_entries("batch", claim, orjson.loads(GUIDE_SINGLE)),
        )
        assert status == 200
        assert [e["response"]["status"] for e in answer["entry"]] == [
            "400 Bad Request",
            "201 Created",
        ]


def crowded_event(agents: int) -> dict[str, Any]:
    """The guide's event with ``agents`` agents (what validation's cost grows with)."""
    event: dict[str, Any] = orjson.loads(GUIDE_SINGLE)
    event["agent"] = [
        {"requestor": n == 0, "who": {"display": f"agent {n}"}, "altId": f"a-{n}"}
        for n in range(agents)
    ]
    return event


async def test_the_work_of_one_ingestion_request_is_bounded(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    too_many_parts = orjson.dumps(crowded_event(5001))
    status, _, outcome = await post(http, f"{proxy.admin_url}/fhir/AuditEvent", too_many_parts)
    assert status == 413
    assert "5001 agents and entities; at most 5000" in outcome["issue"][0]["diagnostics"]
    too_many_events = orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": orjson.loads(GUIDE_SINGLE)}] * 1001,
        }
    )
    status, _, outcome = await post(http, f"{proxy.admin_url}/fhir", too_many_events)
    assert status == 413
    assert "1001 events in one request; at most 1000" in outcome["issue"][0]["diagnostics"]
    assert (await proxy.queue.stats()).pending == 0


async def test_a_large_ingestion_does_not_hold_up_proxied_traffic(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    """While a request of 20 events of 1000 agents each is validated (seconds of CPU),
    GETs through the proxy to the FHIR server keep being answered: each in a small part
    of the ingestion's own time. (Validated on the event loop, a GET waited for it.)"""
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": crowded_event(1000)} for _ in range(20)],
    }
    body = orjson.dumps(bundle)
    loop = asyncio.get_running_loop()
    started = loop.time()
    ingest = asyncio.create_task(post(http, f"{proxy.admin_url}/fhir", body))
    latencies: list[float] = []
    while not ingest.done():
        sent = loop.time()
        async with http.get(f"{proxy.url}/metadata") as r:
            assert r.status == 200
            await r.read()
        latencies.append(loop.time() - sent)
    status, _, answer = await ingest
    took = loop.time() - started
    assert status == 201, answer
    assert len(answer["entry"]) == 20
    assert len(latencies) >= 3, (latencies, took)
    assert max(latencies) < took / 4, (latencies, took)
