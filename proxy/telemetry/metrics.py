"""The proxy's metrics, declared once: what each counts, its labels and unit, its name and
attributes in OpenTelemetry. Callers record through these objects
(``REQUESTS.labels(kind="read", status_class="2xx").inc()``).

The Prometheus families (``fhir_audit_*`` on the admin ``/metrics``) are exported over
OTLP under ``fhir_audit.*`` names, except ``fhir_audit_upstream_seconds``, which
``http.client.request.duration`` stands for there. The HTTP semantic conventions' metrics
(``http.server.request.duration``, ``http.server.active_requests``,
``http.client.request.duration``) are OpenTelemetry's only: recorded while a reader
collects them (:mod:`.http`)."""

from __future__ import annotations

from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.network_attributes import NETWORK_PROTOCOL_VERSION
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_SCHEME

from proxy.telemetry.cells import OtelName, otel_only
from proxy.telemetry.cells import counter as _counter
from proxy.telemetry.cells import gauge as _gauge
from proxy.telemetry.cells import histogram as _histogram

REQUESTS = _counter(
    "fhir_audit_requests",
    "Requests proxied, by interaction kind and status class.",
    ["kind", "status_class"],
    otel=OtelName(
        "fhir_audit.requests", "{request}", ("fhir.interaction", "fhir_audit.status_class")
    ),
)
UPSTREAM_SECONDS = _histogram(
    "fhir_audit_upstream_seconds", "Time to the upstream's response head.", exported=False
)
EVENTS_BUILT = _counter(
    "fhir_audit_events_built",
    "AuditEvents built, by outcome code.",
    ["outcome"],
    otel=OtelName("fhir_audit.events.built", "{event}", ("fhir_audit.event.outcome",)),
)
EVENTS_INVALID = _counter(
    "fhir_audit_events_invalid",
    "AuditEvents that failed fhir.resources validation (still stored and forwarded).",
    otel=OtelName("fhir_audit.events.invalid", "{event}"),
)
AUDIT_FAILURES = _counter(
    "fhir_audit_failures",
    "Requests failed closed because their audit could not be built or persisted.",
    ["reason"],
    otel=OtelName("fhir_audit.failures", "{request}", (ERROR_TYPE,)),
)
AUDIT_WRITE_SECONDS = _histogram(
    "fhir_audit_write_seconds",
    "Time a request waits for its AuditEvents to be durable (its share of a group commit).",
    otel=OtelName("fhir_audit.write.duration", "s"),
)
STORE_COMMIT_SECONDS = _histogram(
    "fhir_audit_store_commit_seconds",
    "Duration of one group commit (with fsync).",
    threaded=True,
    otel=OtelName("fhir_audit.store.commit.duration", "s"),
)
STORE_COMMIT_SIZE = _histogram(
    "fhir_audit_store_commit_records",
    "Records written by one group commit.",
    unit="1",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    threaded=True,
    otel=OtelName("fhir_audit.store.commit.size", "{record}"),
)
QUEUE_DEPTH = _gauge(
    "fhir_audit_queue_events",
    "Events in the local queue, by status.",
    ["status"],
    otel=OtelName("fhir_audit.queue.events", "{event}", ("fhir_audit.event.status",)),
)
QUEUE_OLDEST_AGE = _gauge(
    "fhir_audit_queue_oldest_pending_age_seconds",
    "Age (from its recorded time) of the oldest undelivered event; 0 when none is pending.",
    unit="s",
    otel=OtelName("fhir_audit.queue.oldest_pending.age", "s"),
)
DELIVERY_LAG = _histogram(
    "fhir_audit_delivery_lag_seconds",
    "Time from an event's recorded time to the repository's acknowledgement of it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400),
    otel=OtelName("fhir_audit.delivery.lag", "s"),
)
DELIVERIES = _counter(
    "fhir_audit_delivery_attempts",
    "Batches sent to the repository, by result (ok, retry, rejected).",
    ["result"],
    otel=OtelName("fhir_audit.delivery.attempts", "{batch}", ("fhir_audit.delivery.result",)),
)
DELIVERY_SECONDS = _histogram(
    "fhir_audit_delivery_seconds",
    "Time the repository took to answer one batch, by result (ok, error).",
    ["result"],
    otel=OtelName("fhir_audit.delivery.duration", "s", ("fhir_audit.delivery.result",)),
)
EVENTS_DELIVERED = _counter(
    "fhir_audit_events_delivered",
    "Events acknowledged by the repository.",
    otel=OtelName("fhir_audit.events.delivered", "{event}"),
)
EVENTS_DEAD = _counter(
    "fhir_audit_events_dead_lettered",
    "Events moved to the dead-letter state after the repository rejected them.",
    otel=OtelName("fhir_audit.events.dead_lettered", "{event}"),
)
FORWARDED_FOR_INVALID = _counter(
    "fhir_audit_forwarded_for_invalid",
    "X-Forwarded-For entries from a trusted proxy that were not IP addresses (ignored).",
    otel=OtelName("fhir_audit.forwarded_for.invalid", "{entry}"),
)


# -- the HTTP semantic conventions' metrics (OpenTelemetry only) -------------------------

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
"""The bucket boundaries the HTTP semantic conventions advise for request durations."""

HTTP_SERVER_DURATION = otel_only(
    OtelName(
        "http.server.request.duration",
        "s",
        (
            HTTP_REQUEST_METHOD,
            URL_SCHEME,
            HTTP_ROUTE,
            HTTP_RESPONSE_STATUS_CODE,
            ERROR_TYPE,
            NETWORK_PROTOCOL_VERSION,
        ),
        frozenset({HTTP_RESPONSE_STATUS_CODE}),
    ),
    "Duration of HTTP server requests: from the request's head to the proxy's answer.",
    "histogram",
    DURATION_BUCKETS,
)
HTTP_SERVER_ACTIVE = otel_only(
    OtelName("http.server.active_requests", "{request}", (HTTP_REQUEST_METHOD, URL_SCHEME)),
    "Number of active HTTP server requests.",
    "updown",
)
HTTP_CLIENT_DURATION = otel_only(
    OtelName(
        "http.client.request.duration",
        "s",
        (HTTP_REQUEST_METHOD, SERVER_ADDRESS, SERVER_PORT, HTTP_RESPONSE_STATUS_CODE, ERROR_TYPE),
        frozenset({SERVER_PORT, HTTP_RESPONSE_STATUS_CODE}),
    ),
    "Duration of HTTP client requests to the upstream FHIR server: to its response head.",
    "histogram",
    DURATION_BUCKETS,
)
