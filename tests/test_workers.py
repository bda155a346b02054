"""``workers: N``: N processes of ``python -m proxy run`` share the listen port, each with
its own store shard, and the admin API and ``dlq`` commands read every shard as one store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery
from proxy.supervisor import read_worker_states, status_path
from tests.factories import (
    NodeFhirServer,
    ProxyProcess,
    RecordingRepository,
    audit_event_pages,
    free_port,
    request_id_of,
    run_until_exit,
    serving,
)

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN_OUTCOME = "8"
"""AuditEvent.outcome of an interaction whose outcome is unknown (minor failure code)."""


def _config(upstream: str, store: Path, **extra: Any) -> dict[str, Any]:
    listen = free_port()
    admin = free_port()
    while admin == listen:  # nothing holds a free port between the two calls
        admin = free_port()
    return {
        "listen": {"host": "127.0.0.1", "port": listen},
        "admin": {"host": "127.0.0.1", "port": admin},
        "upstream": {"url": upstream, "timeout_s": 30},
        "store": {"path": str(store)},
        "workers": 2,
        "log_level": "WARNING",
        **extra,
    }


def _count(shard: Path, where: str = "1") -> int:
    with sqlite3.connect(shard) as conn:
        count: int = conn.execute(f"SELECT COUNT(*) FROM events WHERE {where}").fetchone()[0]
    conn.close()
    return count


def _listeners(port: int) -> int:
    """How many sockets listen on loopback ``port`` (from the kernel's table)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = f"0100007F:{port:04X}"
    return sum(1 for row in rows if row.split()[1] == local and row.split()[3] == "0A")


async def _all_serving(proxy: ProxyProcess, workers: int) -> None:
    """Wait until every worker serves (each recovers its shard's intents before), as its
    supervisor reports it (the port listens from the start: the supervisor binds it)."""
    assert proxy.process is not None
    report = status_path(Path(proxy.config["store"]["path"]))
    for _ in range(400):
        states = read_worker_states(report, proxy.process.pid) or []
        if len(states) == workers and all(state.serving for state in states):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not every worker serves: {states}")


async def _spread(proxy: ProxyProcess, workers: int, tag: str) -> int:
    """GET metadata on fresh connections (the kernel picks a listener per connection),
    once every worker serves; the number of requests sent."""
    await _all_serving(proxy, workers)
    sent = 200
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for n in range(sent):
            headers = {"X-Request-Id": f"{tag}{n}", "Authorization": "Bearer opaque-token-1"}
            async with fresh.get(f"{proxy.url}/metadata", headers=headers) as r:
                assert r.status == 200
    return sent


def _dlq(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "-c", str(config), "dlq", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(180)
async def test_two_workers_share_the_port_and_the_admin_reads_both_shards(
    fhir_server: NodeFhirServer, tmp_path: Path
) -> None:
    store = tmp_path / "store" / "audit.db"
    shards = [tmp_path / "store" / "audit-0.db", tmp_path / "store" / "audit-1.db"]
    proxy = ProxyProcess(_config(fhir_server.base_url, store), tmp_path)
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:
            sent = await _spread(proxy, 2, "w")
            pages = [
                page
                async for page in audit_event_pages(http, f"{proxy.admin}/fhir/AuditEvent?_count=7")
            ]
        finally:
            await proxy.stop()
        assert proxy.process is not None and proxy.process.returncode == 0
    assert _listeners(proxy.config["listen"]["port"]) == 0, "SIGTERM stopped every worker"
    assert not store.exists(), "with workers the store is the shards only"
    # the admin records its own searches (in shard 0): count the proxied requests only
    in_shards = [_count(s, "request_id LIKE 'w%'") for s in shards]
    assert sum(in_shards) == sent and all(in_shards), in_shards
    served = [entry["resource"] for page in pages for entry in page.get("entry", [])]
    assert len(pages) > 2, "the next links page through both shards"
    assert pages[0]["total"] == sent, "the first page counts both shards"
    proxied = [e for e in served if (request_id_of(e) or "").startswith("w")]
    assert sorted(request_id_of(e) or "" for e in proxied) == sorted(f"w{i}" for i in range(sent))
    assert len({e["id"] for e in served}) == len(served), "no event on two pages"
    hashes = set(re.findall(rb"hmac-sha256:[0-9a-f]+", orjson.dumps(proxied)))
    assert len(hashes) == 1, f"one token key for every worker: {hashes}"
    recorded = [e["recorded"] for e in served]
    assert recorded == sorted(recorded, reverse=True), "merged newest first"
    log = (tmp_path / "proxy.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


@pytest.mark.timeout(180)
async def test_metrics_count_every_worker_s_requests(
    fhir_server: NodeFhirServer, tmp_path: Path
) -> None:
    """Only worker 0 serves ``/metrics``; the requests the kernel gave worker 1 count there
    too, with its histograms' observations."""
    store = tmp_path / "store" / "audit.db"
    proxy = ProxyProcess(_config(fhir_server.base_url, store), tmp_path)
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:
            sent = await _spread(proxy, 2, "m")
            counted = upstream = 0.0
            for _ in range(50):  # the other worker publishes once a second
                async with http.get(f"{proxy.admin}/metrics") as r:
                    text = await r.text()
                counted = sum(_samples(text, "fhir_audit_requests_total").values())
                upstream = sum(_samples(text, "fhir_audit_upstream_seconds_count").values())
                if counted >= sent:
                    break
                await asyncio.sleep(0.1)
        finally:
            await proxy.stop()
    shards = [tmp_path / "store" / f"audit-{n}.db" for n in (0, 1)]
    in_shards = [_count(shard, "request_id LIKE 'm%'") for shard in shards]
    assert all(in_shards), f"the kernel gave both workers requests: {in_shards}"
    assert counted == sent, "worker 0 alone would show only its own share"
    assert upstream == sent, "histograms add up as well"
    published = orjson.loads((tmp_path / "store" / "audit-1.metrics.json").read_bytes())
    assert proxy.process is not None and published["supervisor"] == proxy.process.pid
    assert oct((tmp_path / "store" / "audit-1.metrics.json").stat().st_mode & 0o777) == "0o600"


@pytest.mark.timeout(120)
async def test_workers_stop_when_their_supervisor_is_killed(
    fhir_server: NodeFhirServer, tmp_path: Path
) -> None:
    """SIGKILL of the `run` process alone (not its group): its workers get SIGTERM from
    the kernel, drain and exit, so none serves on unsupervised."""
    proxy = ProxyProcess(_config(fhir_server.base_url, tmp_path / "audit.db"), tmp_path)
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        await _all_serving(proxy, 2)
        await proxy.kill()
    port = proxy.config["listen"]["port"]
    for _ in range(300):
        if _listeners(port) == 0:
            break
        await asyncio.sleep(0.05)
    assert _listeners(port) == 0, "a worker still listens after its supervisor died"


@pytest.mark.timeout(180)
async def test_dlq_list_and_retry_read_every_shard(tmp_path: Path) -> None:
    store = tmp_path / "audit.db"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"store": {"path": str(store)}, "workers": 2}))
    expected: dict[str, int] = {}
    for n in range(2):
        queue = await AuditQueue.open(tmp_path / f"audit-{n}.db", max_bytes=1 << 30)
        try:
            events = [
                {"resourceType": "AuditEvent", "id": f"s{n}e{i}", "recorded": f"2026-01-0{i + 1}"}
                for i in range(3)
            ]
            await queue.append(events)
            claimed = await queue.claim(10, datetime.now(UTC))
            await queue.dead_letter([e.seq for e in claimed], f"422 from shard {n}")
            expected |= {e.event_id: n for e in claimed}
        finally:
            await queue.close()

    listed = await asyncio.to_thread(_dlq, config, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert len({r["seq"] for r in rows}) == 6, "seqs name one event across shards"
    one = next(r for r in rows if r["id"] == "s1e2")
    retried = await asyncio.to_thread(_dlq, config, "retry", "--seq", str(one["seq"]))
    assert retried.stdout == "requeued 1 event(s)\n", retried.stderr
    assert _count(tmp_path / "audit-1.db", "status = 'pending'") == 1
    assert _count(tmp_path / "audit-0.db", "status = 'pending'") == 0
    rest = await asyncio.to_thread(_dlq, config, "retry")
    assert rest.stdout == "requeued 5 event(s)\n", rest.stderr
    assert (await asyncio.to_thread(_dlq, config, "list")).stdout == ""


@pytest.mark.timeout(240)
async def test_kill_9_of_every_worker_then_restart_recovers_intents_in_each_shard(
    tmp_path: Path,
) -> None:
    arrived: list[str] = []
    release = asyncio.Event()

    async def upstream(request: web.Request) -> web.Response:
        await request.read()
        if request.method != "POST":
            return web.json_response({"resourceType": "CapabilityStatement"})
        arrived.append(request.headers["X-Request-Id"])
        await release.wait()
        return web.json_response({"resourceType": "Observation", "id": "1"}, status=201)

    store = tmp_path / "audit.db"
    shards = [tmp_path / "audit-0.db", tmp_path / "audit-1.db"]
    async with serving(("*", "/{tail:.*}", upstream)) as server:
        proxy = ProxyProcess(
            _config(str(server.make_url("/fhir")), store), tmp_path, own_group=True
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await proxy.start(http)
            try:
                await _spread(proxy, 2, "r")
            except BaseException:
                await proxy.stop()
                raise

            async def write(n: int) -> None:
                body = {"resourceType": "Observation", "status": "final"}
                headers = {"X-Request-Id": f"post{n}", "Connection": "close"}
                async with http.post(f"{proxy.url}/Observation", json=body, headers=headers):
                    pass

            writes = [asyncio.create_task(write(n)) for n in range(16)]
            for _ in range(400):
                if len(arrived) == 16:
                    break
                await asyncio.sleep(0.05)
            if len(arrived) < 16:
                release.set()
                await proxy.stop()
                raise AssertionError(f"writes at the upstream: {arrived}")
            await proxy.kill_group()
            results = await asyncio.gather(*writes, return_exceptions=True)
            assert all(isinstance(r, aiohttp.ClientError) for r in results), results
            release.set()
            await proxy.start(http)  # each worker recovers the intents of its own shard
            await _all_serving(proxy, 2)
            await proxy.stop()
    unknown: list[list[str]] = []
    for shard in shards:
        queue = await AuditQueue.open(shard, max_bytes=1 << 30)
        try:
            page, _ = await queue.search(EventQuery(limit=500))
            assert not await queue.orphan_intents()
        finally:
            await queue.close()
        unknown.append(
            sorted(
                request_id_of(q.event) or "" for q in page if q.event["outcome"] == UNKNOWN_OUTCOME
            )
        )
    assert all(unknown), f"each shard recovered its own intents: {unknown}"
    assert sorted(unknown[0] + unknown[1]) == sorted(f"post{n}" for n in range(16))


async def _fill(shard: Path, max_bytes: int) -> None:
    """Fill a shard until its store refuses: full, as a worker's busy shard gets."""
    from proxy.store.faces import StoreFull
    from tests.factories import audit_event

    queue = await AuditQueue.open(shard, max_bytes=max_bytes)
    try:
        n = 0
        with pytest.raises(StoreFull):
            while True:
                await queue.append([audit_event(n + i) for i in range(50)])
                n += 50
    finally:
        await queue.close()


@pytest.mark.timeout(120)
async def test_readiness_reports_every_worker_s_shard(
    fhir_server: NodeFhirServer, tmp_path: Path
) -> None:
    """Worker 0 alone answers `/readyz`: it is not ready while another worker's shard is
    full (that worker fails its requests closed), and says which shard."""
    store = tmp_path / "store" / "audit.db"
    max_bytes = 1024 * 1024
    config = _config(fhir_server.base_url, store)
    config["store"]["max_bytes"] = max_bytes
    proxy = ProxyProcess(config, tmp_path)
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:
            # Worker 1 may still be starting when worker 0 answers: not ready until it
            # serves (its shard perhaps "not created yet"), then ready.
            for _ in range(100):
                async with http.get(f"{proxy.admin}/readyz") as r:
                    report = await r.json()
                if r.status == 200:
                    break
                workers = report["checks"]["workers"]["workers"].values()
                shard = report["checks"]["store"]["other_shards"]["1"]
                assert not all(w["serving"] for w in workers) or shard == {
                    "ok": False,
                    "error": "not created yet",
                }, report
                await asyncio.sleep(0.1)
            assert r.status == 200, report
            assert report["checks"]["store"]["other_shards"]["1"]["ok"] is True
        finally:
            await proxy.stop()
        await _fill(tmp_path / "store" / "audit-1.db", max_bytes)
        await proxy.start(http)
        try:
            async with http.get(f"{proxy.admin}/readyz") as r:
                report = await r.json()
            assert r.status == 503, report
            shard = report["checks"]["store"]["other_shards"]["1"]
            assert shard["ok"] is False and shard["full"] is True
            assert report["checks"]["store"]["failing_closed"] is None, "shard 0 has room"
        finally:
            await proxy.stop()


def _worker_pid(proxy: ProxyProcess, worker: int) -> int:
    """The pid of the process serving as ``worker`` now (a child of the `run` process)."""
    assert proxy.process is not None
    supervisor = proxy.process.pid
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    for pid in map(int, children):
        with contextlib.suppress(FileNotFoundError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[-3:-1] == [b"--worker", str(worker).encode()]:
                return pid
    raise AssertionError(f"no worker {worker} among {children}")


def _request_ids(shard: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(shard)) as conn:
        rows = conn.execute("SELECT request_id FROM events WHERE request_id LIKE 'k%'")
        return {row[0] for row in rows}


@pytest.mark.timeout(180)
async def test_a_worker_killed_is_started_again_delivers_its_shard_and_shows_in_readyz(
    fhir_server: NodeFhirServer, repository: RecordingRepository, tmp_path: Path
) -> None:
    """kill -9 of worker 1: the supervisor notices, says so, starts it again (it delivers
    the events its shard holds at once), and `/readyz` shows the restart."""
    store = tmp_path / "store" / "audit.db"
    # Only a flush at a worker's start (or the drain at stop) can deliver within the test.
    repo = {"url": repository.url, "flush_interval_ms": 600_000}
    proxy = ProxyProcess(_config(fhir_server.base_url, store, repository=repo), tmp_path)
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:
            await _spread(proxy, 2, "k")
            held = _request_ids(tmp_path / "store" / "audit-1.db")
            assert held, "the kernel gave worker 1 some of the connections"
            assert repository.events() == []
            killed = _worker_pid(proxy, 1)
            os.kill(killed, signal.SIGKILL)

            delivered = await repository.wait_for(len(held), within_s=60)
            assert {request_id_of(e) for e in delivered} == held, "shard 1, by its new worker"
            for _ in range(200):
                async with http.get(f"{proxy.admin}/readyz") as r:
                    report = await r.json()
                if r.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status == 200, report
            one = report["checks"]["workers"]["workers"]["1"]
            assert one == {
                "serving": True,
                "pid": _worker_pid(proxy, 1),
                "restarts": 1,
                "last_exit": "killed by SIGKILL",
            }
            assert one["pid"] != killed
            assert report["checks"]["workers"]["workers"]["0"]["restarts"] == 0
            await _spread(proxy, 2, "after")
        finally:
            await proxy.stop()
    assert proxy.process is not None and proxy.process.returncode == 0
    log = (tmp_path / "proxy.log").read_text()
    assert f"worker 1 (pid {killed}) killed by SIGKILL: starting it again" in log, log[-3000:]


@pytest.mark.timeout(180)
async def test_a_second_instance_on_the_same_port_is_refused(
    fhir_server: NodeFhirServer, tmp_path: Path
) -> None:
    """Another proxy with the same listen port (its own upstream and store) must not
    start and take a share of this one's connections."""

    async def elsewhere(request: web.Request) -> web.Response:
        return web.json_response({"resourceType": "OperationOutcome"}, status=404)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = ProxyProcess(_config(fhir_server.base_url, tmp_path / "a" / "audit.db"), tmp_path / "a")
    async with serving(("*", "/{tail:.*}", elsewhere)) as other_upstream:
        config = _config(str(other_upstream.make_url("/fhir")), tmp_path / "b" / "audit.db")
        config["listen"] = first.config["listen"]
        second = tmp_path / "b" / "config.yaml"
        second.write_text(yaml.safe_dump(config))
        async with aiohttp.ClientSession() as http:
            await first.start(http)
            try:
                await _all_serving(first, 2)
                status, err = await run_until_exit(second, within_s=30)
                port = first.config["listen"]["port"]
                assert status == 1, err
                assert err.splitlines() == [
                    f"fhir-audit-proxy: error: cannot listen on 127.0.0.1:{port}"
                    " (listen.host/listen.port): address already in use; stop the process"
                    " that uses it or choose another port"
                ]
                assert _listeners(port) == 2
                statuses = []
                connector = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=connector) as fresh:
                    for _ in range(20):
                        async with fresh.get(f"{first.url}/metadata") as r:
                            statuses.append(r.status)
                assert statuses == [200] * 20
            finally:
                await first.stop()
