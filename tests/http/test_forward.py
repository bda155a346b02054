"""The proxy end to end: real HTTP from a client through the proxy to an upstream, events
committed to the store and shipped to a recording repository."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.audit.pipeline import AuditPolicy
from proxy.audit.validate import validate_event
from proxy.http.forward import ForwardConfig, client_address, relative_path
from proxy.store.faces import StoreError
from tests.factories import (
    FHIR,
    FhirDouble,
    NodeFhirServer,
    RecordingRepository,
    StartProxy,
    new_patient,
    patient_refs,
    profile,
    query_entity,
    raw_body,
    raw_http,
    raw_status,
    recorded_request,
    request_id_of,
    serving,
    settings_for,
    subtypes,
)


def agent_codes(event: dict[str, Any]) -> set[str]:
    return {c["code"] for a in event["agent"] for c in a.get("type", {}).get("coding", [])}


# --- pure helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "base", "expected"),
    [
        ("/fhir/Patient/1", "/fhir", "Patient/1"),
        ("/fhir", "/fhir", ""),
        ("/fhir/", "/fhir", ""),
        ("/fhirx/Patient", "/fhir", None),
        ("/other", "/fhir", None),
        ("/Patient/1", "", "Patient/1"),
    ],
)
def test_relative_path(raw: str, base: str, expected: str | None) -> None:
    assert relative_path(raw, base) == expected


def test_the_forwarding_settings_read_nothing_of_the_audit(tmp_path: Path) -> None:
    """The key opaque tokens are hashed under is the audit's: reading the forwarding
    settings neither reads nor creates its file; the audit's policy does."""
    settings = settings_for("http://127.0.0.1:9/fhir", tmp_path)
    key = settings.store.path.with_name(settings.store.path.name + ".token-key")
    ForwardConfig.from_settings(settings)
    assert not key.exists()
    AuditPolicy.from_settings(settings)
    assert key.exists()


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    import ipaddress

    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("10.1.1.1", "203.0.113.7", nets) == "203.0.113.7"
    assert client_address("198.51.100.2", "203.0.113.7", nets) == "198.51.100.2"
    assert client_address("10.1.1.1", "203.0.113.7, 10.2.2.2", nets) == "203.0.113.7"
    assert client_address("10.1.1.1", None, nets) == "10.1.1.1"


# --- every interaction through the real FHIR server ---------------------------------------


async def test_each_interaction_is_proxied_and_audited(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(
        fhir_server.base_url,
        repository={"url": repository.url, "flush_interval_ms": 20, "mode": "bundle"},
    )
    base = proxy.url
    patient = await new_patient(http, base, name=[{"family": "Audit"}])
    pid = patient["id"]
    vid = patient["meta"]["versionId"]

    async with http.get(f"{base}/Patient/{pid}") as r:
        assert r.status == 200
        via_proxy = await r.read()
    async with http.get(f"{fhir_server.base_url}/Patient/{pid}") as r:
        assert await r.read() == via_proxy, "the body passes through unchanged"
    async with http.get(f"{base}/Patient/{pid}/_history/{vid}") as r:
        assert r.status == 200
    async with http.put(
        f"{base}/Patient/{pid}",
        json={"resourceType": "Patient", "id": pid, "name": [{"family": "Renamed"}]},
    ) as r:
        assert r.status == 200
    async with http.patch(
        f"{base}/Patient/{pid}",
        data=b'[{"op":"add","path":"/active","value":true}]',
        headers={"Content-Type": "application/json-patch+json"},
    ) as r:
        assert r.status == 200
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "heart rate"},
        "subject": {"reference": f"Patient/{pid}"},
    }
    async with http.post(f"{base}/Observation", json=obs) as r:
        assert r.status == 201
        obs_id = (await r.json(content_type=None))["id"]
    async with http.get(f"{base}/Observation", params={"subject": f"Patient/{pid}"}) as r:
        assert r.status == 200
        assert (await r.json(content_type=None))["entry"]
    async with http.post(
        f"{base}/Observation/_search",
        data=f"subject=Patient/{pid}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 200
    async with http.delete(f"{base}/Observation/{obs_id}") as r:
        assert r.status in (200, 204)
    async with http.delete(f"{base}/Patient/{pid}") as r:
        assert r.status in (200, 204)

    events = await repository.wait_for(10)
    by_subtype: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        assert validate_event(event, "R4") is None, event
        for code in subtypes(event):
            by_subtype.setdefault(code, []).append(event)

    patient_ref = f"Patient/{pid}"
    create = by_subtype["create"]
    assert {profile(e) for e in create} == {"PatientCreate"}
    assert all(patient_refs(e) == [patient_ref] for e in create)
    (read,) = by_subtype["read"]
    assert profile(read) == "PatientRead" and read["action"] == "R"
    assert {"110152", "110153"} <= agent_codes(read)
    (vread,) = by_subtype["vread"]
    assert profile(vread) == "PatientRead"
    assert profile(by_subtype["update"][0]) == "PatientUpdate"
    assert profile(by_subtype["patch"][0]) == "PatientUpdate"
    searches = by_subtype["search-type"]
    assert len(searches) == 2 and {profile(e) for e in searches} == {"PatientQuery"}
    assert all(patient_refs(e) == [patient_ref] for e in searches)
    obs_delete, patient_delete = by_subtype["delete"]
    # the server answers a delete without the resource; the proxy read it first
    assert profile(obs_delete) == "PatientDelete" and patient_refs(obs_delete) == [patient_ref]
    assert profile(patient_delete) == "PatientDelete" and patient_delete["action"] == "D"
    assert patient_refs(patient_delete) == [patient_ref]
    assert {"110150", "custodian"} <= agent_codes(patient_delete)
    # the request id is recorded in every event
    assert all(request_id_of(event) for event in events)


async def test_a_search_by_code_is_recorded_as_sent(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double)
    query = "patient=p-code-1&code=http%3A%2F%2Floinc.org%7C8867-4"
    async with http.get(
        URL(f"{proxy.url}/Observation?{query}", encoded=True), headers={"X-Request-Id": "by-code"}
    ) as r:
        assert r.status == 200
    (event,) = [e for e in await proxy.stored_events() if request_id_of(e) == "by-code"]
    assert recorded_request(event).startswith(f"GET /fhir/Observation?{query} HTTP/1.1".encode())
    assert query_entity(event)["description"] == f"Observation?{query}"
    assert profile(event) == "PatientQuery" and patient_refs(event) == ["Patient/p-code-1"]


async def test_an_operation_body_is_recorded_in_the_query_entity(
    fhir_server: NodeFhirServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_server.base_url)
    query = b'{"query":"{ PatientList(name: \\"Nobody-graphql\\") { id } }"}'
    async with http.post(
        f"{proxy.url}/$graphql",
        data=query,
        headers={"Content-Type": "application/json", "X-Request-Id": "gql"},
    ) as r:
        assert r.status == 200, await r.text()
    (event,) = [e for e in await proxy.stored_events() if request_id_of(e) == "gql"]
    assert recorded_request(event) == (
        b"POST /fhir/$graphql HTTP/1.1\r\nAccept: */*\r\nX-Request-Id: gql\r\n"
        b"Content-Type: application/json\r\n\r\n" + query
    )
    assert subtypes(event) == ["operation", "$graphql"]


async def test_request_id_is_kept_or_generated_and_returned(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double)
    async with http.get(f"{proxy.url}/metadata", headers={"X-Request-Id": "req-123"}) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "req-123"
    async with http.get(f"{proxy.url}/metadata") as r:
        generated = r.headers["X-Request-Id"]
        assert len(generated) == 36
    assert [request_id_of(e) for e in await proxy.stored_events()] == ["req-123", generated]


# --- header handling against an echo upstream ---------------------------------------------


@pytest.fixture
async def echo_upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An upstream that records request headers and can be slow or huge on demand."""
    seen: list[dict[str, Any]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        seen.append(
            {
                "headers": CIMultiDict(request.headers),  # names are case-insensitive
                "path": request.path_qs,
                "body": await request.read(),
            }
        )
        if request.path.endswith("/slow"):
            await asyncio.sleep(5)
        if request.path.endswith("/Binary/big"):
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            for _ in range(40):
                await response.write(b"x" * 65536)
            await response.write_eof()
            return response
        return web.json_response(
            {"resourceType": "Patient", "id": "1"},
            headers={"Connection": "keep-alive", "Keep-Alive": "timeout=5", "X-Upstream": "yes"},
        )

    async with serving(("*", "/{tail:.*}", echo)) as server:
        yield str(server.make_url("/fhir")), seen


async def test_headers_hop_by_hop_dropped_forwarded_set(
    echo_upstream: tuple[str, list[dict[str, Any]]],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    upstream, seen = echo_upstream
    proxy = await start_proxy(upstream)
    async with http.get(
        URL(f"{proxy.url}/Patient/1?_elements=id&x=%2Fa%20b", encoded=True),
        headers={"Authorization": "Bearer abc", "TE": "trailers", "X-Custom": "kept"},
    ) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "yes"
        assert "Keep-Alive" not in r.headers
    (req,) = seen
    assert req["path"] == "/fhir/Patient/1?_elements=id&x=%2Fa%20b", "query passes unchanged"
    headers = req["headers"]
    assert headers["Authorization"] == "Bearer abc", "credentials go to the upstream"
    assert headers["X-Custom"] == "kept"
    assert "TE" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"].startswith("127.0.0.1:")
    assert headers["X-Request-Id"]


async def test_large_response_streams_and_is_audited_first(
    echo_upstream: tuple[str, list[dict[str, Any]]],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    upstream, _ = echo_upstream
    proxy = await start_proxy(upstream, audit={"buffer_limit_bytes": 256 * 1024})
    async with http.get(f"{proxy.url}/Binary/big") as r:
        assert r.status == 200
        # The status line is here and the body not yet read: the event is already
        # committed, as another connection to the store sees it. (The store held during
        # the first byte is tests/test_guarantees.py's.)
        conn = sqlite3.connect(proxy.settings.store.path)
        try:
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (1,)
        finally:
            conn.close()
        body = await r.read()
    assert len(body) == 40 * 65536
    (event,) = await proxy.stored_events()
    assert subtypes(event) == ["read"]
    assert event["outcome"] == "0"


async def test_a_head_is_forwarded_and_answered_without_a_body(
    echo_upstream: tuple[str, list[dict[str, Any]]],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    upstream, seen = echo_upstream
    proxy = await start_proxy(upstream)
    async with http.head(f"{proxy.url}/Patient/1") as r:
        assert r.status == 200
        assert await r.read() == b""
    async with http.get(f"{proxy.url}/Patient/1") as r:
        assert (await r.json(content_type=None))["id"] == "1", "the next answer is whole"
    assert [s["path"] for s in seen] == ["/fhir/Patient/1", "/fhir/Patient/1"]
    head, read = await proxy.stored_events()
    assert subtypes(head) == subtypes(read) == ["read"]


async def test_an_upstream_that_would_compress_is_asked_for_the_body_as_is(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The proxy audits the bodies it reads: it asks for them uncompressed, so a server
    that compresses when allowed (nginx ``gzip on``, most cloud FHIR services) still gives
    the client a readable body and the event its patient."""

    async def patient(request: web.Request) -> web.StreamResponse:
        response = web.json_response(
            {"resourceType": "Observation", "id": "1", "subject": {"reference": "Patient/p7"}}
        )
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async with serving(("GET", "/{tail:.*}", patient)) as server:
        proxy = await start_proxy(str(server.make_url("/fhir")))
        async with http.get(f"{proxy.url}/Observation/1") as r:
            assert r.status == 200
            assert (await r.json(content_type=None))["subject"]["reference"] == "Patient/p7"
    (event,) = await proxy.stored_events()
    assert patient_refs(event) == ["Patient/p7"]


async def test_an_answer_that_breaks_off_while_streaming_is_cut_short_for_the_client(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A body past the buffer streams after its audit; if the upstream breaks off, the
    client's answer ends unfinished (never looks whole) and the proxy keeps serving."""

    async def breaks_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"x" * 600_000)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(breaks_off, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(
            f"http://127.0.0.1:{port}/fhir", audit={"buffer_limit_bytes": 256 * 1024}
        )
        async with http.get(f"{proxy.url}/Binary/1") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        (event,) = await proxy.stored_events()
        assert subtypes(event) == ["read"]
        async with http.get(f"{proxy.url}/metadata") as r:
            assert r.status == 200, "the next request on a new connection is served"
    finally:
        server.close()


def _searchset(size: int) -> bytes:
    """A searchset Bundle of about ``size`` bytes whose first entry is Patient/first's and
    whose last entry, far past the part of a body held in memory, is Patient/last's."""
    entries = [
        {
            "resource": {
                "resourceType": "Observation",
                "id": f"o{i}",
                "status": "final",
                "code": {"text": "x" * 200},
                "subject": {"reference": "Patient/first" if i == 0 else "Patient/mid"},
            }
        }
        for i in range(size // 300)
    ]
    entries.append(
        {
            "resource": {
                "resourceType": "Observation",
                "id": "o-last",
                "status": "final",
                "code": {"text": "last"},
                "subject": {"reference": "Patient/last"},
            }
        }
    )
    return orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries})


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("fails", [False, True])
async def test_body_past_the_memory_part_is_audited_whole_and_sent_intact(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    chunked: bool,
    fails: bool,
) -> None:
    """A body larger than what one response holds in memory (the rest waits in a
    temporary file) is parsed whole for its patients, released only after the commit,
    and byte for byte what the upstream sent; when the store fails, none of it leaves."""
    bundle = _searchset(2 * 1024 * 1024)

    async def search(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=bundle, content_type="application/fhir+json")
        response = web.StreamResponse(headers=FHIR)
        await response.prepare(request)
        for i in range(0, len(bundle), 50_000):
            await response.write(bundle[i : i + 50_000])
        await response.write_eof()
        return response

    async with serving(("GET", "/fhir/Observation", search)) as upstream:
        proxy = await start_proxy(str(upstream.make_url("/fhir")))
        if fails:

            async def broken_append(*args: Any, **kwargs: Any) -> None:
                raise StoreError("disk I/O error")

            monkeypatch.setattr(proxy.queue, "append_rows", broken_append)
        async with http.get(f"{proxy.url}/Observation?status=final") as r:
            body = await r.read()
            if fails:
                assert r.status == 503
                assert b"o-last" not in body and b"Patient/first" not in body
                return
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(bundle))
        assert body == bundle
        events = await proxy.stored_events()
    assert sorted(p for e in events for p in patient_refs(e)) == [
        "Patient/first",
        "Patient/last",
        "Patient/mid",
    ]


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_request_body_streams_upstream_intact(
    echo_upstream: tuple[str, list[dict[str, Any]]],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    chunked: bool,
) -> None:
    upstream, seen = echo_upstream
    proxy = await start_proxy(upstream, audit={"buffer_limit_bytes": 64 * 1024})
    payload = b'{"resourceType":"Binary","data":"' + b"A" * (300 * 1024) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 10_000):
            yield payload[i : i + 10_000]

    async with http.post(
        f"{proxy.url}/Binary", data=chunks() if chunked else payload, headers=FHIR
    ) as r:
        assert r.status == 200
    assert seen[0]["body"] == payload
    (event,) = await proxy.stored_events()
    assert subtypes(event) == ["create"]


async def test_upstream_timeout_gives_504_and_is_audited(
    echo_upstream: tuple[str, list[dict[str, Any]]],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    upstream, _ = echo_upstream
    proxy = await start_proxy(upstream, upstream={"url": upstream, "timeout_s": 0.5})
    async with http.get(f"{proxy.url}/Patient/slow") as r:
        assert r.status == 504
        body = await r.json(content_type=None)
        assert body["resourceType"] == "OperationOutcome"
    (event,) = await proxy.stored_events()
    assert event["outcome"] == "12"
    assert "timed out" in event["outcomeDesc"]


async def test_upstream_down_gives_502_and_is_audited(
    start_proxy: StartProxy, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    proxy = await start_proxy(f"http://127.0.0.1:{unused_tcp_port}/fhir")
    async with http.post(f"{proxy.url}/Patient", json={"resourceType": "Patient"}) as r:
        assert r.status == 502
        body = await r.json(content_type=None)
        assert body["resourceType"] == "OperationOutcome"
    events = await proxy.stored_events()
    assert [e["outcome"] for e in events] == ["12"]
    assert "meta" not in events[0] or not events[0]["meta"].get("profile"), (
        "a failure does not claim a BALP profile whose outcome is fixed to success"
    )
    assert not await proxy.queue.orphan_intents(), "the write's intent was completed"


# --- fail closed ----------------------------------------------------------------------------


async def test_store_failure_fails_closed_with_503_and_withholds_the_body(
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await start_proxy(fhir_double)
    patient = await new_patient(http, proxy.url, name=[{"family": "Secret"}])

    async def broken_append(*args: Any, **kwargs: Any) -> None:
        raise StoreError("disk I/O error")

    monkeypatch.setattr(proxy.queue, "append_rows", broken_append)
    async with http.get(f"{proxy.url}/Patient/{patient['id']}") as r:
        assert r.status == 503
        body = await r.read()
    assert b"Secret" not in body, "no upstream data leaves unaudited"
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert "audit" in outcome["issue"][0]["diagnostics"]


async def test_store_path_blocked_by_a_file_refuses_to_start(
    fhir_double: FhirDouble, start_proxy: StartProxy, tmp_path: Any
) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the store's directory should be")
    with pytest.raises(StoreError):
        await start_proxy(fhir_double, store={"path": blocker / "audit.db"})


# --- delivery and admin ---------------------------------------------------------------------


async def test_flusher_retries_after_repository_500(
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    repository.fail_next = [500, 500]
    proxy = await start_proxy(
        fhir_double,
        repository={
            "url": repository.url,
            "flush_interval_ms": 20,
            "max_flush_interval_ms": 100,
            "request_headers": {"X-Tenant": "ward-7"},
        },
    )
    async with http.get(f"{proxy.url}/metadata") as r:
        assert r.status == 200
    (event,) = await repository.wait_for(1)
    statuses = [r["status"] for r in repository.requests]
    assert statuses == [500, 500, 200]
    assert all(r["headers"]["X-Tenant"] == "ward-7" for r in repository.requests)
    assert repository.requests[-1]["body"]["type"] == "collection"
    # The repository has the event once it answered 200; the flusher marks it delivered
    # after reading that answer.
    deadline = asyncio.get_running_loop().time() + 5
    while (stats := await proxy.queue.stats()).delivered == 0:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.01)
    assert (stats.pending, stats.delivered) == (0, 1)
    assert event["id"] == (await proxy.stored_events())[0]["id"]


async def test_admin_lists_recent_events_and_is_healthy(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double)
    for _ in range(3):
        async with http.get(f"{proxy.url}/metadata") as r:
            assert r.status == 200
    async with http.get(f"{proxy.admin_url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{proxy.admin_url}/fhir/AuditEvent?_sort=-date&_count=2") as r:
        assert r.status == 200
        bundle = await r.json(content_type=None)
    assert bundle["resourceType"] == "Bundle" and bundle["total"] == 3
    assert len(bundle["entry"]) == 2
    recorded = [e["resource"]["recorded"] for e in bundle["entry"]]
    assert recorded == sorted(recorded, reverse=True)


# --- hardening ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND", "CONNECT", "MKCOL", "LOCK", "PURGE"])
async def test_a_method_outside_the_fhir_api_is_refused_405_and_audited(
    echo_upstream: tuple[str, list[dict[str, Any]]], start_proxy: StartProxy, method: str
) -> None:
    """TRACE would echo the request (its Authorization header too) back; WebDAV's methods
    and CONNECT mean nothing to a FHIR server. None is forwarded; each is answered 405
    with ``Allow`` and an OperationOutcome, and audited."""
    upstream, seen = echo_upstream
    proxy = await start_proxy(upstream)
    target = f"127.0.0.1:{proxy.server.port}" if method == "CONNECT" else "/fhir/Patient"
    raw = await raw_http(
        proxy.server.host,
        proxy.server.port,
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer trace-me\r\n"
        f"X-Request-Id: m-{method}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert raw_status(raw) == 405
    assert b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n" in raw
    outcome = orjson.loads(raw_body(raw))
    assert outcome["resourceType"] == "OperationOutcome"
    assert f"{method} is not a method of the FHIR REST API" in outcome["issue"][0]["diagnostics"]
    assert b"trace-me" not in raw
    assert seen == []
    (event,) = await proxy.stored_events()
    assert request_id_of(event) == f"m-{method}"
    assert event["outcome"] == "4"


async def test_location_is_never_built_from_the_host_header(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An upstream Location is rewritten to the proxy's public URL when configured, else
    to the address the client connected to, whatever ``Host`` says."""

    async def created(request: web.Request) -> web.Response:
        base = f"http://{request.host}/fhir"
        return web.json_response(
            {"resourceType": "Patient", "id": "p1"},
            status=201,
            headers={
                "Location": f"{base}/Patient/p1/_history/1",
                "Content-Location": f"{base}/Patient/p1/_history/1",
            },
        )

    async with serving(("*", "/{tail:.*}", created)) as server:
        upstream = str(server.make_url("/fhir"))
        plain = await start_proxy(upstream)
        public = await start_proxy(upstream, listen={"public_url": "https://fhir.example.org/r4/"})
        for proxy, base in (
            (plain, plain.url),
            (public, "https://fhir.example.org/r4"),
        ):
            for host in ("evil.example", f"127.0.0.1:{proxy.server.port}"):
                async with http.post(
                    f"{proxy.url}/Patient", json={"resourceType": "Patient"}, headers={"Host": host}
                ) as r:
                    assert r.status == 201
                    assert r.headers["Location"] == f"{base}/Patient/p1/_history/1", host
                    assert r.headers["Content-Location"] == r.headers["Location"]
