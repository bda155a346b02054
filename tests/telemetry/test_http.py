"""The proxy's HTTP traffic as the OpenTelemetry HTTP semantic conventions describe it, read
back in memory from a proxy in front of the real test FHIR server: span names and
attributes, the metrics' names, units, buckets and attributes, and never a query, an id or
a token in any of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, Sum
from opentelemetry.trace import SpanKind, StatusCode

from proxy.telemetry import Telemetry
from proxy.telemetry.metrics import DURATION_BUCKETS, HTTP_SERVER_DURATION
from tests.factories import (
    FHIR,
    NodeFhirServer,
    StartObserved,
    StartProxy,
    new_patient,
    serving,
    settings_for,
)

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkci1ob3VzZSJ9.secret-signature-part"


async def test_server_and_client_spans_follow_the_http_conventions(
    fhir_server: NodeFhirServer, start_observed: StartObserved, http: aiohttp.ClientSession
) -> None:
    seen, proxy = await start_observed(fhir_server.base_url)
    patient = await new_patient(http, fhir_server.base_url, name=[{"family": "Chalmers"}])
    async with http.get(
        f"{proxy.url}/Patient/{patient['id']}?_elements=name",
        headers={
            "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
            "Authorization": f"Bearer {TOKEN}",
            "X-Request-Id": "req-semconv-1",
        },
    ) as response:
        assert response.status == 200

    server_span, client_span = _spans(seen.finished(), SpanKind.SERVER, SpanKind.CLIENT)
    proxy_port = int(proxy.url.split(":")[2].split("/")[0])
    fhir_port = int(fhir_server.base_url.split(":")[2].split("/")[0])
    assert server_span.name == "GET /fhir/{type}/{id}"
    assert dict(server_span.attributes or {}) == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": "/fhir/Patient/REDACTED",
        "http.route": "/fhir/{type}/{id}",
        "server.address": "127.0.0.1",
        "server.port": proxy_port,
        "client.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
        "fhir_audit.request_id": "req-semconv-1",
        "fhir.interaction": "read",
        "fhir.resource_type": "Patient",
    }
    assert server_span.status.status_code is StatusCode.UNSET
    assert client_span.name == "GET /fhir/{type}/{id}"
    assert dict(client_span.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": fhir_port,
        "url.full": f"http://127.0.0.1:{fhir_port}/fhir/Patient/REDACTED",
        "url.template": "/fhir/{type}/{id}",
        "http.response.status_code": 200,
    }
    assert server_span.context is not None and client_span.parent is not None
    assert client_span.parent.span_id == server_span.context.span_id
    assert format(server_span.context.trace_id, "032x") == CLIENT_TRACE


def _spans(finished: list[Any], *kinds: SpanKind) -> list[Any]:
    """The one span of each kind, in the order asked."""
    found = []
    for kind in kinds:
        (span,) = [s for s in finished if s.kind is kind]
        found.append(span)
    return found


def _exported_text(finished: list[Any], metrics: dict[str, Any]) -> str:
    """Every span name and attribute and every metric point's attributes, as one text."""
    spans = [
        {"name": s.name, **{k: str(v) for k, v in (s.attributes or {}).items()}} for s in finished
    ]
    points = [
        {k: str(v) for k, v in point.attributes.items()}
        for metric in metrics.values()
        for point in metric.data.data_points
    ]
    return orjson.dumps([spans, points]).decode()


async def test_no_query_id_or_token_in_any_span_or_metric(
    fhir_server: NodeFhirServer, start_observed: StartObserved, http: aiohttp.ClientSession
) -> None:
    seen, proxy = await start_observed(fhir_server.base_url)
    patient = await new_patient(
        http, proxy.url, name=[{"family": "Chalmers"}], birthDate="1974-12-25"
    )
    pid = patient["id"]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    asked = [
        ("GET", "Patient?name=Chalmers&birthdate=1974-12-25&_count=3", None),
        ("GET", f"Patient/{pid}/_history/1", None),
        ("GET", f"Patient/{pid}/_history", None),
        ("GET", f"Patient/{pid}/Observation?code=8867-4", None),
        ("GET", f"Patient/{pid}/$everything?_since=1974-12-25", None),
        ("POST", "Patient/_search", b"name=Chalmers"),
        ("DELETE", f"Patient?identifier=mrn-{pid}", None),
        ("GET", f"Nonsense/{pid}?family=Chalmers", None),
    ]
    for method, path, body in asked:
        headers = {**bearer, **FHIR}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        async with http.request(method, f"{proxy.url}/{path}", data=body, headers=headers) as r:
            await r.read()
    async with http.get(f"{proxy.url.removesuffix('/fhir')}/elsewhere/{pid}?q=Chalmers") as r:
        assert r.status == 404  # outside the FHIR base: refused, audited, observed
    finished = seen.finished()
    text = _exported_text(finished, seen.metrics())
    for secret in (pid, "Chalmers", "1974-12-25", "8867-4", "mrn-", TOKEN[-20:], "?"):
        assert secret not in text
    servers = {s.name for s in finished if s.kind is SpanKind.SERVER}
    assert servers == {
        "POST /fhir/{type}",
        "GET /fhir/{type}",
        "GET /fhir/{type}/{id}/_history/{vid}",
        "GET /fhir/{type}/{id}/_history",
        "GET /fhir/{compartment}/{id}/{type}",
        "GET /fhir/{type}/{id}/${operation}",
        "POST /fhir/{type}/_search",
        "DELETE /fhir/{type}",
        "GET",  # not a FHIR interaction: no route
    }
    paths = {(s.attributes or {})["url.path"] for s in finished if s.kind is SpanKind.SERVER}
    assert {"/fhir/REDACTED/REDACTED", "/REDACTED/REDACTED"} <= paths


async def test_http_metrics_by_the_semantic_conventions(
    fhir_server: NodeFhirServer, start_observed: StartObserved, http: aiohttp.ClientSession
) -> None:
    seen, proxy = await start_observed(fhir_server.base_url)
    patient = await new_patient(http, proxy.url)
    for _ in range(2):
        async with http.get(f"{proxy.url}/Patient/{patient['id']}") as r:
            assert r.status == 200
    metrics = seen.metrics()

    fhir_port = int(fhir_server.base_url.split(":")[2].split("/")[0])
    server = metrics["http.server.request.duration"]
    assert (server.unit, type(server.data)) == ("s", Histogram)
    points = {p.attributes["http.route"]: p for p in server.data.data_points}
    read = points["/fhir/{type}/{id}"]
    assert dict(read.attributes) == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "http.route": "/fhir/{type}/{id}",
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
    }
    assert read.count == 2 and tuple(read.explicit_bounds) == DURATION_BUCKETS
    assert dict(points["/fhir/{type}"].attributes)["http.response.status_code"] == 201

    client = metrics["http.client.request.duration"]
    assert (client.unit, type(client.data)) == ("s", Histogram)
    upstream = {"server.address": "127.0.0.1", "server.port": fhir_port}
    by_method = {p.attributes["http.request.method"]: p for p in client.data.data_points}
    assert {method: (dict(p.attributes), p.count) for method, p in by_method.items()} == {
        "GET": ({"http.request.method": "GET", **upstream, "http.response.status_code": 200}, 2),
        "POST": ({"http.request.method": "POST", **upstream, "http.response.status_code": 201}, 1),
    }

    active = metrics["http.server.active_requests"]
    assert active.unit == "{request}"
    assert isinstance(active.data, Sum) and not active.data.is_monotonic
    assert {p.value for p in active.data.data_points} == {0}  # every request has ended

    # The proxy's own metrics under fhir_audit.*, with units; no Prometheus names.
    units = {name: metric.unit for name, metric in metrics.items()}
    assert {
        "fhir_audit.requests": "{request}",
        "fhir_audit.events.built": "{event}",
        "fhir_audit.write.duration": "s",
        "fhir_audit.store.commit.duration": "s",
        "fhir_audit.store.commit.size": "{record}",
    }.items() <= units.items()
    assert not [name for name in metrics if name.startswith("fhir_audit_")]


async def test_an_upstream_failure_is_an_error_type_on_both_sides(
    start_observed: StartObserved, http: aiohttp.ClientSession
) -> None:
    seen, proxy = await start_observed("http://127.0.0.1:1/fhir")
    async with http.get(f"{proxy.url}/Patient/pat-4711?name=Chalmers") as r:
        assert r.status == 502
    server_span, client_span = _spans(seen.finished(), SpanKind.SERVER, SpanKind.CLIENT)
    assert (server_span.attributes or {})["error.type"] == "502"
    assert server_span.status.status_code is StatusCode.ERROR
    assert (client_span.attributes or {})["error.type"] == "UpstreamConnectError"
    assert client_span.status.status_code is StatusCode.ERROR
    metrics = seen.metrics()
    (client,) = metrics["http.client.request.duration"].data.data_points
    assert dict(client.attributes) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": 1,
        "error.type": "UpstreamConnectError",
    }
    (served,) = metrics["http.server.request.duration"].data.data_points
    assert dict(served.attributes)["error.type"] == "502"
    assert "pat-4711" not in _exported_text(seen.finished(), metrics)


async def test_metrics_alone_make_no_span_and_nothing_runs_unobserved(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A metric reader without a span exporter measures requests but traces none (no
    ``traceparent`` upstream); with neither, the HTTP metrics are not even recorded."""
    received: list[dict[str, str]] = []

    async def upstream(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        return web.json_response({"resourceType": "Patient", "id": "1"})

    async with serving(("GET", "/fhir/{tail:.*}", upstream)) as fhir:
        url = str(fhir.make_url("/fhir"))
        before = HTTP_SERVER_DURATION.cells()
        plain = await start_proxy(url)
        async with http.get(f"{plain.url}/Patient/1") as r:
            assert r.status == 200
        assert HTTP_SERVER_DURATION.cells() == before  # not observed: not recorded

        reader = InMemoryMetricReader()
        settings = settings_for(url, tmp_path / "measured")
        measured = await start_proxy(
            url,
            running_telemetry=Telemetry(settings.telemetry, metric_readers=[reader]),
            store={"path": tmp_path / "measured.db"},
        )
        async with http.get(f"{measured.url}/Patient/1") as r:
            assert r.status == 200
    assert [h.get("traceparent") for h in received] == [None, None]
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for rm in data.resource_metrics for s in rm.scope_metrics for m in s.metrics}
    assert "http.server.request.duration" in names


async def test_a_method_the_conventions_do_not_name_is_other(
    fhir_server: NodeFhirServer, start_observed: StartObserved, http: aiohttp.ClientSession
) -> None:
    seen, proxy = await start_observed(fhir_server.base_url)
    async with http.request("PROPFIND", f"{proxy.url}/Patient/pat-4711") as r:
        assert r.status == 405  # refused, audited, observed
    (server_span,) = _spans(seen.finished(), SpanKind.SERVER)
    assert server_span.name == "HTTP"
    attributes = dict(server_span.attributes or {})
    assert (attributes["http.request.method"], attributes["http.request.method_original"]) == (
        "_OTHER",
        "PROPFIND",
    )
    assert "http.route" not in attributes and "error.type" not in attributes
    (point,) = seen.metrics()["http.server.request.duration"].data.data_points
    assert dict(point.attributes)["http.request.method"] == "_OTHER"
