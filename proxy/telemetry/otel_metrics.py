"""The OpenTelemetry side of the metrics: what a :class:`~proxy.telemetry.Telemetry`'s
metric readers collect, read from the cells."""

from __future__ import annotations

import itertools
import time
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    HistogramDataPoint,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as OtelHistogram
from opentelemetry.sdk.metrics.export import Metric as OtelMetric
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from proxy import __version__
from proxy.telemetry.cells import METRICS, OTEL_ONLY, Metric


def _attributes(metric: Metric, key: tuple[str, ...]) -> dict[str, str | int]:
    """A cell's label values as the metric's OpenTelemetry attributes; a label that does
    not apply ("") is left out."""
    assert metric.otel is not None
    integers = metric.otel.integers
    return {
        name: int(value) if name in integers else value
        for name, value in zip(metric.otel.attributes, key, strict=True)
        if value != ""
    }


class OtelCells:
    """What one :class:`~proxy.telemetry.Telemetry`'s OpenTelemetry readers collect: the
    metrics of :data:`METRICS` that have an OpenTelemetry name and those of
    :data:`OTEL_ONLY`, read from their cells at collection time, as cumulative points
    counted from this object's creation (the cells count since the process started;
    several proxies may run in one process, each with its own readers). The OpenTelemetry
    API has no observable histogram, so rather than instruments this hands each reader
    the points it would collect (through the SDK's collect callback, which the
    MeterProvider sets and this wraps). ``min``/``max`` of a histogram are those since
    the process started."""

    def __init__(self, resource: Resource) -> None:
        self._resource = resource
        self._start_ns = time.time_ns()
        self._metrics = [m for m in METRICS if m.otel is not None] + OTEL_ONLY
        self._baseline = {m.name: dict(m.cells()) for m in self._metrics}

    def attach(self, reader: MetricReader) -> None:
        sdk_collect: Any = reader._collect  # the SDK's own annotation of it is wrong

        def collect(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData:
            data = sdk_collect(reader, timeout_millis=timeout_millis) if sdk_collect else None
            others = list(data.resource_metrics) if data is not None else []
            return MetricsData(resource_metrics=[*others, self.resource_metrics()])

        reader._set_collect_callback(collect)

    def resource_metrics(self) -> ResourceMetrics:
        now = time.time_ns()
        metrics = [
            m for m in map(self._metric, self._metrics, itertools.repeat(now)) if m is not None
        ]
        scope = ScopeMetrics(
            scope=InstrumentationScope("fhir-audit-proxy", __version__),
            metrics=metrics,
            schema_url="",
        )
        return ResourceMetrics(resource=self._resource, scope_metrics=[scope], schema_url="")

    def _metric(self, metric: Metric, now: int) -> OtelMetric | None:
        assert metric.otel is not None
        base = self._baseline[metric.name]
        start = self._start_ns
        data: Sum | Gauge | OtelHistogram
        if metric.kind == "histogram":
            points: list[Any] = []
            for key, ((counts, total, low, high), _) in metric.cells():
                before = base.get(key)
                if before is not None:
                    counts = [c - b for c, b in zip(counts, before[0][0], strict=True)]
                    total -= before[0][1]
                count = sum(counts)
                if count:
                    points.append(
                        HistogramDataPoint(
                            attributes=_attributes(metric, key),
                            start_time_unix_nano=start,
                            time_unix_nano=now,
                            count=count,
                            sum=total,
                            bucket_counts=counts,
                            explicit_bounds=metric.bounds,
                            min=low,
                            max=high,
                        )
                    )
            data = OtelHistogram(points, AggregationTemporality.CUMULATIVE)
        else:
            points = []
            for key, (value, _) in metric.cells():
                if metric.kind == "counter":
                    before = base.get(key)
                    value -= before[0] if before is not None else 0.0
                    if not value:
                        continue
                points.append(
                    NumberDataPoint(
                        attributes=_attributes(metric, key),
                        start_time_unix_nano=start,
                        time_unix_nano=now,
                        value=value,
                    )
                )
            if metric.kind == "gauge":
                data = Gauge(points)
            else:
                # An up-down counter is a level: not counted from this object's creation.
                monotonic = metric.kind == "counter"
                data = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=monotonic)
        if not points:
            return None
        return OtelMetric(metric.otel.name, metric.description, metric.otel.unit, data)
