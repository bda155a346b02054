"""The pod patch builder, as a table: each captured AdmissionReview's pod, the decision,
and the pod after the patch is applied (with a real JSONPatch library) validated as a Pod
against the Kubernetes schemas of the oldest and newest supported versions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from proxy.k8s.patch import (
    INIT,
    SIDECAR,
    STATUS_ANNOTATION,
    Selection,
    decide,
    read_annotations,
)
from proxy.settings import Settings, WebhookSettings

ADMISSION = Path(__file__).parent / "admission"
K8S_VERSIONS = ("1.29.0", "1.37.0")
"""The supported range; the README states the same."""
DEFAULTS = WebhookSettings(image="registry.example.org/fhir-audit-proxy:0.1.0")


def review(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ADMISSION / f"{name}.yaml").read_text())
    return loaded


def patched(name: str, selection: Selection = Selection.NAMESPACE) -> dict[str, Any]:
    request = review(name)["request"]
    decision = decide(request["object"], request["namespace"], DEFAULTS, selection)
    assert decision.injected, decision.reason
    pod: dict[str, Any] = jsonpatch.apply_patch(request["object"], decision.patch)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    return pod


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "(ref)") for e in container["env"]}


def test_deployment_pod_gets_redirect_then_native_sidecar_and_keeps_its_volume() -> None:
    pod = patched("deployment-hapi")
    init = pod["spec"]["initContainers"]
    assert [c["name"] for c in init] == [INIT, SIDECAR]
    assert init[0]["command"][-6:] == [
        "--fhir-port",
        "8080",
        "--proxy-port",
        "15080",
        "--proxy-uid",
        "10001",
    ]
    assert init[0]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    sidecar = init[1]
    assert sidecar["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar
    env = env_of(sidecar)
    assert env["FHIR_AUDIT_UPSTREAM__URL"] == "http://127.0.0.1:8080/fhir"
    assert env["FHIR_AUDIT_ADMIN__HOST"] == "127.0.0.1"
    assert "FHIR_AUDIT_REPOSITORY__URL" not in env
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "kube-api-access-x7h2k" in volumes
    assert volumes["fhir-audit-proxy-store"] == {"name": "fhir-audit-proxy-store", "emptyDir": {}}
    assert pod["metadata"]["annotations"] == {STATUS_ANNOTATION: "injected"}
    assert [c["name"] for c in pod["spec"]["containers"]] == ["hapi"]


def test_the_injected_environment_is_read_by_the_proxy_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [k for k in os.environ if k.startswith("FHIR_AUDIT_")]:
        monkeypatch.delenv(key)
    sidecar = patched("multi-container")["spec"]["initContainers"][1]
    for name, value in env_of(sidecar).items():
        if name != "FHIR_AUDIT_CONFIG":  # a mounted file
            monkeypatch.setenv(name, value.replace("(ref)", "fhir"))
    settings = Settings()
    assert settings.listen.port == DEFAULTS.proxy_port
    assert settings.admin.host == "127.0.0.1"
    assert settings.repository.mode == "transaction"
    assert settings.repository.auth.type == "oauth2_client_credentials"
    assert settings.repository.auth.client_secret_file == Path(
        "/var/run/secrets/fhir-audit-proxy/oauth/client-secret"
    )
    assert settings.telemetry.json_logs is True


def test_own_init_containers_run_after_the_proxy_and_annotations_are_kept() -> None:
    pod = patched("init-containers")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [INIT, SIDECAR, "migrate"]
    env = env_of(pod["spec"]["initContainers"][1])
    assert env["FHIR_AUDIT_UPSTREAM__URL"] == "http://127.0.0.1:8000/fhir/DEFAULT"
    assert env["FHIR_AUDIT_AUDIT__FHIR_VERSION"] == "R5"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"][STATUS_ANNOTATION] == "injected"


def test_named_port_of_the_named_container_and_every_volume_annotation() -> None:
    pod = patched("multi-container")
    init = pod["spec"]["initContainers"]
    assert init[0]["command"][init[0]["command"].index("--fhir-port") + 1] == "8888"
    sidecar = init[1]
    env = env_of(sidecar)
    assert env["FHIR_AUDIT_UPSTREAM__URL"] == "http://127.0.0.1:8888/fhir"
    assert env["FHIR_AUDIT_REPOSITORY__URL"] == "https://auditbox.example.org/fhir"
    assert env["FHIR_AUDIT_REPOSITORY__MODE"] == "transaction"
    assert env["FHIR_AUDIT_REPOSITORY__AUTH__TYPE"] == "oauth2_client_credentials"
    assert env["FHIR_AUDIT_REPOSITORY__AUTH__CLIENT_ID"] == "fhir-audit-proxy"
    assert env["FHIR_AUDIT_CONFIG"] == "/etc/fhir-audit-proxy/config.yaml"
    # The secret travels as a mounted file, never as an env value.
    assert not any("SECRET" in name and name.endswith("SECRET") for name in env)
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "112Mi"},
        "limits": {"memory": "1Gi"},
    }
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert next(iter(volumes)) == "fluent-bit-config"
    assert volumes["fhir-audit-proxy-store"]["persistentVolumeClaim"] == {
        "claimName": "aidbox-audit-store"
    }
    assert volumes["fhir-audit-proxy-config"]["configMap"] == {"name": "aidbox-audit-config"}
    assert volumes["fhir-audit-proxy-oauth"]["secret"] == {"secretName": "auditbox-client"}
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert set(mounts) == set(volumes) - {"fluent-bit-config"}


def test_fallback_container_first_with_poststart_wait_and_no_privileged_init() -> None:
    pod = patched("fallback-takeover", Selection.ANNOTATION)
    # The fallback is for clusters without native sidecars: valid there too.
    kubernetes_validate.validate(pod, "1.27.0", strict=True)
    assert "initContainers" not in pod["spec"]
    first = pod["spec"]["containers"][0]
    assert [c["name"] for c in pod["spec"]["containers"]] == [SIDECAR, "firely"]
    assert "restartPolicy" not in first
    assert first["lifecycle"]["postStart"]["exec"]["command"][-2:] == ["--wait", "60"]
    assert "preStop" in first["lifecycle"]
    assert first["ports"] == [{"name": "fhir-audit", "containerPort": 15080, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("name", "selection", "reason"),
    [
        ("host-network", Selection.NAMESPACE, "hostNetwork pods are never injected"),
        ("kube-system", Selection.NAMESPACE, "namespace kube-system is never injected"),
        ("kube-system", Selection.ANNOTATION, "namespace kube-system is never injected"),
        ("opted-out", Selection.NAMESPACE, "fhir-audit-proxy/inject is false"),
        ("deployment-hapi", Selection.ANNOTATION, "not opted in"),
        ("bad-annotations", Selection.NAMESPACE, "bad annotations"),
    ],
)
def test_not_injected(name: str, selection: Selection, reason: str) -> None:
    request = review(name)["request"]
    decision = decide(request["object"], request["namespace"], DEFAULTS, selection)
    assert (decision.patch, decision.reason) == ([], reason)


@pytest.mark.parametrize(
    ("labels", "annotations", "selection", "injected"),
    [
        ({"fhir-audit-proxy/inject": "true"}, {}, Selection.ANNOTATION, True),
        ({}, {"fhir-audit-proxy/inject": "true"}, Selection.ANNOTATION, True),
        ({"fhir-audit-proxy/inject": "false"}, {}, Selection.NAMESPACE, False),
        (
            {"fhir-audit-proxy/inject": "true"},
            {"fhir-audit-proxy/inject": "false"},
            Selection.ANNOTATION,
            False,
        ),
        (
            {"fhir-audit-proxy/inject": "false"},
            {"fhir-audit-proxy/inject": "true"},
            Selection.NAMESPACE,
            False,
        ),
    ],
)
def test_opt_in_by_label_or_annotation_and_false_wins(
    labels: dict[str, str], annotations: dict[str, str], selection: Selection, injected: bool
) -> None:
    pod: dict[str, Any] = {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "containers": [{"name": "fhir", "image": "x", "ports": [{"containerPort": 8080}]}]
        },
    }
    assert decide(pod, "fhir", DEFAULTS, selection).injected is injected


def test_bad_annotations_each_get_a_warning() -> None:
    request = review("bad-annotations")["request"]
    decision = decide(request["object"], "fhir", DEFAULTS, Selection.NAMESPACE)
    assert decision.warnings == [
        "fhir-audit-proxy not injected: unknown annotation fhir-audit-proxy/upstream-prot",
        "fhir-audit-proxy not injected: fhir-audit-proxy/memory-limit='lots': "
        "not a resource quantity",
    ]


def test_injecting_twice_is_a_no_op() -> None:
    once = patched("deployment-hapi")
    again = decide(once, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert (again.patch, again.reason) == ([], "already injected")
    # Even if the status annotation was stripped, the container name gives it away.
    del once["metadata"]["annotations"][STATUS_ANNOTATION]
    assert decide(once, "fhir", DEFAULTS, Selection.NAMESPACE).reason == "already injected"


@pytest.mark.parametrize(
    ("annotations", "problem"),
    [
        (
            {"fhir-audit-proxy/inject": "yes"},
            "fhir-audit-proxy/inject='yes': expected one of false, true",
        ),
        ({"fhir-audit-proxy/upstream-port": "70000"}, "not a port number or name"),
        ({"fhir-audit-proxy/upstream-port": "Http"}, "not a port number or name"),
        ({"fhir-audit-proxy/base-path": "fhir"}, "must start with /"),
        ({"fhir-audit-proxy/repository-url": "ftp://x"}, "not an http(s) URL"),
        (
            {"fhir-audit-proxy/repository-mode": "file"},
            "expected one of bundle, single, transaction",
        ),
        ({"fhir-audit-proxy/store-pvc": "Has_Caps"}, "not a Kubernetes object name"),
        ({"fhir-audit-proxy/cpu-request": "1 core"}, "not a resource quantity"),
        ({"fhir-audit-proxy/sidecar": "daemon"}, "expected one of container, native"),
    ],
)
def test_annotation_problems(annotations: dict[str, str], problem: str) -> None:
    _, problems = read_annotations({**annotations, "unrelated/thing": "x"})
    assert len(problems) == 1 and problem in problems[0]


@pytest.mark.parametrize(
    ("ports", "annotation", "expected"),
    [
        ([], None, "no containerPort declared; set fhir-audit-proxy/upstream-port"),
        ([{"name": "http", "containerPort": 8080}], "https", "no containerPort named 'https'"),
        ([{"containerPort": 15080}], None, "the FHIR port 15080 is the proxy's own port"),
        (
            [{"containerPort": 53, "protocol": "UDP"}],
            None,
            "no containerPort declared; set fhir-audit-proxy/upstream-port",
        ),
    ],
)
def test_no_fhir_port_means_a_warning_and_no_patch(
    ports: list[dict[str, Any]], annotation: str | None, expected: str
) -> None:
    pod: dict[str, Any] = {
        "metadata": {
            "annotations": {"fhir-audit-proxy/upstream-port": annotation} if annotation else {}
        },
        "spec": {"containers": [{"name": "fhir", "image": "x", "ports": ports}]},
    }
    decision = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert decision.patch == []
    assert decision.warnings == [f"fhir-audit-proxy not injected: {expected}"]
