"""The metric catalogue against its reference, docs/telemetry.md: every Prometheus family
with its OpenTelemetry name, unit and attributes, every metric of the HTTP conventions."""

from __future__ import annotations

import re

from proxy.telemetry.cells import METRICS, OTEL_ONLY
from tests.factories import ROOT

REFERENCE = (ROOT / "docs" / "telemetry.md").read_text()


def _rows(heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as cells."""
    section = REFERENCE.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_every_prometheus_family_is_mapped_to_its_opentelemetry_name() -> None:
    documented = {
        _names(prometheus)[0]: (_names(otel), _names(unit), _names(attributes))
        for prometheus, otel, unit, attributes in _rows("### The proxy's own metrics")
    }
    catalogue: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for metric in METRICS:
        exposed = metric.name + ("_total" if metric.kind == "counter" else "")
        if metric.otel is None:
            # Not exported over OTLP: the row names the metric that stands for it there.
            catalogue[exposed] = (documented.get(exposed, ([], [], []))[0], [metric.unit], [])
            continue
        pairs = [
            name
            for pair in zip(metric.labelnames, metric.otel.attributes, strict=True)
            for name in pair
        ]
        catalogue[exposed] = ([metric.otel.name], [metric.otel.unit], pairs)
    assert documented == catalogue
    assert documented["fhir_audit_upstream_seconds"][0] == ["http.client.request.duration"]


def test_every_metric_of_the_http_conventions_is_documented() -> None:
    documented = {
        _names(name)[0]: (_names(unit), _names(attributes))
        for name, _, unit, attributes in _rows("### The HTTP semantic conventions' metrics")
    }
    assert documented == {
        m.name: ([m.otel.unit], list(m.otel.attributes)) for m in OTEL_ONLY if m.otel is not None
    }
