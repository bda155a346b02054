"""The OpenTelemetry resource of this process: what every span and metric it exports is
attributed to."""

from __future__ import annotations

from opentelemetry.sdk.resources import SERVICE_NAME, Resource

WORKER_ATTRIBUTE = "fhir_audit.worker"
"""The resource attribute naming the worker, when the proxy runs several."""


def process_resource(service_name: str, worker: int | None = None) -> Resource:
    """This process's OpenTelemetry resource. Each process exports cumulative series of
    its own, which a backend tells apart from another process's by the resource only: the
    SDK gives each process a ``service.instance.id`` (unless ``OTEL_RESOURCE_ATTRIBUTES``
    names one, which every worker of a pod then shares), and with several workers each
    also names its index."""
    attributes: dict[str, str | int] = {SERVICE_NAME: service_name}
    if worker is not None:
        attributes[WORKER_ATTRIBUTE] = worker
    return Resource.create(attributes)
