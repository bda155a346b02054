"""Metrics, traces and structured logs, one module a job:

- :mod:`.cells`: the metric-cell engine (a metric is counted in plain Python cells, one
  per label set; nothing is formatted or exported per update);
- :mod:`.metrics`: the proxy's metrics, declared once;
- :mod:`.peers`: other workers' counters and histograms added to this one's;
- :mod:`.prometheus`: the Prometheus exposition (admin ``/metrics``, names ``fhir_audit_*``);
- :mod:`.otel_metrics`: the same cells as OpenTelemetry metric points, for the readers of
  every running :class:`Telemetry` (exported over OTLP/HTTP when configured);
- :mod:`.resource`: the OpenTelemetry resource of this process (configuration, pod
  identity from the downward API, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``);
- :mod:`.export`: what is exported over OTLP and where (configuration, then the SDK's
  ``OTEL_*`` variables);
- :mod:`.tracing`: the tracer provider, its span processors and sampler, the audit-write
  span;
- :mod:`.http`: the server and client spans and metrics of the HTTP semantic conventions;
- :mod:`.routes`: FHIR route templates (``http.route``) and paths with ids scrubbed;
- :mod:`.current`: the request this task is handling (for spans and log lines);
- :mod:`.logs`: JSON log lines;
- :mod:`.delivery`: the repository's answer time per batch;
- :mod:`.queue`: the store's commits and queue depth as metrics (read through callables:
  telemetry imports nothing of the store);
- :mod:`.running`: one application's telemetry, started and stopped by its
  ``cleanup_ctx``.

The names below are the package's interface; callers use them as
``telemetry.REQUESTS.labels(...).inc()``.
"""

from __future__ import annotations

from proxy.telemetry.cells import METRICS
from proxy.telemetry.current import exchange_started
from proxy.telemetry.delivery import TimedSink
from proxy.telemetry.export import export_plan
from proxy.telemetry.http import ServedRequest, UpstreamSpan, observed, serving, upstream_span
from proxy.telemetry.logs import JsonLogFormatter, use_json_logs
from proxy.telemetry.metrics import (
    AUDIT_FAILURES,
    AUDIT_WRITE_SECONDS,
    DELIVERIES,
    DELIVERY_LAG,
    DELIVERY_SECONDS,
    EVENTS_BUILT,
    EVENTS_DEAD,
    EVENTS_DELIVERED,
    EVENTS_INVALID,
    FORWARDED_FOR_INVALID,
    QUEUE_DEPTH,
    QUEUE_OLDEST_AGE,
    REQUESTS,
    STORE_COMMIT_SECONDS,
    STORE_COMMIT_SIZE,
    UPSTREAM_SECONDS,
)
from proxy.telemetry.peers import set_peer_snapshots, snapshot
from proxy.telemetry.prometheus import REGISTRY, without_prometheus
from proxy.telemetry.queue import QueueDepth, observe_store_commit, set_queue_gauges
from proxy.telemetry.resource import WORKER_ATTRIBUTE
from proxy.telemetry.running import TELEMETRY, Telemetry, telemetry_ctx
from proxy.telemetry.tracing import (
    SPAN_PROCESSORS,
    current_traceparent,
    record_audit_write,
    tracer_provider,
    traces,
)

__all__ = [
    "AUDIT_FAILURES",
    "AUDIT_WRITE_SECONDS",
    "DELIVERIES",
    "DELIVERY_LAG",
    "DELIVERY_SECONDS",
    "EVENTS_BUILT",
    "EVENTS_DEAD",
    "EVENTS_DELIVERED",
    "EVENTS_INVALID",
    "FORWARDED_FOR_INVALID",
    "METRICS",
    "QUEUE_DEPTH",
    "QUEUE_OLDEST_AGE",
    "REGISTRY",
    "REQUESTS",
    "SPAN_PROCESSORS",
    "STORE_COMMIT_SECONDS",
    "STORE_COMMIT_SIZE",
    "TELEMETRY",
    "UPSTREAM_SECONDS",
    "WORKER_ATTRIBUTE",
    "JsonLogFormatter",
    "QueueDepth",
    "ServedRequest",
    "Telemetry",
    "TimedSink",
    "UpstreamSpan",
    "current_traceparent",
    "exchange_started",
    "export_plan",
    "observe_store_commit",
    "observed",
    "record_audit_write",
    "serving",
    "set_peer_snapshots",
    "set_queue_gauges",
    "snapshot",
    "telemetry_ctx",
    "tracer_provider",
    "traces",
    "upstream_span",
    "use_json_logs",
    "without_prometheus",
]
