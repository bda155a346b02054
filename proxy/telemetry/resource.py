"""The OpenTelemetry resource of this process: what every span and metric it exports is
attributed to.

From lowest to highest precedence: the SDK's own attributes (``telemetry.sdk.*``, a
``service.instance.id`` per process); the pod's identity from the downward-API variables
the sidecar injector sets (:data:`DOWNWARD_API`); ``telemetry.service_name`` of the
configuration; ``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_SERVICE_NAME``. With several workers,
each process also names its index (:data:`WORKER_ATTRIBUTE`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry.semconv.attributes.k8s_attributes import (
    K8S_NAMESPACE_NAME,
    K8S_NODE_NAME,
    K8S_POD_IP,
    K8S_POD_NAME,
    K8S_POD_UID,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

WORKER_ATTRIBUTE = "fhir_audit.worker"
"""The resource attribute naming the worker, when the proxy runs several."""

DOWNWARD_API = {
    "K8S_POD_NAME": K8S_POD_NAME,
    "K8S_POD_UID": K8S_POD_UID,
    "K8S_NAMESPACE_NAME": K8S_NAMESPACE_NAME,
    "K8S_NODE_NAME": K8S_NODE_NAME,
    "K8S_POD_IP": K8S_POD_IP,
}
"""The environment variables the injector fills from the downward API (``metadata.name``,
``metadata.uid``, ``metadata.namespace``, ``spec.nodeName``, ``status.podIP``), and the
resource attribute each becomes."""


def pod_attributes(environ: Mapping[str, str]) -> dict[str, str]:
    """The pod's resource attributes from the downward-API variables set in ``environ``."""
    return {
        attribute: value
        for variable, attribute in DOWNWARD_API.items()
        if (value := environ.get(variable, "").strip())
    }


def process_resource(service_name: str, worker: int | None = None) -> Resource:
    """This process's OpenTelemetry resource, from its environment as described above
    (``service_name``: the configuration's). Each process exports cumulative series of its own,
    which a backend tells apart from another process's by the resource only: the SDK
    gives each process a ``service.instance.id``; with several workers each also names
    its index, and one that ``OTEL_RESOURCE_ATTRIBUTES`` names (as the injector does, after
    the pod) gets the suffix ``.worker-<index>``, since a backend such as Prometheus keys
    the series on ``service.name`` and ``service.instance.id`` alone. The SDK is imported
    here, not with this module: only a process that exports needs it."""
    from opentelemetry.sdk.resources import (
        SERVICE_INSTANCE_ID,
        SERVICE_NAME,
        OTELResourceDetector,
        Resource,
    )

    attributes: dict[str, str | int] = {
        **pod_attributes(os.environ),
        SERVICE_NAME: service_name,
        # The SDK merges what it is given over what it detects; the environment must win.
        **{
            k: v
            for k, v in OTELResourceDetector().detect().attributes.items()
            if isinstance(v, str)
        },
    }
    if worker is not None:
        attributes[WORKER_ATTRIBUTE] = worker
        if instance := attributes.get(SERVICE_INSTANCE_ID):
            attributes[SERVICE_INSTANCE_ID] = f"{instance}.worker-{worker}"
    return Resource.create(attributes)
