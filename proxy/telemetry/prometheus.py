"""The Prometheus exposition of the metrics (the admin ``/metrics`` text, names
``fhir_audit_*``), read from their cells at scrape time, and the admin middleware that
turns the page off."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample as PromSample
from prometheus_client.utils import floatToGoString

from proxy.telemetry.cells import METRICS, Metric
from proxy.telemetry.peers import Snapshot, added, peer_snapshots


class _PrometheusCells(Collector):
    """The Prometheus exposition of :data:`METRICS`, read from their cells at scrape time
    (the text prometheus_client's own Counter, Gauge and Histogram would give), other
    workers' counters and histograms added when there are (:func:`set_peer_snapshots`)."""

    def collect(self) -> Iterator[PromMetric]:
        peers = peer_snapshots()
        for metric in METRICS:
            yield self._family(metric, peers)

    def describe(self) -> Iterator[PromMetric]:
        for metric in METRICS:
            yield self._family(metric, (), with_samples=False)

    @staticmethod
    def _family(
        metric: Metric, peers: Sequence[Snapshot], *, with_samples: bool = True
    ) -> PromMetric:
        names = metric.labelnames
        if not with_samples:
            cells = []
        elif peers and metric.kind != "gauge":
            cells = added(metric, peers)
        else:
            cells = metric.cells()
        if metric.kind == "counter":
            counter = CounterMetricFamily(metric.name, metric.description, labels=names)
            for key, (value, created) in cells:
                counter.add_metric(key, value, created=created)
            return counter
        if metric.kind == "gauge":
            gauge = GaugeMetricFamily(metric.name, metric.description, labels=names)
            for key, (value, _) in cells:
                gauge.add_metric(key, value)
            return gauge
        histogram = HistogramMetricFamily(metric.name, metric.description, labels=names)
        les = [*map(floatToGoString, metric.bounds), "+Inf"]
        for key, ((counts, total, _, _), created) in cells:
            cumulative = list(itertools.accumulate(counts))
            histogram.add_metric(key, list(zip(les, cumulative, strict=True)), total)
            histogram.samples.append(
                PromSample(metric.name + "_created", dict(zip(names, key, strict=True)), created)
            )
        return histogram


REGISTRY = CollectorRegistry(auto_describe=True)
"""The registry the admin ``/metrics`` page is generated from."""
REGISTRY.register(_PrometheusCells())


@web.middleware
async def without_prometheus(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Admin middleware for ``telemetry.prometheus: false``: no ``/metrics`` page."""
    if request.path == "/metrics":
        raise web.HTTPNotFound(text="Prometheus exposition is disabled (telemetry.prometheus)")
    return await handler(request)
