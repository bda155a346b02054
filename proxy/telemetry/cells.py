"""The metric-cell engine: a metric of the proxy is counted in plain Python cells, one per
label set, whose update is an attribute increment or two. Nothing is formatted or exported
per update: the adapters (:mod:`.prometheus`, :mod:`.otel_metrics`) read the cells when
they are asked.

Two lists of metrics: :data:`METRICS`, the Prometheus families of the admin ``/metrics``
(each also exported over OTLP under its OpenTelemetry name), and :data:`OTEL_ONLY`, the
metrics of the HTTP semantic conventions, recorded only while an OpenTelemetry reader
collects them and exported only there."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram


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

    def add(self, amount: float) -> None:
        self.value += amount

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


@dataclass(frozen=True, slots=True)
class OtelName:
    """How a metric is named in OpenTelemetry (its Prometheus name is :attr:`Metric.name`)."""

    name: str
    """The instrument's name: ``http.server.request.duration``, ``fhir_audit.events.built``."""
    unit: str
    """Its UCUM unit: ``s``, ``{request}``, ``{event}``."""
    attributes: tuple[str, ...] = ()
    """The attribute each label becomes, in the order of the labels."""
    integers: frozenset[str] = frozenset()
    """The attributes whose values are integers (a status code, a port)."""


class Metric:
    """A metric of the proxy, counted in plain Python: each label set is a cell (found
    once: callers on the request path keep the cell ``labels()`` returns) whose update is
    an attribute increment or two. Nothing is formatted or exported per update: the
    Prometheus registry reads the cells when scraped (:mod:`.prometheus`), and each
    running :class:`~proxy.telemetry.Telemetry`'s OpenTelemetry readers when they
    collect (:mod:`.otel_metrics`).

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
        otel: OtelName | None = None,
    ) -> None:
        """``otel``: its OpenTelemetry name, unit and attributes; None: not exported over
        OTLP (another metric stands for it there)."""
        self.name = name
        self.description = description
        self.labelnames = tuple(labelnames)
        self.unit = unit
        self.kind = kind
        """counter, gauge, updown (a gauge counted up and down) or histogram."""
        self.otel = otel
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
                elif self.kind in ("gauge", "updown"):
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

    def cell(self, *values: str) -> Any:
        """The cell of one label set, by the labels' values in their order ("" for a
        label that does not apply)."""
        cell = self._cells.get(values)
        return cell if cell is not None else self._cell(values)

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


METRICS: list[Metric] = []
"""The Prometheus families, in the order declared (:mod:`.metrics`)."""
OTEL_ONLY: list[Metric] = []
"""The metrics recorded only while an OpenTelemetry reader collects, and exported only
there (the HTTP semantic conventions' metrics: :mod:`.metrics`)."""


class _Collecting:
    """How many running :class:`~proxy.telemetry.Telemetry` objects have metric readers:
    the metrics of :data:`OTEL_ONLY` are recorded only while one has."""

    __slots__ = ("readers",)

    def __init__(self) -> None:
        self.readers = 0


COLLECTING = _Collecting()


def _family(
    kind: str,
    name: str,
    doc: str,
    labels: Sequence[str],
    unit: str,
    buckets: Sequence[float] = (),
    threaded: bool = False,
    otel: OtelName | None = None,
    exported: bool = True,
) -> Metric:
    """A Prometheus family of :data:`METRICS`, exported over OTLP as ``otel`` names it; a
    metric declared without one is exported as ``fhir_audit.x_y`` for ``fhir_audit_x_y``,
    its labels as attributes of the same names (none at all when not ``exported``)."""
    if otel is None:
        otel = OtelName(name.replace("fhir_audit_", "fhir_audit.", 1), unit, tuple(labels))
    metric = Metric(
        name, doc, labels, unit, kind, buckets, threaded, otel=otel if exported else None
    )
    METRICS.append(metric)
    return metric


def counter(
    name: str, doc: str, labels: Sequence[str] = (), unit: str = "1", otel: OtelName | None = None
) -> Metric:
    """A Prometheus counter, exported over OTLP as ``otel`` names it."""
    return _family("counter", name, doc, labels, unit, otel=otel)


def gauge(
    name: str, doc: str, labels: Sequence[str] = (), unit: str = "1", otel: OtelName | None = None
) -> Metric:
    """A Prometheus gauge, exported over OTLP as ``otel`` names it."""
    return _family("gauge", name, doc, labels, unit, otel=otel)


def histogram(
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    unit: str = "s",
    buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    threaded: bool = False,
    otel: OtelName | None = None,
    *,
    exported: bool = True,
) -> Metric:
    """A Prometheus histogram, exported over OTLP as ``otel`` names it (not at all when
    not ``exported``: another metric stands for it there)."""
    return _family("histogram", name, doc, labels, unit, buckets, threaded, otel, exported)


def otel_only(otel: OtelName, doc: str, kind: str, buckets: Sequence[float] = ()) -> Metric:
    """A metric of :data:`OTEL_ONLY` (``kind``: histogram or updown); its labels are its
    attributes, set through :meth:`Metric.cell`."""
    metric = Metric(otel.name, doc, otel.attributes, otel.unit, kind, buckets, otel=otel)
    OTEL_ONLY.append(metric)
    return metric
