"""The status listener of a sidecar injected into a pod (``status.port``), as Istio's agent
serves its status port:

- ``GET /app-health/<container>/<probe>``: the app container's kubelet probe that the
  injector moved here (``status.app_probes``), done from inside the pod straight to the
  app on 127.0.0.1 (the redirect exempts the proxy's own connections), so a kubelet
  probe never passes through the proxy: it is neither audited as an access to patient
  data nor answered by the proxy while the FHIR server is dead. 200 when the check
  passes (for HTTP an answer from 200 to 399, as the kubelet counts it; for TCP a
  connection; for gRPC ``SERVING`` from the standard health service), else 503 with the
  reason.
- ``GET /metrics``: the proxy's Prometheus metrics (when ``telemetry.prometheus``), for
  Prometheus to scrape from the pod; the admin API stays on loopback.

It serves no audit data and takes no credentials.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.http.server import listen_hosts
from proxy.settings import AppProbe, StatusSettings

log = logging.getLogger(__name__)

APP_HOST = "127.0.0.1"
"""Where the app is checked: where the proxy itself reaches it."""
USER_AGENT = "fhir-audit-proxy-probe"

PROBES = web.AppKey("app_probes", Mapping[str, AppProbe])
SESSION = web.AppKey("probe_session", aiohttp.ClientSession)
MetricsText = Callable[[], Awaitable[bytes]]
METRICS: web.AppKey[MetricsText] = web.AppKey("metrics_text")


class ProbeFailed(Exception):
    """The app failed the check; ``str()`` says how."""


def _insecure() -> ssl.SSLContext:
    # The kubelet does not verify an HTTPS probe's certificate either.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def check_http(session: aiohttp.ClientSession, probe: AppProbe) -> None:
    """An ``httpGet`` probe: passes on an answer from 200 to 399."""
    scheme = probe.scheme.lower()
    url = f"{scheme}://{APP_HOST}:{probe.port}{probe.path}"
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*", **probe.headers}
    try:
        async with session.get(
            url,
            headers=headers,
            allow_redirects=False,
            ssl=_insecure() if scheme == "https" else False,
            timeout=aiohttp.ClientTimeout(total=probe.timeout_s),
        ) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ProbeFailed(f"GET {probe.path} on port {probe.port}: {type(exc).__name__}") from exc
    if not 200 <= status < 400:
        raise ProbeFailed(f"GET {probe.path} on port {probe.port} answered {status}")


async def check_tcp(probe: AppProbe) -> None:
    """A ``tcpSocket`` probe: passes when the port accepts a connection."""
    try:
        async with asyncio.timeout(probe.timeout_s):
            _, writer = await asyncio.open_connection(APP_HOST, probe.port)
    except (OSError, TimeoutError) as exc:
        raise ProbeFailed(f"port {probe.port}: {type(exc).__name__}") from exc
    writer.close()
    await writer.wait_closed()


async def check_grpc(probe: AppProbe) -> None:
    """A ``grpc`` probe: the standard gRPC health service answers ``SERVING``."""
    # Imported here: only pods with gRPC probes pay for loading gRPC.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"{APP_HOST}:{probe.port}") as channel:
        # The stubs package declares the stub's methods on the servicer only.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            answer = await stub.Check(
                health_pb2.HealthCheckRequest(service=probe.service), timeout=probe.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise ProbeFailed(f"gRPC health on port {probe.port}: {exc.code().name}") from exc
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        raise ProbeFailed(f"gRPC health on port {probe.port}: {status}")


async def run_probe(session: aiohttp.ClientSession, probe: AppProbe) -> None:
    """Check the app as ``probe`` says; raises :class:`ProbeFailed` when it fails."""
    if probe.kind == "http":
        await check_http(session, probe)
    elif probe.kind == "tcp":
        await check_tcp(probe)
    else:
        await check_grpc(probe)


async def _app_health(request: web.Request) -> web.Response:
    key = f"{request.match_info['container']}/{request.match_info['probe']}"
    probe = request.app[PROBES].get(key)
    if probe is None:
        raise web.HTTPNotFound(text=f"no probe {key}\n")
    try:
        await run_probe(request.app[SESSION], probe)
    except ProbeFailed as exc:
        return web.Response(status=503, text=f"{exc}\n")
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=await request.app[METRICS](), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    # A new connection for every probe, as the kubelet makes: a kept-alive connection
    # would pass a probe after the app stopped accepting new ones.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        app[SESSION] = session
        yield


def build_status_app(settings: StatusSettings, metrics: MetricsText | None) -> web.Application:
    """The status listener's application; ``metrics`` renders the Prometheus text (None:
    no ``/metrics``)."""
    app = web.Application()
    app[PROBES] = settings.app_probes
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_get("/app-health/{container}/{probe}", _app_health)
    if metrics is not None:
        app[METRICS] = metrics
        app.router.add_get("/metrics", _metrics)
    return app


async def serving_status(
    settings: StatusSettings, metrics: MetricsText | None
) -> AsyncIterator[None]:
    """Serve the status listener while the caller's context runs (``settings.port`` set)."""
    assert settings.port is not None
    runner = web.AppRunner(build_status_app(settings, metrics), access_log=None)
    await runner.setup()
    try:
        hosts = listen_hosts(settings.host)
        for host in hosts:
            await web.TCPSite(runner, host, settings.port).start()
        log.info(
            "status listener on %s (%d app probes)",
            ", ".join(f"{h}:{settings.port}" for h in hosts),
            len(settings.app_probes),
        )
        yield
    finally:
        await runner.cleanup()
