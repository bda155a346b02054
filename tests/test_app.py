"""The proxy application's wiring: what its upstream session does between requests, and
its maintenance."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import PRUNE_EVERY_S, build_proxy_app, stop_summary
from proxy.store.queue import AuditQueue
from proxy.store.records import QueueStats
from tests.factories import (
    NodeFhirServer,
    OpenStore,
    ProxyProcess,
    StartProxy,
    audit_event,
    free_port,
    serving,
    serving_proxy,
    settings_for,
)


async def test_upstream_cookies_never_travel_to_another_clients_request(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The proxy is no browser: a cookie one client's answer set upstream is passed back
    to that client only, never kept and sent upstream with the next request."""
    received: list[str | None] = []

    async def upstream(request: web.Request) -> web.Response:
        received.append(request.headers.get("Cookie"))
        response = web.json_response(
            {"resourceType": "Patient", "id": "1"}, content_type="application/fhir+json"
        )
        response.set_cookie("session", "alice-session-secret", path="/")
        return response

    async with serving(("GET", "/fhir/{tail:.*}", upstream)) as fhir:
        # A host name (not an IP literal, whose cookies aiohttp's jar refuses anyway).
        base = f"http://localhost:{fhir.port}/fhir"
        async with serving_proxy(build_proxy_app(settings_for(base, tmp_path))) as server:
            for _ in range(2):
                async with http.get(f"{server.urls()[0]}/fhir/Patient/1") as response:
                    assert response.status == 200
                    assert "alice-session-secret" in response.headers["Set-Cookie"]
    assert received == [None, None]


def _fresh_boot_launcher() -> list[str]:
    """A command that runs another as on a host booted seconds ago: a time namespace whose
    monotonic clock (what the event loop's ``time()`` reads) starts near zero."""
    uptime = time.monotonic()
    launcher = ["unshare", "--time", f"--monotonic=-{max(int(uptime) - 2, 0)}"]
    probe = subprocess.run(
        [*launcher, sys.executable, "-c", "import time; print(time.monotonic())"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        if uptime < PRUNE_EVERY_S:
            return []  # the host did boot recently
        pytest.skip(f"no time namespace here: {probe.stderr.strip()}")
    assert float(probe.stdout) < 60, probe.stdout
    return launcher


async def test_retention_pruning_runs_at_start_on_a_host_booted_recently(
    fhir_server: NodeFhirServer, tmp_path: Path
) -> None:
    """Delivered events past retention are deleted when the proxy starts, whatever the
    time since the host booted, not first an hour after boot."""
    store = tmp_path / "audit.db"
    queue = await AuditQueue.open(store, max_bytes=1 << 30)
    try:
        await queue.append([audit_event(n) for n in range(4)])
        old = await queue.claim(3, datetime.now(UTC))
        await queue.ack([q.seq for q in old], datetime.now(UTC) - timedelta(days=40))
    finally:
        await queue.close()
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstream": {"url": fhir_server.base_url},
        "store": {"path": str(store), "retention_days": 30},
    }
    proxy = ProxyProcess(config, tmp_path, launcher=_fresh_boot_launcher())
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:
            for _ in range(100):
                async with http.get(f"{proxy.admin}/readyz") as r:
                    stats = (await r.json())["checks"]["store"]
                if stats["delivered"] == 0:
                    break
                await asyncio.sleep(0.1)
        finally:
            await proxy.stop()
    assert (stats["delivered"], stats["pending"]) == (0, 1), stats
    assert "pruned 3 delivered events" in proxy.log.read_text()


async def test_readiness_says_every_shard_is_full_while_the_disk_they_share_is_full(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tiny_volume: Path,
    open_store: OpenStore,
) -> None:
    """Worker 0 cannot see another worker's writes fail, but it can see their disk: while
    the disk the shards share is full, no shard is reported ok."""
    await (await open_store(tiny_volume / "audit-1.db", max_bytes=1 << 30)).close()
    proxy = await start_proxy(
        fhir_server.base_url, store={"path": tiny_volume / "audit.db"}, workers=2
    )
    async with http.get(f"{proxy.admin_url}/readyz") as r:
        assert r.status == 200, await r.text()
    filler = tiny_volume / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    try:
        async with http.get(f"{proxy.admin_url}/readyz") as r:
            report = await r.json()
        assert r.status == 503, report
        store = report["checks"]["store"]
        assert (store["ok"], store["disk_full"]) == (False, True), store
        other = store["other_shards"]["1"]
        assert (other["ok"], other["full"], other["disk_full"]) == (False, False, True), other
    finally:
        filler.unlink()
    async with http.get(f"{proxy.admin_url}/readyz") as r:
        assert r.status == 200, await r.text()


@pytest.mark.parametrize(
    ("pending", "dead", "repository", "said"),
    [
        (0, 0, True, "stopped: all events delivered"),
        (
            1,
            0,
            True,
            "stopped: 1 event left undelivered in /d/audit.db; they are delivered at the next"
            " start",
        ),
        (
            12,
            0,
            False,
            "stopped: 12 events left undelivered in /d/audit.db; no repository is configured,"
            " so they stay there",
        ),
        (
            0,
            2,
            True,
            "stopped: all events delivered; 2 events the repository refused wait in its"
            " dead-letter queue (fhir-audit-proxy dlq list)",
        ),
    ],
)
def test_the_stop_summary_says_what_is_left_undelivered_and_where(
    pending: int, dead: int, repository: bool, said: str
) -> None:
    stats = QueueStats(pending=pending, delivered=5, dead=dead, intents=0, size_bytes=0)
    assert stop_summary(stats, Path("/d/audit.db"), repository=repository) == said
