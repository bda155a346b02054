"""Metrics, traces and structured logs.

Metrics are counted once, in plain Python cells (an update is an attribute increment),
and read from there by two places when they ask: the Prometheus registry below (the admin
``/metrics`` text, names ``fhir_audit_*``) and the OpenTelemetry metric readers of every
running :class:`Telemetry` (exported over OTLP/HTTP when ``telemetry.otlp_endpoint`` is set).

Traces: a server span per proxied request (:func:`server_span`), a client span for each
upstream call (:func:`upstream_span`, which also sends W3C ``traceparent``), and a
child span for the durable audit write (:func:`record_audit_write`); the builder records
the request's ``traceparent`` on its AuditEvents. Span attributes name the FHIR interaction,
the resource type, the status and the request id; never a URL, a resource id, a query,
a header value or a token: those can identify a patient or grant access.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import itertools
import logging
import math
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    MutableMapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    HistogramDataPoint,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as OtelHistogram
from opentelemetry.sdk.metrics.export import Metric as OtelMetric
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample as PromSample
from prometheus_client.utils import floatToGoString

from proxy.tasks import running

if TYPE_CHECKING:
    from proxy.delivery.sinks import Sink
    from proxy.exchange import Exchange
    from proxy.listener import ClientRequest
    from proxy.settings import TelemetrySettings

log = logging.getLogger(__name__)


class _CounterCell:
    """One label set of a counter: a float the loop thread adds to."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def snapshot(self) -> float:
        return self.value


class _GaugeCell:
    """One label set of a gauge."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def set(self, value: float) -> None:
        self.value = value

    def snapshot(self) -> float:
        return self.value


class _HistogramCell:
    """One label set of a histogram: a count per bucket (not cumulative; the last one
    past the highest bound), the sum, and the extremes OpenTelemetry reports."""

    __slots__ = ("_bounds", "counts", "created", "max", "min", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.created = time.time()

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus's ``le`` counts.
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def snapshot(self) -> tuple[list[int], float, float, float]:
        return list(self.counts), self.sum, self.min, self.max


class _LockedHistogramCell(_HistogramCell):
    """A histogram cell that threads other than the event loop's record to (the store's
    writer): an update is several statements, which another thread could interleave."""

    __slots__ = ("_lock",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(bounds)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            super().observe(value)

    def snapshot(self) -> tuple[list[int], float, float, float]:
        with self._lock:
            return super().snapshot()


_Cell = _CounterCell | _GaugeCell | _HistogramCell


class _Metric:
    """A metric of the proxy, counted in plain Python: each label set is a cell (found
    once: callers on the request path keep the cell ``labels()`` returns) whose update is
    an attribute increment or two. Nothing is formatted or exported per update: the
    Prometheus registry reads the cells when scraped (:class:`_PrometheusCells`), and
    each running :class:`Telemetry`'s OpenTelemetry readers when they collect.

    Same call shape as prometheus_client: ``REQUESTS.labels(kind="read",
    status_class="2xx").inc()``, ``UPSTREAM_SECONDS.observe(0.02)``. Cells are not locked:
    record from the event loop's thread, unless the metric was declared ``threaded``."""

    def __init__(
        self,
        name: str,
        description: str,
        labelnames: Sequence[str],
        unit: str,
        kind: str,
        buckets: Sequence[float] = (),
        threaded: bool = False,
    ) -> None:
        self.name = name
        self.description = description
        self.labelnames = tuple(labelnames)
        self.unit = unit
        self.kind = kind
        """counter, gauge or histogram."""
        self.bounds = tuple(float(b) for b in buckets if b != math.inf)
        self._threaded = threaded
        self._cells: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        # An unlabelled metric is one cell, shown (at zero) before its first update.
        self._only: Any = None if self.labelnames else self._cell(())

    def _cell(self, key: tuple[str, ...]) -> Any:
        with self._lock:
            cell = self._cells.get(key)
            if cell is None:
                if self.kind == "counter":
                    cell = _CounterCell()
                elif self.kind == "gauge":
                    cell = _GaugeCell()
                elif self._threaded:
                    cell = _LockedHistogramCell(self.bounds)
                else:
                    cell = _HistogramCell(self.bounds)
                self._cells[key] = cell
            return cell

    def labels(self, **labels: str) -> Any:
        """The cell of one label set (every label name, by keyword)."""
        key = tuple(str(labels[n]) for n in self.labelnames)
        cell = self._cells.get(key)
        return cell if cell is not None else self._cell(key)

    def inc(self, amount: float = 1.0) -> None:
        self._only.inc(amount)

    def set(self, value: float) -> None:
        self._only.set(value)

    def observe(self, value: float) -> None:
        self._only.observe(value)

    def cells(self) -> list[tuple[tuple[str, ...], Any]]:
        """Every label set with a snapshot of its cell (a counter's or gauge's value; a
        histogram's bucket counts, sum, min and max), and the cell's creation time."""
        with self._lock:
            items = list(self._cells.items())
        return [(key, (cell.snapshot(), cell.created)) for key, cell in items]


METRICS: list[_Metric] = []


def _counter(name: str, doc: str, labels: Sequence[str] = (), unit: str = "1") -> _Metric:
    metric = _Metric(name, doc, labels, unit, "counter")
    METRICS.append(metric)
    return metric


def _gauge(name: str, doc: str, labels: Sequence[str] = (), unit: str = "1") -> _Metric:
    metric = _Metric(name, doc, labels, unit, "gauge")
    METRICS.append(metric)
    return metric


def _histogram(
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    unit: str = "s",
    buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    threaded: bool = False,
) -> _Metric:
    metric = _Metric(name, doc, labels, unit, "histogram", buckets, threaded)
    METRICS.append(metric)
    return metric


WORKER_ATTRIBUTE = "fhir_audit.worker"
"""The resource attribute naming the worker, when the proxy runs several."""

_Snapshot = dict[str, list[Any]]
"""Counters and histograms by metric name, each a list of ``[label values, value,
created]``; a histogram's value is ``[counts, sum, min, max]`` (None for no extreme)."""


def snapshot() -> _Snapshot:
    """This process's counters and histograms, as JSON-ready lists (for the admin
    ``/metrics`` of another process to add up: :mod:`proxy.worker_metrics`)."""
    found: _Snapshot = {}
    for metric in METRICS:
        if metric.kind == "gauge":
            continue
        cells = []
        for key, (value, created) in metric.cells():
            if metric.kind == "histogram":
                counts, total, low, high = value
                value = [counts, total, _finite(low), _finite(high)]
            cells.append([list(key), value, created])
        found[metric.name] = cells
    return found


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


_peer_snapshots: Callable[[], Sequence[_Snapshot]] | None = None


def set_peer_snapshots(source: Callable[[], Sequence[_Snapshot]] | None) -> None:
    """Where the Prometheus exposition finds other processes' counters and histograms to
    add to this one's (``workers`` > 1, on worker 0); None: this process's only."""
    global _peer_snapshots
    _peer_snapshots = source


def _added(metric: _Metric, peers: Sequence[_Snapshot]) -> list[tuple[tuple[str, ...], Any]]:
    """``metric.cells()`` with the same metric's cells of ``peers`` added, label set by
    label set (a histogram's buckets only where its bounds agree)."""
    cells = dict(metric.cells())
    for peer in peers:
        for labels, value, created in peer.get(metric.name, ()):
            key = tuple(labels)
            mine = cells.get(key)
            if metric.kind == "histogram":
                counts, total, low, high = value
                if len(counts) != len(metric.bounds) + 1:
                    continue
                low = math.inf if low is None else low
                high = -math.inf if high is None else high
                if mine is not None:
                    (own, own_total, own_low, own_high), own_created = mine
                    counts = [a + b for a, b in zip(own, counts, strict=True)]
                    value = (counts, own_total + total, min(own_low, low), max(own_high, high))
                    created = min(own_created, created)
                else:
                    value = (counts, total, low, high)
            elif mine is not None:
                value, created = mine[0] + value, min(mine[1], created)
            cells[key] = (value, created)
    return list(cells.items())


class _PrometheusCells(Collector):
    """The Prometheus exposition of :data:`METRICS`, read from their cells at scrape time
    (the text prometheus_client's own Counter, Gauge and Histogram would give), other
    workers' counters and histograms added when there are (:func:`set_peer_snapshots`)."""

    def collect(self) -> Iterator[PromMetric]:
        peers = _peer_snapshots() if _peer_snapshots is not None else ()
        for metric in METRICS:
            yield self._family(metric, peers)

    def describe(self) -> Iterator[PromMetric]:
        for metric in METRICS:
            yield self._family(metric, (), with_samples=False)

    @staticmethod
    def _family(
        metric: _Metric, peers: Sequence[_Snapshot], *, with_samples: bool = True
    ) -> PromMetric:
        names = metric.labelnames
        if not with_samples:
            cells = []
        elif peers and metric.kind != "gauge":
            cells = _added(metric, peers)
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


REQUESTS = _counter(
    "fhir_audit_requests",
    "Requests proxied, by interaction kind and status class.",
    ["kind", "status_class"],
)
UPSTREAM_SECONDS = _histogram(
    "fhir_audit_upstream_seconds", "Time to the upstream's response head."
)
EVENTS_BUILT = _counter(
    "fhir_audit_events_built", "AuditEvents built, by outcome code.", ["outcome"]
)
EVENTS_INVALID = _counter(
    "fhir_audit_events_invalid",
    "AuditEvents that failed fhir.resources validation (still stored and forwarded).",
)
AUDIT_FAILURES = _counter(
    "fhir_audit_failures",
    "Requests failed closed because their audit could not be built or persisted.",
    ["reason"],
)
AUDIT_WRITE_SECONDS = _histogram(
    "fhir_audit_write_seconds",
    "Time a request waits for its AuditEvents to be durable (its share of a group commit).",
)
STORE_COMMIT_SECONDS = _histogram(
    "fhir_audit_store_commit_seconds",
    "Duration of one group commit (with fsync).",
    threaded=True,
)
STORE_COMMIT_SIZE = _histogram(
    "fhir_audit_store_commit_records",
    "Records written by one group commit.",
    unit="1",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    threaded=True,
)
QUEUE_DEPTH = _gauge("fhir_audit_queue_events", "Events in the local queue, by status.", ["status"])
QUEUE_OLDEST_AGE = _gauge(
    "fhir_audit_queue_oldest_pending_age_seconds",
    "Age (from its recorded time) of the oldest undelivered event; 0 when none is pending.",
    unit="s",
)
DELIVERY_LAG = _histogram(
    "fhir_audit_delivery_lag_seconds",
    "Time from an event's recorded time to the repository's acknowledgement of it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400),
)
DELIVERIES = _counter(
    "fhir_audit_delivery_attempts",
    "Batches sent to the repository, by result (ok, retry, rejected).",
    ["result"],
)
DELIVERY_SECONDS = _histogram(
    "fhir_audit_delivery_seconds",
    "Time the repository took to answer one batch, by result (ok, error).",
    ["result"],
)
EVENTS_DELIVERED = _counter("fhir_audit_events_delivered", "Events acknowledged by the repository.")
EVENTS_DEAD = _counter(
    "fhir_audit_events_dead_lettered",
    "Events moved to the dead-letter state after the repository rejected them.",
)
FORWARDED_FOR_INVALID = _counter(
    "fhir_audit_forwarded_for_invalid",
    "X-Forwarded-For entries from a trusted proxy that were not IP addresses (ignored).",
)


REGISTRY.register(_PrometheusCells())


class _OtelCells:
    """What one :class:`Telemetry`'s OpenTelemetry readers collect: :data:`METRICS` read
    from their cells at collection time, as cumulative points counted from this object's
    creation (the cells count since the process started; several proxies may run in one
    process, each with its own readers). The OpenTelemetry API has no observable
    histogram, so rather than instruments this hands each reader the points it would
    collect (through the SDK's collect callback, which the MeterProvider sets and this
    wraps). ``min``/``max`` of a histogram are those since the process started."""

    def __init__(self, resource: Resource) -> None:
        self._resource = resource
        self._start_ns = time.time_ns()
        self._baseline = {m.name: dict(m.cells()) for m in METRICS}

    def attach(self, reader: MetricReader) -> None:
        sdk_collect: Any = reader._collect  # the SDK's own annotation of it is wrong

        def collect(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData:
            data = sdk_collect(reader, timeout_millis=timeout_millis) if sdk_collect else None
            others = list(data.resource_metrics) if data is not None else []
            return MetricsData(resource_metrics=[*others, self.resource_metrics()])

        reader._set_collect_callback(collect)

    def resource_metrics(self) -> ResourceMetrics:
        now = time.time_ns()
        metrics = [m for m in map(self._metric, METRICS, itertools.repeat(now)) if m is not None]
        scope = ScopeMetrics(
            scope=InstrumentationScope("fhir-audit-proxy"), metrics=metrics, schema_url=""
        )
        return ResourceMetrics(resource=self._resource, scope_metrics=[scope], schema_url="")

    def _metric(self, metric: _Metric, now: int) -> OtelMetric | None:
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
                            attributes=dict(zip(metric.labelnames, key, strict=True)),
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
                        attributes=dict(zip(metric.labelnames, key, strict=True)),
                        start_time_unix_nano=start,
                        time_unix_nano=now,
                        value=value,
                    )
                )
            data = (
                Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True)
                if metric.kind == "counter"
                else Gauge(points)
            )
        if not points:
            return None
        return OtelMetric(metric.name, metric.description, metric.unit, data)


# -- traces ---------------------------------------------------------------------------

_EXCHANGE: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar(
    "fhir_audit_exchange", default=None
)


class _Processors(SpanProcessor):
    """The process's span processors, which running :class:`Telemetry` objects (and tests)
    add and remove; the SDK's provider takes processors only for its whole life."""

    def __init__(self) -> None:
        self.processors: tuple[SpanProcessor, ...] = ()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for processor in self.processors:
            processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)


SPAN_PROCESSORS = _Processors()
_PROVIDER: list[TracerProvider] = []


class _RecordWhenExported(Sampler):
    """Record spans only when something exports them: a recorded SDK span costs about
    twice an unrecorded one, and the request path pays for three. Unrecorded spans still
    carry a trace id (propagated upstream and stored on the AuditEvent). A caller's
    sampled trace stays sampled, so the proxy never breaks a trace that someone exports."""

    def __init__(self) -> None:
        self._exporting = ParentBased(ALWAYS_ON)
        self._idle = ParentBased(ALWAYS_OFF)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        sampler = self._exporting if SPAN_PROCESSORS.processors else self._idle
        return sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "RecordWhenExported"


def _resource(service_name: str, worker: int | None = None) -> Resource:
    """This process's OpenTelemetry resource. Each process exports cumulative series of
    its own, which a backend tells apart from another process's by the resource only: the
    SDK gives each process a ``service.instance.id`` (unless ``OTEL_RESOURCE_ATTRIBUTES``
    names one, which every worker of a pod then shares), and with several workers each
    also names its index."""
    attributes: dict[str, str | int] = {SERVICE_NAME: service_name}
    if worker is not None:
        attributes[WORKER_ATTRIBUTE] = worker
    return Resource.create(attributes)


def tracer_provider(service_name: str = "fhir-audit-proxy") -> TracerProvider:
    """The process's SDK tracer provider, made and installed globally on first use (every
    request then has a trace id, exported or not)."""
    if not _PROVIDER:
        provider = TracerProvider(resource=_resource(service_name), sampler=_RecordWhenExported())
        provider.add_span_processor(SPAN_PROCESSORS)
        trace.set_tracer_provider(provider)
        _PROVIDER.append(provider)
    return _PROVIDER[0]


_TRACER: list[trace.Tracer] = []


def _tracer() -> trace.Tracer:
    # get_tracer is costly (it touches the warnings filters): once per process.
    if not _TRACER:
        _TRACER.append(tracer_provider().get_tracer("fhir-audit-proxy"))
    return _TRACER[0]


def traces(request: ClientRequest) -> bool:
    """Whether a request is traced: something exports spans (a span processor is
    registered) or the caller sent a ``traceparent`` to continue. An untraced request
    makes no span and sends no ``traceparent`` upstream or onto its AuditEvents: spans
    nobody records cost about a sixth of an audited request's throughput."""
    return bool(SPAN_PROCESSORS.processors) or "traceparent" in request.headers


class _Untraced:
    """The context of an untraced request's server span: nothing to do, shared."""

    __slots__ = ()

    def __enter__(self) -> trace.Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_UNTRACED = _Untraced()


def server_span(request: ClientRequest) -> contextlib.AbstractContextManager[trace.Span]:
    """The server span of one proxied request, child of the caller's ``traceparent``.
    Named and described from the request's Exchange when the handler has made one.
    Made only when the request is traced (:func:`traces`); otherwise the context is
    a shared no-op that gives ``INVALID_SPAN``."""
    if not traces(request):
        return _UNTRACED
    return _server_span(request)


@contextlib.contextmanager
def _server_span(request: ClientRequest) -> Iterator[trace.Span]:
    token = _EXCHANGE.set(None)
    try:
        parent = propagate.extract(request.headers)
        with _tracer().start_as_current_span(
            f"FHIR {request.method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            finally:
                ex = _EXCHANGE.get()
                if ex is not None:
                    _describe(span, ex)
    finally:
        _EXCHANGE.reset(token)


def _describe(span: trace.Span, ex: Exchange) -> None:
    span.set_attribute("fhir_audit.request_id", ex.request_id)
    if ex.interaction is not None:
        kind = ex.interaction.kind.value
        span.set_attribute("fhir.interaction", kind)
        resource_type = ex.interaction.resource_type
        if resource_type:
            span.set_attribute("fhir.resource_type", resource_type)
        span.update_name(f"FHIR {kind} {resource_type}" if resource_type else f"FHIR {kind}")
    if ex.error:
        span.set_attribute("error.type", ex.error)


def finish_server_span(span: trace.Span, status: int) -> None:
    """Record the status the client got; 5xx marks the span as an error."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def exchange_started(ex: Exchange) -> None:
    """Called by the handler once the Exchange exists: the server span and the logs of
    this request will carry its request id and interaction."""
    _EXCHANGE.set(ex)


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None outside a trace."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None  # what inject would find, at a quarter of its cost (every request asks)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def record_audit_write(count: int, started_ns: int, ended_ns: int) -> None:
    """The durable write of a traced request's ``count`` events, as a child span of its
    server span (made after the fact, from the write's times: the write itself pays
    nothing for tracing)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return  # the request is not traced (see server_span)
    span = _tracer().start_span(
        "audit write",
        kind=SpanKind.INTERNAL,
        attributes={"fhir_audit.events": count},
        start_time=started_ns,
    )
    span.end(end_time=ended_ns)


class UpstreamSpan:
    """The client span of one upstream request of a traced exchange, named by method only
    (the URL can identify a patient), ended when the response head arrives
    (:meth:`answered`) or, as a context manager, when the request fails before that.
    Made by :func:`upstream_span`; an untraced request gets a shared one that does
    nothing."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span | None) -> None:
        self._span = span

    def __enter__(self) -> UpstreamSpan:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        span, self._span = self._span, None
        if span is None:
            return  # answered, or untraced
        if exc is not None:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
        span.end()  # never left open, even by a block that ends without an answer

    def answered(self, status: int) -> None:
        """The response head arrived with ``status``."""
        span, self._span = self._span, None
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


_UNTRACED_UPSTREAM = UpstreamSpan(None)


def upstream_span(method: str, port: int, headers: MutableMapping[str, str]) -> UpstreamSpan:
    """The client span of an upstream request, its W3C ``traceparent`` added to
    ``headers``, when the current request is traced; else the shared one that does
    nothing (an untraced request pays nothing for tracing)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return _UNTRACED_UPSTREAM
    span = _tracer().start_span(
        f"upstream {method}",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "server.port": port},
    )
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return UpstreamSpan(span)


# -- delivery timing --------------------------------------------------------------------


class TimedSink:
    """A sink that records how long the repository takes to answer each batch."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        result = "error"
        try:
            await self._sink.send(events)
            result = "ok"
        finally:
            DELIVERY_SECONDS.labels(result=result).observe(time.perf_counter() - t0)

    async def close(self) -> None:
        await self._sink.close()


# -- logs -------------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request id and
    trace id of the request being handled (when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ex = _EXCHANGE.get()
        if ex is not None:
            entry["request_id"] = ex.request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


JsonLogFormatter.converter = time.gmtime


def use_json_logs() -> None:
    """Make the root logger's plain stream handlers (the CLI's) write JSON lines."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(JsonLogFormatter())


@web.middleware
async def without_prometheus(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Admin middleware for ``telemetry.prometheus: false``: no ``/metrics`` page."""
    if request.path == "/metrics":
        raise web.HTTPNotFound(text="Prometheus exposition is disabled (telemetry.prometheus)")
    return await handler(request)


# -- the running part -------------------------------------------------------------------


class Telemetry:
    """One application's telemetry: its span processors on the process's tracer provider,
    a meter provider with its readers (OTLP when configured, plus any given), and a task
    that keeps the queue-depth gauge fresh for pushed metrics."""

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        span_processors: Sequence[SpanProcessor] = (),
        metric_readers: Sequence[MetricReader] = (),
        worker: int | None = None,
    ) -> None:
        """``worker``: this process's index when the proxy runs several workers."""
        self._settings = settings
        self._span_processors = list(span_processors)
        readers = list(metric_readers)
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            base = settings.otlp_endpoint.rstrip("/")
            self._span_processors.append(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
            )
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
                    export_interval_millis=settings.metric_export_interval_s * 1000,
                )
            )
        resource = _resource(settings.service_name, worker)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        cells = _OtelCells(resource)
        for reader in readers:
            cells.attach(reader)

    def start(self) -> None:
        tracer_provider(self._settings.service_name)
        SPAN_PROCESSORS.processors = (*SPAN_PROCESSORS.processors, *self._span_processors)

    def stop(self) -> None:
        """Detach, then flush and shut down the exporters (blocking: run in a thread)."""
        ours = set(map(id, self._span_processors))
        SPAN_PROCESSORS.processors = tuple(
            p for p in SPAN_PROCESSORS.processors if id(p) not in ours
        )
        for processor in self._span_processors:
            processor.shutdown()
        self.meter_provider.shutdown()


def observe_store_commit(seconds: float, records: int) -> None:
    """Record one group commit of the store: the writer's time on it and the records it
    wrote (the store's commit engine calls this, as ``app.py`` wires it)."""
    STORE_COMMIT_SECONDS.observe(seconds)
    STORE_COMMIT_SIZE.observe(records)


class QueueDepth(Protocol):
    """What the queue gauges read: the counts of the store's ``stats()``."""

    @property
    def pending(self) -> int: ...
    @property
    def delivered(self) -> int: ...
    @property
    def dead(self) -> int: ...
    @property
    def oldest_pending_recorded(self) -> float | None:
        """``recorded`` (POSIX time) of the oldest undelivered event, or None."""


def set_queue_gauges(stats: QueueDepth, now: float) -> None:
    """Set the queue-depth and oldest-pending-age gauges from one ``stats()`` read;
    ``now`` is POSIX time."""
    for status in ("pending", "delivered", "dead"):
        QUEUE_DEPTH.labels(status=status).set(getattr(stats, status))
    oldest = stats.oldest_pending_recorded
    QUEUE_OLDEST_AGE.set(0.0 if oldest is None else max(0.0, now - oldest))


TELEMETRY = web.AppKey("telemetry", Telemetry)


async def telemetry_ctx(
    app: web.Application,
    settings: TelemetrySettings,
    queue_stats: Callable[[], Awaitable[QueueDepth]],
    worker: int | None = None,
) -> AsyncIterator[None]:
    """The body of the app's telemetry ``cleanup_ctx``: start (a :class:`Telemetry` already
    in ``app[TELEMETRY]`` is used as it is), keep the gauges fresh while exporting, then
    flush and stop. ``queue_stats`` reads this worker's store (it may fail while the store
    is not open yet: the gauges then wait for the next round); ``worker`` is this
    process's index when the proxy runs several."""
    telemetry = app.get(TELEMETRY) or Telemetry(settings, worker=worker)
    app[TELEMETRY] = telemetry
    telemetry.start()
    if settings.json_logs:
        use_json_logs()

    async def gauges() -> None:
        while True:
            await asyncio.sleep(settings.metric_export_interval_s / 2)
            with contextlib.suppress(Exception):
                set_queue_gauges(await queue_stats(), time.time())

    try:
        if settings.otlp_endpoint:
            async with running(gauges(), "telemetry-gauges"):
                yield
        else:
            yield
    finally:
        await asyncio.to_thread(telemetry.stop)
