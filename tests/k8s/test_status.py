"""The status listener of an injected sidecar, in the proxy as it runs: the app's probes
moved there by the injector, checked against a real FHIR server (the Node one), a port
nobody listens on, a real gRPC server with the standard health service and a TLS server;
and ``/metrics`` for Prometheus. No probe leaves an audit event."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.factories import NodeFhirServer, StartProxy, free_port, write_certificate

ROOT = Path(__file__).resolve().parents[2]


def probes(fhir_port: int, dead_port: int) -> dict[str, Any]:
    return {
        "hapi/readyz": {"kind": "http", "port": fhir_port, "path": "/fhir/metadata"},
        "hapi/livez": {"kind": "tcp", "port": fhir_port},
        "gone/readyz": {"kind": "http", "port": dead_port, "path": "/fhir/metadata"},
        "gone/livez": {"kind": "tcp", "port": dead_port},
        "hapi/startupz": {"kind": "http", "port": fhir_port, "path": "/fhir/Nothing/here"},
    }


async def status_of(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text()


async def test_probes_pass_for_a_live_app_fail_for_a_dead_one_and_leave_no_event(
    fhir_server: NodeFhirServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    fhir_port = int(fhir_server.base_url.rsplit(":", 1)[1].split("/")[0])
    port = free_port()
    proxy = await start_proxy(
        fhir_server.base_url,
        status={"host": "127.0.0.1", "port": port, "app_probes": probes(fhir_port, free_port())},
    )
    base = f"http://127.0.0.1:{port}/app-health"
    assert await status_of(http, f"{base}/hapi/readyz") == (200, "ok\n")
    assert await status_of(http, f"{base}/hapi/livez") == (200, "ok\n")
    status, text = await status_of(http, f"{base}/gone/readyz")
    assert status == 503 and "ClientConnectorError" in text
    status, text = await status_of(http, f"{base}/gone/livez")
    assert status == 503 and "ConnectionRefusedError" in text
    status, text = await status_of(http, f"{base}/hapi/startupz")
    assert (status, text) == (503, f"GET /fhir/Nothing/here on port {fhir_port} answered 404\n")
    assert (await status_of(http, f"{base}/hapi/unknown"))[0] == 404
    # The probes went to the app, not through the proxy: nothing was audited.
    assert await proxy.stored_events() == []


async def test_metrics_are_served_on_the_status_port_unless_prometheus_is_off(
    fhir_server: NodeFhirServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    proxy = await start_proxy(fhir_server.base_url, status={"host": "127.0.0.1", "port": port})
    series = 'fhir_audit_requests_total{kind="search-type",status_class="2xx"} '

    async def searches() -> float:
        status, text = await status_of(http, f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        # The queue is read fresh, as the admin /metrics reads it.
        assert 'fhir_audit_queue_events{status="pending"}' in text
        found = [line for line in text.splitlines() if line.startswith(series)]
        return float(found[0].removeprefix(series)) if found else 0.0

    before = await searches()
    async with http.get(f"{proxy.url}/Patient?_count=1") as response:
        assert response.status == 200
    # The proxy's own series (the registry is the process's: other tests count too).
    assert await searches() == before + 1
    off = free_port()
    await start_proxy(
        fhir_server.base_url,
        status={"host": "127.0.0.1", "port": off},
        telemetry={"prometheus": False},
    )
    assert (await status_of(http, f"http://127.0.0.1:{off}/metrics"))[0] == 404


@pytest.fixture
async def grpc_health_server() -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(grace=None)


async def test_grpc_probes_ask_the_standard_health_service(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    grpc_health_server: tuple[int, health.aio.HealthServicer],
) -> None:
    grpc_port, servicer = grpc_health_server
    await servicer.set("fhir", health_pb2.HealthCheckResponse.SERVING)
    port = free_port()
    app_probes = {
        "app/livez": {"kind": "grpc", "port": grpc_port, "service": "fhir"},
        "app/readyz": {"kind": "grpc", "port": grpc_port, "service": "billing"},
        "app/startupz": {"kind": "grpc", "port": free_port(), "timeout_s": 1},
    }
    await start_proxy(
        fhir_server.base_url,
        status={"host": "127.0.0.1", "port": port, "app_probes": app_probes},
    )
    base = f"http://127.0.0.1:{port}/app-health/app"
    assert await status_of(http, f"{base}/livez") == (200, "ok\n")
    assert await status_of(http, f"{base}/readyz") == (
        503,
        f"gRPC health on port {grpc_port}: NOT_FOUND\n",
    )
    status, text = await status_of(http, f"{base}/startupz")
    assert status == 503 and "UNAVAILABLE" in text
    await servicer.set("fhir", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await status_of(http, f"{base}/livez") == (
        503,
        f"gRPC health on port {grpc_port}: NOT_SERVING\n",
    )


async def test_https_probes_are_not_verified_as_the_kubelet_does_not(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    write_certificate(tmp_path, "app-with-its-own-cert")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=204 if request.headers.get("X-Probe") == "yes" else 500)

    app = web.Application()
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    tls_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", tls_port, ssl_context=context).start()
    try:
        port = free_port()
        probe = {
            "kind": "http",
            "port": tls_port,
            "path": "/ready",
            "scheme": "HTTPS",
            "headers": {"X-Probe": "yes"},
        }
        await start_proxy(
            fhir_server.base_url,
            status={"host": "127.0.0.1", "port": port, "app_probes": {"app/readyz": probe}},
        )
        url = f"http://127.0.0.1:{port}/app-health/app/readyz"
        assert await status_of(http, url) == (200, "ok\n")
    finally:
        await runner.cleanup()


def test_a_status_port_in_use_is_a_one_line_error_naming_the_setting(
    fhir_server: NodeFhirServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")} | {
            "FHIR_AUDIT_LISTEN__HOST": "127.0.0.1",
            "FHIR_AUDIT_LISTEN__PORT": str(free_port()),
            "FHIR_AUDIT_ADMIN__PORT": str(free_port()),
            "FHIR_AUDIT_STATUS__HOST": "127.0.0.1",
            "FHIR_AUDIT_STATUS__PORT": str(port),
            "FHIR_AUDIT_UPSTREAM__URL": fhir_server.base_url,
            "FHIR_AUDIT_STORE__PATH": str(tmp_path / "audit.db"),
        }
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "run"],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert result.returncode == 1
    assert (
        f"fhir-audit-proxy: error: cannot listen on 127.0.0.1:{port} (status.host/status.port)"
        in result.stderr
    )
