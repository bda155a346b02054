"""A sidecar as the injector starts it: ``fhir-audit-proxy run`` in its own process with the
OpenTelemetry SDK's variables and the pod's downward-API variables set, exporting to a real
OTLP/HTTP receiver that decodes the protobuf. The environment wins over the configuration
(whose endpoint here answers nothing), and no query, id or name reaches the collector."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.factories import (
    POD_ENV,
    NodeFhirServer,
    OtlpCollector,
    ProxyProcess,
    attributes_of,
    free_port,
    new_patient,
    serving,
)

POD = POD_ENV


async def _until(condition: Any, what: str, within_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


def _config(fhir_server: NodeFhirServer, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A sidecar's configuration in front of ``fhir_server``, with ``extra`` keys."""
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstream": {"url": fhir_server.base_url, "timeout_s": 10},
        "store": {"path": str(tmp_path / "audit.db")},
        "log_level": "WARNING",
        **extra,
    }


async def test_a_sidecar_exports_as_the_sdk_environment_says(
    fhir_server: NodeFhirServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    collector = OtlpCollector()
    async with serving(("POST", "/v1/{signal}", collector.receive)) as receiver:
        config = _config(
            fhir_server,
            tmp_path,
            telemetry={"service_name": "from-config", "otlp_endpoint": "http://127.0.0.1:1"},
        )
        env = {
            **POD,
            "OTEL_SERVICE_NAME": "hapi-audit",
            "OTEL_RESOURCE_ATTRIBUTES": (
                "k8s.container.name=fhir-audit-proxy,deployment.environment.name=ward%207"
            ),
            "OTEL_EXPORTER_OTLP_ENDPOINT": str(receiver.make_url("")).rstrip("/"),
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=ward-7,authorization=Bearer%20collector-token",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        proxy = ProxyProcess(config, tmp_path, env=env)
        try:
            await proxy.start(http)
            patient = await new_patient(
                http, proxy.url, name=[{"family": "Chalmers"}], birthDate="1974-12-25"
            )
            async with http.get(f"{proxy.url}/Patient/{patient['id']}?_elements=name") as r:
                assert r.status == 200
            async with http.get(f"{proxy.url}/Patient?family=Chalmers&birthdate=1974-12-25") as r:
                assert r.status == 200
            await _until(
                lambda: len([s for s, _ in collector.spans() if s.kind == s.SPAN_KIND_SERVER]) == 3,
                "the three server spans were not exported",
            )
            await _until(
                lambda: "http.server.request.duration" in collector.last_metrics(),
                "the HTTP metrics were not exported",
            )
        finally:
            await proxy.stop()

    # Where it went and with what: the environment's endpoint and headers.
    assert collector.content_types == {"application/x-protobuf"}
    assert {h.get("x-tenant") for h in collector.headers} == {"ward-7"}
    assert {h.get("Authorization") for h in collector.headers} == {"Bearer collector-token"}

    # Who it is: the resource from the environment, over the configuration.
    spans = collector.spans()
    metrics = collector.last_metrics()
    for resource in [r for _, r in spans] + [r for _, r in metrics.values()]:
        assert resource["service.name"] == "hapi-audit"
        assert resource["deployment.environment.name"] == "ward 7"
        assert resource["k8s.container.name"] == "fhir-audit-proxy"
        assert {k: resource[k] for k in ("k8s.pod.name", "k8s.pod.uid")} == {
            "k8s.pod.name": "hapi-7d9f-x2x8q",
            "k8s.pod.uid": "0b5c3c7e-4a4e-4d38-9b7e-2d0f8d1c6a11",
        }
        assert (resource["k8s.namespace.name"], resource["k8s.node.name"]) == ("fhir", "node-3")
        assert resource["k8s.pod.ip"] == "10.42.0.17"

    # What: spans and metrics by the HTTP semantic conventions.
    names = sorted(span.name for span, _ in spans)
    assert names == sorted(
        ["POST /fhir/{type}", "GET /fhir/{type}/{id}", "GET /fhir/{type}"] * 2 + ["audit write"] * 3
    )
    (read,) = [s for s, _ in spans if s.kind == s.SPAN_KIND_SERVER and "{id}" in s.name]
    attributes = attributes_of(read.attributes)
    assert attributes["http.route"] == "/fhir/{type}/{id}"
    assert attributes["url.path"] == "/fhir/Patient/REDACTED"
    assert attributes["http.response.status_code"] == 200
    assert attributes["fhir.interaction"] == "read"
    units = {name: metric.unit for name, (metric, _) in metrics.items()}
    assert {
        "http.server.request.duration": "s",
        "http.client.request.duration": "s",
        "http.server.active_requests": "{request}",
        "fhir_audit.requests": "{request}",
        "fhir_audit.write.duration": "s",
    }.items() <= units.items()
    server_duration, _ = metrics["http.server.request.duration"]
    routes = {
        (attributes["http.request.method"], attributes["http.route"]): point.count
        for point in server_duration.histogram.data_points
        for attributes in [attributes_of(point.attributes)]
    }
    assert routes == {
        ("POST", "/fhir/{type}"): 1,
        ("GET", "/fhir/{type}"): 1,
        ("GET", "/fhir/{type}/{id}"): 1,
    }

    # Never the patient: not its id, its name, its birth date, nor any query.
    sent = b"".join(collector.bodies)
    for secret in (patient["id"], "Chalmers", "1974-12-25", "_elements", "family="):
        assert secret.encode() not in sent


async def test_each_worker_of_a_sidecar_reports_as_an_instance_of_its_own(
    fhir_server: NodeFhirServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The injector names the instance after the pod; with ``workers: 2`` each worker pushes
    cumulative series of its own, which a backend keeps apart only by
    (``service.name``, ``service.instance.id``)."""
    collector = OtlpCollector()
    async with serving(("POST", "/v1/{signal}", collector.receive)) as receiver:
        config = _config(fhir_server, tmp_path, workers=2)
        env = {
            **POD,
            "OTEL_SERVICE_NAME": "hapi-audit",
            "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=fhir.hapi-7d9f-x2x8q.fhir-audit-proxy",
            "OTEL_EXPORTER_OTLP_ENDPOINT": str(receiver.make_url("")).rstrip("/"),
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
        }
        proxy = ProxyProcess(config, tmp_path, own_group=True, env=env)
        try:
            await proxy.start(http)
            await _until(
                lambda: {r.get("fhir_audit.worker") for r in collector.metric_resources()}
                == {0, 1},
                "both workers did not export metrics",
            )
        finally:
            await proxy.stop()

    instances = {
        (r["service.name"], r["fhir_audit.worker"], r["service.instance.id"])
        for r in collector.metric_resources()
    }
    assert instances == {
        ("hapi-audit", 0, "fhir.hapi-7d9f-x2x8q.fhir-audit-proxy.worker-0"),
        ("hapi-audit", 1, "fhir.hapi-7d9f-x2x8q.fhir-audit-proxy.worker-1"),
    }
