"""The process's OpenTelemetry resource: the pod's identity from the variables the injector
fills from the downward API, the configuration's service name, and the SDK's
``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` over both."""

from __future__ import annotations

import pytest

from proxy.telemetry.resource import WORKER_ATTRIBUTE, pod_attributes, process_resource
from tests.factories import POD_ENV

POD = POD_ENV


def test_the_downward_api_variables_name_the_pod() -> None:
    assert pod_attributes(POD) == {
        "k8s.pod.name": "hapi-7d9f-x2x8q",
        "k8s.pod.uid": "0b5c3c7e-4a4e-4d38-9b7e-2d0f8d1c6a11",
        "k8s.namespace.name": "fhir",
        "k8s.node.name": "node-3",
        "k8s.pod.ip": "10.42.0.17",
    }
    # Outside a pod (or a variable the kubelet left empty): nothing is made up.
    assert pod_attributes({"K8S_POD_NAME": " ", "HOSTNAME": "x"}) == {}


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process's environment without OpenTelemetry or pod variables, to set."""
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", *POD):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


PRECEDENCE = [
    # environment, expected service.name, expected k8s.pod.name
    ({}, "from-config", None),
    (POD, "from-config", "hapi-7d9f-x2x8q"),
    (
        {**POD, "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"},
        "from-attrs",
        "hapi-7d9f-x2x8q",
    ),
    ({"OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=named%20here", **POD}, "from-config", "named here"),
    (
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs", "OTEL_SERVICE_NAME": "from-env"},
        "from-env",
        None,
    ),
]


@pytest.mark.parametrize(("environ", "service", "pod"), PRECEDENCE)
def test_the_environment_wins_over_the_configuration(
    environment: pytest.MonkeyPatch, environ: dict[str, str], service: str, pod: str | None
) -> None:
    for name, value in environ.items():
        environment.setenv(name, value)
    attributes = process_resource("from-config").attributes
    assert attributes["service.name"] == service
    assert attributes.get("k8s.pod.name") == pod
    assert attributes["telemetry.sdk.name"] == "opentelemetry"
    assert WORKER_ATTRIBUTE not in attributes


def test_each_worker_names_its_index_and_has_its_own_instance(
    environment: pytest.MonkeyPatch,
) -> None:
    attributes = process_resource("fhir-audit-proxy", 2).attributes
    assert attributes[WORKER_ATTRIBUTE] == 2
    assert attributes["service.instance.id"]


def test_workers_sharing_an_instance_id_from_the_environment_are_told_apart(
    environment: pytest.MonkeyPatch,
) -> None:
    # The injector names the instance after the pod; a backend keys cumulative series on
    # (service.name, service.instance.id), so two workers must not report under one.
    environment.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=fhir.hapi-0.sidecar")
    ids = [process_resource("p", worker).attributes["service.instance.id"] for worker in (0, 1)]
    assert ids == ["fhir.hapi-0.sidecar.worker-0", "fhir.hapi-0.sidecar.worker-1"]
    # A single process keeps the instance the environment names.
    assert process_resource("p").attributes["service.instance.id"] == "fhir.hapi-0.sidecar"
