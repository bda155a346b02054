"""Workers' metrics added up: with ``workers`` > 1 each process counts its own cells; worker
0's Prometheus exposition adds the others' counters and histograms, which each publishes
as a :func:`snapshot` (:mod:`proxy.worker_metrics`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from proxy.telemetry.cells import METRICS, Metric

Snapshot = dict[str, list[Any]]
"""Counters and histograms by metric name, each a list of ``[label values, value,
created]``; a histogram's value is ``[counts, sum, min, max]`` (None for no extreme)."""


def snapshot() -> Snapshot:
    """This process's counters and histograms, as JSON-ready lists (for the admin
    ``/metrics`` of another process to add up: :mod:`proxy.worker_metrics`)."""
    found: Snapshot = {}
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


_peer_snapshots: Callable[[], Sequence[Snapshot]] | None = None


def set_peer_snapshots(source: Callable[[], Sequence[Snapshot]] | None) -> None:
    """Where the Prometheus exposition finds other processes' counters and histograms to
    add to this one's (``workers`` > 1, on worker 0); None: this process's only."""
    global _peer_snapshots
    _peer_snapshots = source


def peer_snapshots() -> Sequence[Snapshot]:
    """The other processes' snapshots (none unless :func:`set_peer_snapshots` named a
    source)."""
    return _peer_snapshots() if _peer_snapshots is not None else ()


def added(metric: Metric, peers: Sequence[Snapshot]) -> list[tuple[tuple[str, ...], Any]]:
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
