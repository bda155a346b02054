"""Traces, metrics and logs of a running proxy: spans and metrics read back with the SDK's
in-memory exporters, the traceparent the upstream receives and the one stored on the
AuditEvent, Prometheus text still on /metrics, and once the whole export over real OTLP/HTTP
to a loopback collector that decodes the protobuf."""

from __future__ import annotations

import asyncio
import contextvars
import io
import logging
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from proxy import telemetry
from proxy.app import ADMIN_URL, QUEUE, build_proxy_app, proxy_listener
from proxy.audit.validate import validate_event
from proxy.exchange import Exchange
from proxy.http.server import Server
from proxy.store.records import EventQuery
from tests.factories import (
    STOP_GRACE_S,
    FhirDouble,
    OtlpCollector,
    RecordingRepository,
    StartProxy,
    exchange,
    serving,
    settings_for,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkci1ob3VzZSJ9.secret-signature-part"
PATIENT_ID = "pat-4711-chalmers"


class Upstream:
    """A FHIR server stand-in that records the headers it receives."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        body = {"resourceType": "Patient", "id": PATIENT_ID, "name": [{"family": "Chalmers"}]}
        return web.json_response(body, content_type="application/fhir+json")


async def start(
    tmp_path: Path, upstream_url: str, running: telemetry.Telemetry | None = None, **overrides: Any
) -> tuple[web.Application, Server]:
    settings = settings_for(upstream_url, tmp_path, **overrides)
    app = build_proxy_app(settings)
    if running is not None:
        app[telemetry.TELEMETRY] = running
    server = Server(app, proxy_listener)
    await server.start(host="127.0.0.1", port=0)
    return app, server


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    recorder = Upstream()
    async with serving(("*", "/{tail:.*}", recorder.handle)) as server:
        yield recorder, str(server.make_url("/fhir"))


async def test_spans_metrics_and_the_trace_on_the_audit_event(
    tmp_path: Path, upstream: tuple[Upstream, str], http: aiohttp.ClientSession
) -> None:
    recorder, upstream_url = upstream
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    running = telemetry.Telemetry(
        settings_for(upstream_url, tmp_path).telemetry,
        span_processors=[SimpleSpanProcessor(spans)],
        metric_readers=[reader],
    )
    app, server = await start(tmp_path, upstream_url, running)
    try:
        async with http.get(
            f"{server.urls()[0]}/fhir/Patient/{PATIENT_ID}",
            headers={
                "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                "Authorization": f"Bearer {TOKEN}",
                "X-Request-Id": "req-telemetry-1",
            },
        ) as response:
            assert response.status == 200
        async with http.get(app[ADMIN_URL] + "/metrics") as metrics:
            prometheus = await metrics.text()
        page, _ = await app[QUEUE].search(EventQuery(newest_first=False, limit=10))
        stored = [q.event for q in page]
        data = reader.get_metrics_data()
    finally:
        await server.stop(STOP_GRACE_S)

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    by_kind = {s.kind: s for s in finished}
    server_span = by_kind[SpanKind.SERVER]
    client_span = by_kind[SpanKind.CLIENT]
    write_span = next(s for s in finished if s.name == "audit write")
    assert server_span.context is not None and client_span.context is not None
    # The caller's trace continues through the proxy.
    assert format(server_span.context.trace_id, "032x") == CLIENT_TRACE
    assert server_span.parent is not None
    assert format(server_span.parent.span_id, "016x") == CLIENT_SPAN
    assert client_span.parent is not None and write_span.parent is not None
    assert client_span.parent.span_id == server_span.context.span_id
    assert write_span.parent.span_id == server_span.context.span_id
    assert server_span.name == "GET /fhir/{type}/{id}"
    attributes = dict(server_span.attributes or {})
    assert attributes["http.route"] == "/fhir/{type}/{id}"
    assert attributes["url.path"] == "/fhir/Patient/REDACTED"
    assert {k: attributes[k] for k in ("fhir_audit.request_id", "fhir.interaction")} == {
        "fhir_audit.request_id": "req-telemetry-1",
        "fhir.interaction": "read",
    }
    assert dict(client_span.attributes or {})["http.response.status_code"] == 200
    # Never the token or the patient's id in any span.
    for span in finished:
        text = orjson.dumps({k: str(v) for k, v in (span.attributes or {}).items()}).decode()
        text += span.name
        assert TOKEN[-20:] not in text and PATIENT_ID not in text

    # The upstream got the client span as its parent.
    client_traceparent = f"00-{CLIENT_TRACE}-{format(client_span.context.span_id, '016x')}-01"
    assert recorder.headers[-1]["traceparent"] == client_traceparent

    # The audit record names the server span's traceparent on its X-Request-Id entity.
    server_traceparent = f"00-{CLIENT_TRACE}-{format(server_span.context.span_id, '016x')}-01"
    (event,) = stored
    (transaction,) = [e for e in event["entity"] if e["type"].get("code") == "XrequestId"]
    assert transaction["what"]["identifier"]["value"] == "req-telemetry-1"
    assert transaction["detail"] == [{"type": "traceparent", "valueString": server_traceparent}]
    assert validate_event(event, "R4") is None

    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource_metrics in data.resource_metrics:
        assert resource_metrics.resource.attributes["service.name"] == "fhir-audit-proxy"
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    (requests,) = points["fhir_audit.requests"]
    assert dict(requests.attributes) == {
        "fhir.interaction": "read",
        "fhir_audit.status_class": "2xx",
    }
    assert requests.value == 1
    assert points["fhir_audit.write.duration"][0].count == 1
    assert sum(p.count for p in points["fhir_audit.store.commit.size"]) >= 1
    assert 'fhir_audit_requests_total{kind="read",status_class="2xx"}' in prometheus


async def test_prometheus_false_removes_metrics_page(
    tmp_path: Path, upstream: tuple[Upstream, str], http: aiohttp.ClientSession
) -> None:
    _, upstream_url = upstream
    app, server = await start(tmp_path, upstream_url, telemetry={"prometheus": False})
    try:
        async with http.get(app[ADMIN_URL] + "/metrics") as metrics:
            assert metrics.status == 404
        async with http.get(app[ADMIN_URL] + "/healthz") as health:
            assert health.status == 200
    finally:
        await server.stop(STOP_GRACE_S)


async def test_export_over_real_otlp_http(
    tmp_path: Path, upstream: tuple[Upstream, str], http: aiohttp.ClientSession
) -> None:
    _, upstream_url = upstream
    collector = OtlpCollector()
    async with serving(("POST", "/v1/{signal}", collector.receive)) as receiver:
        endpoint = str(receiver.make_url("")).rstrip("/")
        _, server = await start(
            tmp_path,
            upstream_url,
            telemetry={"otlp_endpoint": endpoint, "service_name": "audit-proxy-under-test"},
        )
        try:
            async with http.post(
                f"{server.urls()[0]}/fhir/Patient",
                data=b'{"resourceType":"Patient"}',
                headers={"Content-Type": "application/fhir+json", "X-Request-Id": "otlp-1"},
            ) as response:
                assert response.status == 200
        finally:
            # Stopping flushes both exporters.
            await server.stop(STOP_GRACE_S)
    assert collector.content_types == {"application/x-protobuf"}
    spans = [span for span, _ in collector.spans()]
    (server_span,) = [s for s in spans if s.kind == s.SPAN_KIND_SERVER]
    assert server_span.name == "POST /fhir/{type}"
    attributes = {a.key: a.value for a in server_span.attributes}
    assert attributes["fhir_audit.request_id"].string_value == "otlp-1"
    assert attributes["fhir.interaction"].string_value == "create"
    assert sorted(s.name for s in spans) == [
        "POST /fhir/{type}",
        "POST /fhir/{type}",
        "audit write",
    ]
    assert {s.trace_id for s in spans} == {server_span.trace_id}
    names = {
        metric.name
        for request in collector.metrics
        for resource_metrics in request.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
    }
    assert {
        "fhir_audit.requests",
        "fhir_audit.write.duration",
        "http.server.request.duration",
        "http.client.request.duration",
    } <= names
    resource = collector.metrics[-1].resource_metrics[0].resource
    assert any(
        a.key == "service.name" and a.value.string_value == "audit-proxy-under-test"
        for a in resource.attributes
    )


def test_json_log_lines_carry_the_request_and_trace_ids() -> None:
    formatter = telemetry.JsonLogFormatter()
    record = logging.LogRecord(
        "proxy.http.forward", logging.WARNING, __file__, 1, "upstream %s", ("slow",), None
    )
    assert orjson.loads(formatter.format(record)).keys() == {"time", "level", "logger", "message"}
    ex = Exchange(
        request_id="req-log-1",
        method="GET",
        path="Patient",
        query_string="",
        request_headers={},
        client_address="127.0.0.1",
        started_at=datetime.now(UTC),
    )

    def in_a_request() -> tuple[dict[str, Any], int]:
        tracer = telemetry.tracer_provider().get_tracer("test")
        with tracer.start_as_current_span("s") as span:
            telemetry.exchange_started(ex)
            return orjson.loads(formatter.format(record)), span.get_span_context().trace_id

    line, trace_id = contextvars.copy_context().run(in_a_request)
    assert line["message"] == "upstream slow"
    assert line["request_id"] == "req-log-1"
    assert line["trace_id"] == format(trace_id, "032x")
    assert line["time"].endswith("Z")


async def test_json_logs_carry_the_request_id_and_trace_id_of_a_failing_request(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # A plain stream handler on the root logger is what the CLI installs.
    stream = io.StringIO()
    plain = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(plain)
    try:
        # Nothing listens on port 1: the upstream call fails and the proxy logs a warning.
        _, server = await start(tmp_path, "http://127.0.0.1:1/fhir", telemetry={"json_logs": True})
        try:
            async with http.get(
                f"{server.urls()[0]}/fhir/metadata",
                headers={
                    "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                    "X-Request-Id": "req-json-log",
                },
            ) as response:
                assert response.status == 502
        finally:
            await server.stop(STOP_GRACE_S)
    finally:
        root.removeHandler(plain)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    (warning,) = [line for line in lines if line.get("request_id") == "req-json-log"]
    assert warning["level"] == "WARNING"
    assert warning["logger"] == "proxy.http.forward"
    assert warning["trace_id"] == CLIENT_TRACE
    assert "upstream unreachable" in warning["message"]


async def test_without_an_exporter_only_a_callers_trace_travels_and_stays_sampled(
    tmp_path: Path, upstream: tuple[Upstream, str], http: aiohttp.ClientSession
) -> None:
    """With nothing exporting spans, a request without a ``traceparent`` is not traced at
    all (no header upstream: spans nobody records cost throughput); a caller's trace is
    always continued, and a sampled one stays sampled."""
    recorder, upstream_url = upstream
    _, server = await start(tmp_path, upstream_url)
    try:
        assert telemetry.SPAN_PROCESSORS.processors == ()
        async with http.get(f"{server.urls()[0]}/fhir/Patient/1") as response:
            assert response.status == 200
        untraced = recorder.headers[-1].get("traceparent")
        async with http.get(
            f"{server.urls()[0]}/fhir/Patient/1",
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        ) as response:
            assert response.status == 200
        sampled = recorder.headers[-1]["traceparent"]
    finally:
        await server.stop(STOP_GRACE_S)
    assert untraced is None
    assert sampled.startswith(f"00-{CLIENT_TRACE}-")
    assert not sampled.startswith(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}"), "the proxy's own span"
    assert int(sampled.rsplit("-", 1)[1], 16) & 1 == 1


def _sample(text: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in Prometheus exposition text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


async def test_oldest_pending_age_and_delivery_lag_on_metrics(
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
) -> None:
    repository.fail_next = [503] * 1000  # the repository is down until told otherwise
    proxy = await start_proxy(
        fhir_double,
        repository={"url": repository.url, "flush_interval_ms": 20, "max_flush_interval_ms": 50},
    )

    async def scrape() -> str:
        async with http.get(f"{proxy.admin_url}/metrics") as r:
            assert r.status == 200
            return await r.text()

    lag_count = "fhir_audit_delivery_lag_seconds_count"
    age = "fhir_audit_queue_oldest_pending_age_seconds"
    lag_before = _sample(await scrape(), lag_count) or 0.0
    assert _sample(await scrape(), age) == 0.0  # nothing pending yet
    async with http.get(f"{proxy.url}/metadata") as r:
        assert r.status == 200
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (await proxy.queue.stats()).oldest_pending_recorded or (
        (_sample(await scrape(), age) or 0.0) <= 0.0 or len(repository.requests) < 2
    ):
        assert loop.time() < deadline, "no pending age while the repository is down"
        await asyncio.sleep(0.05)
    text = await scrape()
    pending_age = _sample(text, age)
    assert pending_age is not None and 0.0 < pending_age < 60.0
    assert _sample(text, lag_count) == lag_before  # nothing acknowledged yet

    repository.fail_next.clear()  # the repository is back
    await repository.wait_for(1)
    deadline = loop.time() + 10
    while (await proxy.queue.stats()).pending:
        assert loop.time() < deadline, "the event was not acknowledged"
        await asyncio.sleep(0.02)
    text = await scrape()
    assert _sample(text, age) == 0.0
    assert _sample(text, lag_count) == lag_before + 1
    lag_sum = _sample(text, "fhir_audit_delivery_lag_seconds_sum") or 0.0
    assert lag_sum > 0.0
    stats = await proxy.queue.stats()
    assert stats.oldest_pending_recorded is None


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def test_opentelemetry_readers_count_from_their_telemetrys_start(tmp_path: Path) -> None:
    """The metric cells count for the whole process; each Telemetry's readers see what
    was recorded since that Telemetry was made, read from the cells when they collect."""
    reads = telemetry.REQUESTS.labels(kind="read", status_class="2xx")
    reads.inc()
    telemetry.AUDIT_WRITE_SECONDS.observe(0.3)
    reader = InMemoryMetricReader()
    running = telemetry.Telemetry(
        settings_for("http://127.0.0.1:1/fhir", tmp_path).telemetry, metric_readers=[reader]
    )
    try:
        reads.inc()
        reads.inc()
        telemetry.AUDIT_WRITE_SECONDS.observe(0.02)
        telemetry.AUDIT_WRITE_SECONDS.observe(3.0)
        points = _points(reader)
    finally:
        running.stop()
    (requests,) = [
        p
        for p in points["fhir_audit.requests"]
        if dict(p.attributes) == {"fhir.interaction": "read", "fhir_audit.status_class": "2xx"}
    ]
    assert requests.value == 2
    (write,) = points["fhir_audit.write.duration"]
    assert write.count == 2
    assert write.sum == pytest.approx(3.02)
    by_bound = dict(zip([*write.explicit_bounds, "+Inf"], write.bucket_counts, strict=True))
    assert by_bound[0.025] == 1 and by_bound[5.0] == 1
    assert sum(write.bucket_counts) == 2


async def test_an_unreachable_upstream_ends_the_client_span_as_an_error(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    spans = InMemorySpanExporter()
    running = telemetry.Telemetry(
        settings_for("http://127.0.0.1:1/fhir", tmp_path).telemetry,
        span_processors=[SimpleSpanProcessor(spans)],
    )
    _, server = await start(tmp_path, "http://127.0.0.1:1/fhir", running)
    try:
        async with http.get(f"{server.urls()[0]}/fhir/Patient/1") as response:
            assert response.status == 502
    finally:
        await server.stop(STOP_GRACE_S)
    finished = spans.get_finished_spans()
    (client,) = [s for s in finished if s.kind is SpanKind.CLIENT]
    (server_span,) = [s for s in finished if s.kind is SpanKind.SERVER]
    assert client.name == "GET /fhir/{type}/{id}"
    assert client.status.status_code is StatusCode.ERROR
    assert (client.attributes or {})["error.type"] == "UpstreamConnectError"
    assert "http.response.status_code" not in (client.attributes or {})
    assert client.parent is not None and server_span.context is not None
    assert client.parent.span_id == server_span.context.span_id
    assert (server_span.attributes or {})["http.response.status_code"] == 502
    assert (server_span.attributes or {})["error.type"] == "502"
    assert server_span.status.status_code is StatusCode.ERROR


def _documented(page: str) -> dict[str, list[str]]:
    """The first column (a `name`) of each table row of ``docs/{page}``, with the names
    in backquotes of its third column."""
    rows: dict[str, list[str]] = {}
    for line in (DOCS / page).read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = re.findall(r"`([^`]+)`", cells[2])
    return rows


def test_every_metric_family_is_documented_with_its_labels() -> None:
    documented = _documented("metrics.md")
    exposed = {
        m.name + ("_total" if m.kind == "counter" else ""): list(m.labelnames)
        for m in telemetry.METRICS
    }
    assert {name: documented.get(name) for name in exposed} == exposed
    assert {n for n in documented if n.startswith("fhir_audit_")} == set(exposed), "no stale row"


def test_every_field_of_a_json_log_line_is_documented() -> None:
    formatter = telemetry.JsonLogFormatter()
    ex = exchange("GET", "Patient", request_id="req-doc")
    try:
        raise ValueError("for the traceback field")
    except ValueError:
        record = logging.LogRecord(
            "proxy", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )

    def in_a_traced_request() -> dict[str, Any]:
        with telemetry.tracer_provider().get_tracer("test").start_as_current_span("s"):
            telemetry.exchange_started(ex)
            line: dict[str, Any] = orjson.loads(formatter.format(record))
            return line

    fields = contextvars.copy_context().run(in_a_traced_request)
    assert len(fields) == 8, fields  # every optional field is present in this line
    assert set(fields) == set(_documented("logging.md"))
