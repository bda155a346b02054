"""The proxy's metrics, declared once: what each counts, its labels and its unit. Callers
record through these objects (``REQUESTS.labels(kind="read", status_class="2xx").inc()``);
:data:`~proxy.telemetry.cells.METRICS` lists them for the adapters."""

from __future__ import annotations

from proxy.telemetry.cells import counter as _counter
from proxy.telemetry.cells import gauge as _gauge
from proxy.telemetry.cells import histogram as _histogram

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
