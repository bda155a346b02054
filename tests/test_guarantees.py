"""One test per guarantee of the README, named after it. Each one fails when its guarantee
is broken; the planted bugs they were checked against are named in the docstrings.

They drive a real proxy over loopback HTTP in front of a recording upstream, and look at
the store through its own SQLite file (a second connection can hold the write lock, add a
trigger that makes a write fail, or read what is committed) rather than through seams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.audit import pipeline as pipeline_module
from proxy.audit.intents import intent_summary
from proxy.store.queue import AuditQueue
from proxy.telemetry import REGISTRY
from tests.factories import (
    FHIR,
    RecordingRepository,
    RunningProxy,
    ScriptedRepository,
    StartProxy,
    exchange,
    refuse_inserts,
    request_id_of,
    serving,
    subtypes,
    unsigned_jwt,
)

UPSTREAM_SECRET_BODY = "Upstream-Body-Only-The-Audited-May-See"
BIG_CHUNK = 64 * 1024
BIG_CHUNKS = 16
BUFFER_LIMIT = 128 * 1024


@dataclass
class RecordingUpstream:
    """A FHIR server stand-in that records every request it is sent, and can look at the
    proxy's store at the moment a request arrives."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    store: Path | None = None
    """When set, the intents committed in this store are read as each request arrives."""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    hold: asyncio.Event | None = None
    """When set, every request waits for it before being answered."""
    delay_s: float = 0.0
    _arrivals: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until(self, count: int) -> None:
        """Wait until ``count`` requests have arrived."""
        async with self._arrivals:
            await asyncio.wait_for(self._arrivals.wait_for(lambda: len(self.requests) >= count), 15)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "headers": dict(request.headers),
            "body": body,
        }
        if self.store is not None:
            seen["intents"] = _committed(self.store, "SELECT summary FROM intents")
        self.requests.append(seen)
        self.arrived.set()
        async with self._arrivals:
            self._arrivals.notify_all()
        if self.hold is not None:
            await self.hold.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if request.path.endswith("/Binary/big"):
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            for _ in range(BIG_CHUNKS):
                await response.write(b"x" * BIG_CHUNK)
            await response.write_eof()
            return response
        if request.method == "POST":
            return web.json_response(
                {"resourceType": "Patient", "id": "new-1"},
                status=201,
                headers={"Location": f"{self.url}/Patient/new-1/_history/1"},
            )
        return web.json_response(
            {"resourceType": "Patient", "id": "1", "name": [{"family": UPSTREAM_SECRET_BODY}]}
        )


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    recorder = RecordingUpstream()
    async with serving(("*", "/{tail:.*}", recorder.handle)) as server:
        recorder.url = str(server.make_url("/fhir"))
        yield recorder


def _store_path(proxy: RunningProxy) -> Path:
    return Path(proxy.settings.store.path)


def _committed(path: Path, sql: str) -> list[Any]:
    """Rows of ``sql`` as another process would see them: what is committed."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@contextlib.contextmanager
def store_held(path: Path) -> Iterator[None]:
    """Hold the store's write lock from another connection (as a long transaction of
    another process would): the proxy's commits wait until the block exits."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def _outcome(response: aiohttp.ClientResponse, code: str = "transient") -> dict[str, Any]:
    """The OperationOutcome the proxy answered with, checked for what a client relies on:
    the FHIR media type, one error issue with ``code`` that says the audit failed."""
    assert response.content_type == "application/fhir+json"
    body: dict[str, Any] = orjson.loads(await response.read())
    assert body["resourceType"] == "OperationOutcome"
    (issue,) = body["issue"]
    assert (issue["severity"], issue["code"]) == ("error", code)
    assert "audit" in issue["diagnostics"]
    assert UPSTREAM_SECRET_BODY not in issue["diagnostics"]
    if code == "transient":
        assert response.headers["Retry-After"] == "5"
    return body


# --- 1. No response without a durable audit ------------------------------------------------


@pytest.mark.parametrize("size", ["buffered", "streamed"])
async def test_no_response_without_a_durable_audit(
    upstream: RecordingUpstream, start_proxy: StartProxy, size: str
) -> None:
    """No byte of the response reaches the client while its event cannot be committed,
    including a response too large to buffer (planted bug: stream first, audit after)."""
    proxy = await start_proxy(upstream.url, audit={"buffer_limit_bytes": BUFFER_LIMIT})
    path = "/fhir/Binary/big" if size == "streamed" else "/fhir/Patient/1"
    host, port = proxy.server.host, proxy.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        with store_held(_store_path(proxy)):
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            first_byte = asyncio.ensure_future(reader.read(1))
            await asyncio.wait_for(upstream.arrived.wait(), 10)
            # The upstream has answered; a proxy that does not wait for the commit sends
            # now. Give it ample time to, while the store is held.
            done, _ = await asyncio.wait({first_byte}, timeout=1.0)
            assert not done, "a byte reached the client before its audit was committed"
            assert _committed(_store_path(proxy), "SELECT COUNT(*) FROM events") == [(0,)]
        assert await asyncio.wait_for(first_byte, 15) == b"H"
        rest = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    assert b" 200 " in rest.split(b"\r\n", 1)[0]
    if size == "streamed":
        assert rest.count(b"x") == BIG_CHUNK * BIG_CHUNKS
    (event,) = await proxy.stored_events()
    assert subtypes(event) == ["read"] and event["outcome"] == "0"


async def test_no_response_without_a_durable_audit_store_is_fsynced_wal(
    upstream: RecordingUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Durable means fsynced: every live connection on the store runs in WAL mode with
    ``synchronous=FULL`` (planted bug: ``PRAGMA synchronous=OFF``). The setting is per
    connection and not stored in the file, so it is read back from the live connections:
    the proxy's own reader, and the writer process's, as that process reports it."""
    proxy = await start_proxy(upstream.url)
    async with http.get(f"{proxy.url}/Patient/1") as r:
        assert r.status == 200
    store = str(_store_path(proxy).resolve())  # sqlite reports absolute paths
    # The connections the running queue's shard holds (gc.get_objects cannot see them: the app
    # freezes its start-up objects out of the collector's sight).
    live: list[sqlite3.Connection] = []
    for obj in vars(proxy.queue._shard).values():
        if not isinstance(obj, sqlite3.Connection):
            continue
        databases = obj.execute("PRAGMA database_list").fetchall()
        if any(row[2] == store for row in databases):
            live.append(obj)
    assert live, "the reader's connection"
    pragmas = ("PRAGMA journal_mode", "PRAGMA synchronous")
    settings = [tuple(conn.execute(p).fetchone()[0] for p in pragmas) for conn in live]
    engine = proxy.queue.engine
    assert engine.writer_pid is not None and engine.writer_pid != os.getpid()
    assert engine.writer_settings is not None
    settings.append(engine.writer_settings)
    assert settings == [("wal", 2)] * len(settings), "WAL and FULL (2) on every connection"


# --- 2. Fail closed -------------------------------------------------------------------------


async def test_fail_closed_store_failure_gives_exactly_503_and_discards_the_body(
    upstream: RecordingUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A store that fails for any reason but space gives 503, never the upstream's body,
    for a read and for a write."""
    proxy = await start_proxy(upstream.url)
    refuse_inserts(_store_path(proxy), "events")
    async with http.get(f"{proxy.url}/Patient/1") as r:
        assert r.status == 503
        assert UPSTREAM_SECRET_BODY.encode() not in await r.read()
        await _outcome(r)
    async with http.post(
        f"{proxy.url}/Patient", json={"resourceType": "Patient"}, headers=FHIR
    ) as r:
        assert r.status == 503
        await _outcome(r)
        assert "Location" not in r.headers


async def test_fail_closed_a_full_store_gives_507_to_reads_and_writes(
    upstream: RecordingUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """``store.max_bytes`` reached: 507, not 503 (planted bug), for a read and a write; the
    write is refused before it reaches the FHIR server, as its intent cannot be stored."""
    proxy = await start_proxy(upstream.url, store={"max_bytes": 1})
    async with http.get(f"{proxy.url}/Patient/1") as r:
        assert r.status == 507
        assert "full" in (await _outcome(r))["issue"][0]["diagnostics"]
    assert len(upstream.requests) == 1
    async with http.post(
        f"{proxy.url}/Patient", json={"resourceType": "Patient"}, headers=FHIR
    ) as r:
        assert r.status == 507
        await _outcome(r)
    assert [q["method"] for q in upstream.requests] == ["GET"], "the write was not forwarded"
    assert await proxy.stored_events() == []


async def test_fail_closed_a_refused_intent_stops_the_write_and_is_audited(
    upstream: RecordingUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An intent that cannot be committed refuses the write with 503: the FHIR server never
    sees it (planted bug: the write goes ahead), and the refusal itself is an event."""
    proxy = await start_proxy(upstream.url)
    refuse_inserts(_store_path(proxy), "intents")
    async with http.post(
        f"{proxy.url}/Patient",
        json={"resourceType": "Patient"},
        headers={**FHIR, "X-Request-Id": "refused-write"},
    ) as r:
        assert r.status == 503
        await _outcome(r)
    assert upstream.requests == [], "the write was not forwarded"
    (event,) = await proxy.stored_events()
    assert request_id_of(event) == "refused-write"
    assert subtypes(event) == ["create"]
    assert event["outcome"] != "0" and "intent" in event["outcomeDesc"]
    async with http.get(f"{proxy.url}/Patient/1") as r:
        assert r.status == 200, "reads need no intent and still pass"

    # A store that takes nothing at all: the write is still refused unforwarded; the
    # refusal, unrecordable, is logged.
    refuse_inserts(_store_path(proxy), "events")
    caplog.set_level(logging.ERROR)
    failures = _store_failures()
    async with http.post(
        f"{proxy.url}/Patient",
        json={"resourceType": "Patient"},
        headers={**FHIR, "X-Request-Id": "refused-again"},
    ) as r:
        assert r.status == 503
        await _outcome(r)
    assert [q["method"] for q in upstream.requests] == ["GET"], "still no write forwarded"
    assert len(await proxy.stored_events()) == 2
    assert any("could not be persisted" in rec.getMessage() for rec in caplog.records)
    assert _store_failures() >= failures + 1, "and counted"


def _store_failures() -> float:
    """Requests failed closed for a store error so far (the Prometheus counter)."""
    value = REGISTRY.get_sample_value("fhir_audit_failures_total", {"reason": "store_error"})
    return value or 0.0


# --- 3. No unaudited write across a crash --------------------------------------------------


async def test_no_unaudited_write_across_a_crash_intent_committed_before_forwarding(
    upstream: RecordingUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """When the write reaches the FHIR server, its intent is already committed (seen from
    another connection); once the write is audited the intent is gone."""
    proxy = await start_proxy(upstream.url)
    upstream.store = _store_path(proxy)
    async with http.post(
        f"{proxy.url}/Patient",
        json={"resourceType": "Patient"},
        headers={**FHIR, "X-Request-Id": "w-1"},
    ) as r:
        assert r.status == 201
    async with http.get(f"{proxy.url}/Patient/1") as r:
        assert r.status == 200
    post, get = upstream.requests
    (intent,) = (orjson.loads(row[0]) for row in post["intents"])
    assert (intent["method"], intent["path"], intent["request_id"]) == ("POST", "Patient", "w-1")
    assert get["intents"] == [], "completed with the write's event; reads record none"
    write_event, _ = await proxy.stored_events()
    assert request_id_of(write_event) == "w-1" and subtypes(write_event) == ["create"]


async def test_no_unaudited_write_across_a_crash_orphan_intents_become_events_at_start(
    upstream: RecordingUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Intents a crash left behind become outcome-8 events when the proxy starts."""
    store = tmp_path / "crashed" / "audit.db"
    queue = await AuditQueue.open(store, max_bytes=1 << 30)
    write = exchange(
        "PUT",
        "Patient/7",
        body={"resourceType": "Patient", "id": "7"},
        request_id="lost-in-crash",
        status=None,
    )
    await queue.record_intent(intent_summary(write))
    await queue.close()

    proxy = await start_proxy(upstream.url, store={"path": store})
    (event,) = await proxy.stored_events()
    assert request_id_of(event) == "lost-in-crash"
    assert event["outcome"] == "8"
    assert "outcome unknown" in event["outcomeDesc"] and "stopped" in event["outcomeDesc"]
    assert subtypes(event) == ["update"]
    assert await proxy.queue.orphan_intents() == []
    assert upstream.requests == [], "recovery replays nothing"


# --- 4. Group commit ------------------------------------------------------------------------


async def test_group_commit_concurrent_requests_share_one_transaction(
    upstream: RecordingUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """32 requests answered together are committed in a few transactions, not 32."""
    proxy = await start_proxy(upstream.url)
    upstream.hold = asyncio.Event()
    n = 32

    async def read(i: int) -> int:
        async with http.get(f"{proxy.url}/Patient/1", headers={"X-Request-Id": f"g{i}"}) as r:
            return r.status

    before = proxy.queue.commits
    clients = [asyncio.ensure_future(read(i)) for i in range(n)]
    await upstream.until(n)
    upstream.hold.set()
    assert await asyncio.gather(*clients) == [200] * n
    commits = proxy.queue.commits - before
    assert commits <= n // 4, f"{commits} commits for {n} concurrent requests"
    assert len(await proxy.stored_events()) == n


# --- 5. At-least-once, in order, stable event ids -----------------------------------------


async def test_at_least_once_in_order_stable_ids_transaction_mode_is_idempotent(
    upstream: RecordingUpstream,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    """A batch refused with 500 is sent again with the same ids, as ``PUT AuditEvent/{id}``
    entries, and everything arrives in queue order."""
    repository.fail_next = [500]
    proxy = await start_proxy(
        upstream.url,
        repository={
            "url": repository.url,
            "mode": "transaction",
            "flush_interval_ms": 20,
            "max_flush_interval_ms": 100,
            "batch_count": 100,
        },
    )
    upstream.hold = asyncio.Event()  # all five are queued before the first flush
    clients = [
        asyncio.ensure_future(http.get(f"{proxy.url}/Patient/1", headers={"X-Request-Id": f"o{i}"}))
        for i in range(5)
    ]
    await upstream.until(5)
    upstream.hold.set()
    for response in await asyncio.gather(*clients):
        assert response.status == 200
        response.release()
    stored_ids = [e["id"] for e in await proxy.stored_events()]
    delivered = await repository.wait_for(len(stored_ids))
    assert [e["id"] for e in delivered] == stored_ids, "in queue order, ids unchanged"
    failed, *_ = repository.requests
    assert failed["status"] == 500
    retried = [r for r in repository.requests if r["status"] < 300]
    sent_again = [e["resource"]["id"] for r in retried for e in r["body"]["entry"]]
    first_try = [e["resource"]["id"] for e in failed["body"]["entry"]]
    assert sent_again[: len(first_try)] == first_try, "redelivery keeps the ids"
    for body in (r["body"] for r in repository.requests):
        assert body["type"] == "transaction"
        for entry in body["entry"]:
            assert entry["request"] == {
                "method": "PUT",
                "url": f"AuditEvent/{entry['resource']['id']}",
            }


# --- 6. Bounded retry ---------------------------------------------------------------------


async def test_bounded_retry_a_rejected_batch_is_bisected_and_only_the_offender_dead_lettered(
    upstream: RecordingUpstream,
    start_proxy: StartProxy,
    scripted_repository: ScriptedRepository,
    http: aiohttp.ClientSession,
) -> None:
    """A 400 for a batch holding one bad event: the others are delivered, the bad one is
    dead-lettered with the repository's answer; a 401 is retried, never dead-lettered."""
    unauthorised_once = [True]

    async def judge(request: web.Request, raw: bytes) -> web.StreamResponse | None:
        if unauthorised_once and unauthorised_once.pop():
            return web.json_response({"resourceType": "OperationOutcome"}, status=401)
        if b"poison" in raw:
            return web.json_response(
                {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "bad event"}]},
                status=400,
            )
        return None

    scripted_repository.behaviour = judge
    proxy = await start_proxy(
        upstream.url,
        repository={
            "url": scripted_repository.url,
            "flush_interval_ms": 20,
            "max_flush_interval_ms": 100,
        },
    )
    upstream.hold = asyncio.Event()
    rids = ["a", "b", "poison", "c"]
    clients = [
        asyncio.ensure_future(http.get(f"{proxy.url}/Patient/1", headers={"X-Request-Id": rid}))
        for rid in rids
    ]
    await upstream.until(len(rids))
    upstream.hold.set()
    for response in await asyncio.gather(*clients):
        response.release()
    by_rid = {request_id_of(e): e["id"] for e in await proxy.stored_events()}
    for _ in range(750):  # polling what the repository received: up to 15 s
        if len(scripted_repository.delivered_ids()) >= 3 and await proxy.queue.list_dead():
            break
        await asyncio.sleep(0.02)
    assert sorted(scripted_repository.delivered_ids()) == sorted(by_rid[r] for r in ("a", "b", "c"))
    (dead,) = await proxy.queue.list_dead()
    assert dead.event_id == by_rid["poison"]
    assert dead.last_error is not None and "400" in dead.last_error
    assert scripted_repository.requests[0]["status"] == 401


# --- 7. Secrets stay out -----------------------------------------------------------------

SECRET_TOKEN = unsigned_jwt({"sub": "nurse-7", "secret": "Jwt-Payload-Planted-Secret-4711"})
SECRET_COOKIE = "session=Cookie-Planted-Secret-0815"
SECRET_API_KEY = "ApiKey-Planted-Secret-1234567890"
CLIENT_SECRETS = (SECRET_TOKEN, SECRET_COOKIE, "Cookie-Planted-Secret-0815", SECRET_API_KEY)


@pytest.mark.parametrize(
    "failure",
    [
        "none",
        "upstream_unreachable",
        "upstream_timeout",
        "store_error",
        "store_full",
        "classification_error",
        "build_error",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_secrets_never_reach_the_store_the_logs_or_the_events(
    upstream: RecordingUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    failure: str,
    method: str,
) -> None:
    """The client's Authorization, Cookie and X-Api-Key values appear in no log line (at
    DEBUG), no stored event and not in the store's file, on the success path and on every
    failure path (planted bug: the upstream-failure path logs the request headers)."""
    caplog.set_level(logging.DEBUG)
    overrides: dict[str, Any] = {}
    target = upstream.url
    if failure == "upstream_unreachable":
        async with serving() as closed:
            target = str(closed.make_url("/fhir"))
    elif failure == "upstream_timeout":
        upstream.delay_s = 5
        overrides["upstream"] = {"timeout_s": 0.3}
    elif failure == "store_full":
        overrides["store"] = {"max_bytes": 1}
    proxy = await start_proxy(target, **overrides)
    if failure == "store_error":
        refuse_inserts(_store_path(proxy), "events")
    elif failure == "classification_error":
        monkeypatch.setattr(pipeline_module, "classify", _raises("classification"))
    elif failure == "build_error":
        monkeypatch.setattr(pipeline_module, "build_events", _raises("event build"))
    headers = {
        "Authorization": f"Bearer {SECRET_TOKEN}",
        "Cookie": SECRET_COOKIE,
        "X-Api-Key": SECRET_API_KEY,
        **FHIR,
    }
    body = orjson.dumps({"resourceType": "Patient"}) if method == "POST" else None
    path = "Patient" if method == "POST" else "Patient/1"
    async with http.request(method, f"{proxy.url}/{path}", headers=headers, data=body) as r:
        expected = {
            "none": 201 if method == "POST" else 200,
            "upstream_unreachable": 502,
            "upstream_timeout": 504,
            "store_error": 503,
            "store_full": 507,
            "classification_error": 500,
            "build_error": 500,
        }[failure]
        assert r.status == expected
        if failure in ("store_error", "store_full"):
            await _outcome(r)
        elif failure in ("classification_error", "build_error"):
            await _outcome(r, code="exception")
        await r.read()
    events = await proxy.stored_events()
    if failure == "none":
        assert events, "the success path stored its event"
    assert any(rec.levelno >= logging.WARNING for rec in caplog.records) or failure == "none"
    logged = "\n".join(
        f"{rec.getMessage()}\n{rec.exc_text or ''}\n{rec.stack_info or ''}"
        for rec in caplog.records
    )
    stored = orjson.dumps(events).decode()
    store_bytes = b"".join(
        p.read_bytes() for p in _store_path(proxy).parent.glob("audit.db*") if p.is_file()
    )
    for secret in CLIENT_SECRETS:
        assert secret not in logged, f"a log line holds the client's {secret[:12]}..."
        assert secret not in stored, f"an event holds the client's {secret[:12]}..."
        assert secret.encode() not in store_bytes
    assert "Jwt-Payload-Planted-Secret-4711" not in logged + stored


def _raises(what: str) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"planted {what} failure")

    return fail
