"""Shared fixtures: a real upstream FHIR server (Medplum's engine on Node), a running proxy
in front of it, and a recording audit repository."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.app import ADMIN_URL, QUEUE, build_proxy_app
from proxy.audit.balp import new_event_id
from proxy.settings import Settings, load_settings
from proxy.store.queue import AuditQueue

ROOT = Path(__file__).resolve().parent.parent
TESTSERVER = ROOT / "testserver" / "server.mjs"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run every async test on uvloop, as the proxy runs in production."""
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class NodeFhirServer:
    """The bundled test FHIR server in a subprocess."""

    base_url: str
    process: subprocess.Popen[str]


def start_fhir_server(port: int = 0) -> NodeFhirServer:
    """Start ``testserver/server.mjs`` and wait for its ``listening`` line."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is required for the test FHIR server (see .ci/run)")
    process = subprocess.Popen(
        [node, str(TESTSERVER), str(port), "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=TESTSERVER.parent,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening "):
        process.kill()
        pytest.fail(f"test FHIR server did not start: {line}{process.stdout.read()}")
    return NodeFhirServer(base_url=line.split()[1].strip(), process=process)


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[NodeFhirServer]:
    """One real FHIR server (in memory) for the whole session."""
    server = start_fhir_server()
    yield server
    stop_fhir_server(server)


def stop_fhir_server(server: NodeFhirServer) -> None:
    server.process.terminate()
    server.process.wait(timeout=10)
    if server.process.stdout is not None:
        server.process.stdout.close()


@dataclass
class RecordingRepository:
    """An audit repository that records what it receives; can be told to fail."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    """Statuses to answer with, one per coming request, before answering 200 again."""
    url: str = ""

    def events(self) -> list[dict[str, Any]]:
        """Every AuditEvent received, in arrival order (bundle, transaction or single)."""
        out: list[dict[str, Any]] = []
        for body in (r["body"] for r in self.requests if r["status"] < 300):
            if body.get("resourceType") == "Bundle":
                out.extend(e["resource"] for e in body.get("entry", []))
            else:
                out.append(body)
        return out

    async def wait_for(self, count: int, within_s: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events have arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while len(self.events()) < count:
            if loop.time() > deadline:
                raise AssertionError(
                    f"expected {count} events, repository has {len(self.events())}"
                )
            await asyncio.sleep(0.02)
        return self.events()

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        status = self.fail_next.pop(0) if self.fail_next else 200
        self.requests.append(
            {"path": request.path, "headers": dict(request.headers), "body": body, "status": status}
        )
        if status >= 300:
            return web.json_response({"resourceType": "OperationOutcome"}, status=status)
        return web.json_response(
            {"resourceType": "Bundle", "type": "batch-response"}, status=status
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serving(*routes: tuple[str, str, Handler]) -> AsyncIterator[TestServer]:
    """A real HTTP server on loopback with ``routes`` (method, path, handler), closed on
    exit. Upstreams, repositories and IdPs in the tests are made with it."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def repository() -> AsyncIterator[RecordingRepository]:
    repo = RecordingRepository()
    async with serving(("POST", "/{tail:.*}", repo.handle)) as server:
        repo.url = str(server.make_url("/fhir"))
        yield repo


@dataclass
class RunningProxy:
    """A proxy listening on loopback, with its admin listener."""

    url: str
    """The proxy's FHIR base URL."""
    admin_url: str
    app: web.Application
    settings: Settings
    server: TestServer

    @property
    def queue(self) -> AuditQueue:
        return self.app[QUEUE]

    async def stored_events(self) -> list[dict[str, Any]]:
        """Every event in the local store, in queue order."""
        from proxy.store.records import EventQuery

        page, _ = await self.queue.search(EventQuery(newest_first=False, limit=10_000))
        return [q.event for q in page]


StartProxy = Callable[..., Awaitable[RunningProxy]]


def settings_for(upstream_url: str, store_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test proxy: loopback, ephemeral ports, a store under ``store``."""
    base: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": upstream_url, "timeout_s": 10},
        "store": {"path": store_dir / "audit.db"},
        "admin": {"host": "127.0.0.1", "port": 0},
        "shutdown_grace_s": 2,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(None, **base)


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """Factory: start a proxy in front of ``upstream`` with settings overrides."""
    servers: list[TestServer] = []

    async def start(upstream_url: str, **overrides: Any) -> RunningProxy:
        settings = settings_for(upstream_url, tmp_path, **overrides)
        app = build_proxy_app(settings)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        base_path = URL(settings.upstream.url).path.rstrip("/")
        return RunningProxy(
            url=str(server.make_url(base_path)),
            admin_url=app[ADMIN_URL],
            app=app,
            settings=settings,
            server=server,
        )

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def audit_event(n: int, **extra: Any) -> dict[str, Any]:
    """A small valid R4 AuditEvent, numbered in ``entity[0].what.identifier``."""
    return {
        "resourceType": "AuditEvent",
        "id": new_event_id(),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "action": "R",
        "recorded": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "outcome": "0",
        "agent": [{"who": {"display": "test"}, "requestor": True}],
        "source": {"observer": {"display": "fhir-audit-proxy"}},
        "entity": [{"what": {"identifier": {"value": f"n-{n}"}}}],
        **extra,
    }


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[AuditQueue]:
    q = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    yield q
    await q.close()
