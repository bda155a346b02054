"""Shared fixtures: a real upstream FHIR server (Medplum's engine on Node), a running proxy
in front of it, and a recording audit repository. What they are built from lives in
``tests/factories.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.app import ADMIN_URL, build_proxy_app
from proxy.store.queue import AuditQueue
from tests.factories import (
    FormatUpstream,
    NodeFhirServer,
    RecordingRepository,
    RunningProxy,
    ScriptedRepository,
    StartProxy,
    format_upstream,
    serving,
    settings_for,
    start_fhir_server,
    stop_fhir_server,
)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run every async test on uvloop, as the proxy runs in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[NodeFhirServer]:
    """One real FHIR server (in memory) for the whole session."""
    server = start_fhir_server()
    yield server
    stop_fhir_server(server)


@pytest.fixture
async def fhir_formats(fhir_server: NodeFhirServer) -> AsyncIterator[FormatUpstream]:
    """The test FHIR server speaking JSON, XML and YAML (:class:`FormatUpstream`)."""
    async with format_upstream(fhir_server.base_url) as upstream:
        yield upstream


@pytest.fixture
async def repository() -> AsyncIterator[RecordingRepository]:
    repo = RecordingRepository()
    async with serving(("POST", "/{tail:.*}", repo.handle)) as server:
        repo.url = str(server.make_url("/fhir"))
        yield repo


@pytest.fixture
async def scripted_repository() -> AsyncIterator[ScriptedRepository]:
    repo = ScriptedRepository()
    async with serving(("*", "/{tail:.*}", repo.handle)) as server:
        repo.url = str(server.make_url("/fhir"))
        yield repo


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


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[AuditQueue]:
    q = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    yield q
    await q.close()
