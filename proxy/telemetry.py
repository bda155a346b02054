"""Metrics (Prometheus exposition on the admin listener) and, when configured, OpenTelemetry.

The metrics live in one registry of their own so that the admin ``/metrics`` page shows
only this proxy's series. Names follow Prometheus conventions: ``fhir_audit_*``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "fhir_audit_requests",
    "Requests proxied, by interaction kind and status class.",
    ["kind", "status_class"],
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "fhir_audit_upstream_seconds", "Time to the upstream's response head.", registry=REGISTRY
)
EVENTS_BUILT = Counter(
    "fhir_audit_events_built", "AuditEvents built, by outcome code.", ["outcome"], registry=REGISTRY
)
EVENTS_INVALID = Counter(
    "fhir_audit_events_invalid",
    "AuditEvents that failed fhir.resources validation (still stored and forwarded).",
    registry=REGISTRY,
)
AUDIT_FAILURES = Counter(
    "fhir_audit_failures",
    "Requests failed closed because their audit could not be built or persisted.",
    ["reason"],
    registry=REGISTRY,
)
STORE_COMMIT_SECONDS = Histogram(
    "fhir_audit_store_commit_seconds",
    "Duration of one group commit (with fsync).",
    registry=REGISTRY,
)
STORE_COMMIT_SIZE = Histogram(
    "fhir_audit_store_commit_records",
    "Records written by one group commit.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "fhir_audit_queue_events",
    "Events in the local queue, by status.",
    ["status"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "fhir_audit_delivery_attempts",
    "Batches sent to the repository, by result (ok, retry, rejected).",
    ["result"],
    registry=REGISTRY,
)
EVENTS_DELIVERED = Counter(
    "fhir_audit_events_delivered", "Events acknowledged by the repository.", registry=REGISTRY
)
EVENTS_DEAD = Counter(
    "fhir_audit_events_dead_lettered",
    "Events moved to the dead-letter state after the repository rejected them.",
    registry=REGISTRY,
)
FORWARDED_FOR_INVALID = Counter(
    "fhir_audit_forwarded_for_invalid",
    "X-Forwarded-For entries from a trusted proxy that were not IP addresses (ignored).",
    registry=REGISTRY,
)
