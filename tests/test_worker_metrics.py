"""Several workers' metrics as one: the snapshots workers publish, how worker 0's
``/metrics`` adds them to its own, and the resource that tells each worker's OpenTelemetry
series apart. (Two real workers behind one port: ``tests/test_workers.py``.)"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy import telemetry
from proxy.worker_metrics import read_snapshots, snapshot_path, write_snapshot
from tests.factories import settings_for


def _exposed() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(telemetry.REGISTRY).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


@pytest.fixture
def peers() -> Iterator[list[dict[str, Any]]]:
    found: list[dict[str, Any]] = []
    telemetry.set_peer_snapshots(lambda: found)
    try:
        yield found
    finally:
        telemetry.set_peer_snapshots(None)


def test_the_page_adds_other_workers_counters_and_histograms(
    peers: list[dict[str, Any]],
) -> None:
    telemetry.REQUESTS.labels(kind="read", status_class="2xx").inc()
    telemetry.UPSTREAM_SECONDS.observe(0.02)
    telemetry.QUEUE_OLDEST_AGE.set(7.0)
    own = _exposed()
    peer = telemetry.snapshot()
    peer["fhir_audit_requests"].append([["vread", "5xx"], 3.0, 1.0])
    peers.append(orjson.loads(orjson.dumps(peer)))  # as read from a worker's file
    both = _exposed()

    read = ("fhir_audit_requests_total", (("kind", "read"), ("status_class", "2xx")))
    assert both[read] == 2 * own[read] >= 2
    assert both[("fhir_audit_requests_total", (("kind", "vread"), ("status_class", "5xx")))] == 3
    count = ("fhir_audit_upstream_seconds_count", ())
    assert both[count] == 2 * own[count] >= 2
    assert both[("fhir_audit_upstream_seconds_sum", ())] == pytest.approx(
        2 * own[("fhir_audit_upstream_seconds_sum", ())]
    )
    bucket = ("fhir_audit_upstream_seconds_bucket", (("le", "0.025"),))
    assert both[bucket] == 2 * own[bucket] >= 2
    gauge = ("fhir_audit_queue_oldest_pending_age_seconds", ())
    assert both[gauge] == own[gauge] == 7.0, "gauges are worker 0's (read from every shard)"


def test_a_histogram_of_other_bounds_is_not_added(peers: list[dict[str, Any]]) -> None:
    telemetry.UPSTREAM_SECONDS.observe(0.02)
    own = _exposed()
    peers.append({"fhir_audit_upstream_seconds": [[[], [[1, 2], 5.0, 1.0, 4.0], 1.0]]})
    assert _exposed() == own


def test_snapshots_of_this_run_are_read_and_others_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry.REQUESTS.labels(kind="search-type", status_class="2xx").inc()
    ours, earlier, broken, missing = (
        snapshot_path(tmp_path / f"audit-{n}.db") for n in range(1, 5)
    )
    assert ours == tmp_path / "audit-1.metrics.json"
    write_snapshot(ours, supervisor=4242)
    write_snapshot(earlier, supervisor=17)  # left by an earlier `run`
    broken.write_bytes(b'{"supervisor": 4242, "metr')
    assert oct(ours.stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob("*.partial")), "written whole, then renamed"

    with caplog.at_level(logging.WARNING):
        found = read_snapshots([ours, earlier, broken, missing], supervisor=4242)
    assert found == [orjson.loads(ours.read_bytes())["metrics"]]
    searches = {tuple(labels): value for labels, value, _ in found[0]["fhir_audit_requests"]}
    own = telemetry.REQUESTS.labels(kind="search-type", status_class="2xx").snapshot()
    assert searches[("search-type", "2xx")] == own >= 1
    assert "fhir_audit_queue_events" not in found[0], "gauges are not published"
    assert "could not be read" in caplog.text


def _resource(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return dict(data.resource_metrics[-1].resource.attributes)


def test_each_worker_exports_under_a_resource_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for("http://127.0.0.1:1/fhir", tmp_path).telemetry
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    alone, second = InMemoryMetricReader(), InMemoryMetricReader()
    running = [
        telemetry.Telemetry(settings, metric_readers=[alone]),
        telemetry.Telemetry(settings, metric_readers=[second], worker=1),
    ]
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7,k8s.pod.name=pod-7")
    named = InMemoryMetricReader()
    running.append(telemetry.Telemetry(settings, metric_readers=[named], worker=0))
    try:
        plain, worker, given = _resource(alone), _resource(second), _resource(named)
    finally:
        for t in running:
            t.stop()
    assert uuid.UUID(plain["service.instance.id"]), "the SDK's, one per process"
    assert "fhir_audit.worker" not in plain
    assert worker["fhir_audit.worker"] == 1
    # A backend keys series on (service.name, service.instance.id) alone (Prometheus's
    # OTLP receiver: job, instance), so the operator's id is kept but made the worker's.
    assert given["service.instance.id"] == "pod-7.worker-0"
    assert given["fhir_audit.worker"] == 0
