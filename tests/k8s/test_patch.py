"""The pod patch builder, as tables: each captured AdmissionReview's pod, the decision,
and the pod after the patch is applied (with a real JSONPatch library) validated as a Pod
against the Kubernetes schemas of the oldest and newest supported versions, and against
the Pod Security levels (tests/k8s/pod_security.py)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import orjson
import pytest
import yaml

from proxy.delivery.http import HttpRepository
from proxy.delivery.jetstream import JetStreamRepository
from proxy.k8s.patch import (
    INIT,
    INJECTABLE_MODES,
    INJECTED_LABEL,
    SIDECAR,
    STATUS_ANNOTATION,
    TAKEOVER_LABEL,
    Decision,
    Selection,
    decide,
    image_repository,
    parse_bytes,
    read_annotations,
)
from proxy.settings import Settings, WebhookSettings
from tests.k8s.pod_security import highest_level, violations

ADMISSION = Path(__file__).parent / "admission"
K8S_VERSIONS = ("1.29.0", "1.37.0")
"""The supported range; the README states the same."""
REPOSITORY = "https://auditbox.example.org/fhir"
DEFAULTS = WebhookSettings(
    image="registry.example.org/fhir-audit-proxy:0.1.0", repository_url=REPOSITORY
)
NO_REPOSITORY = WebhookSettings(image="registry.example.org/fhir-audit-proxy:0.1.0")


def review(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ADMISSION / f"{name}.yaml").read_text())
    return loaded


def pod_of(name: str) -> dict[str, Any]:
    found: dict[str, Any] = review(name)["request"]["object"]
    return found


def applied(pod: dict[str, Any], decision: Decision) -> dict[str, Any]:
    assert decision.injected, decision.reason
    result: dict[str, Any] = jsonpatch.apply_patch(pod, decision.patch)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(result, version, strict=True)
    return result


def patched(
    name: str,
    selection: Selection = Selection.NAMESPACE,
    defaults: WebhookSettings = DEFAULTS,
    **options: bool,
) -> dict[str, Any]:
    request = review(name)["request"]
    decision = decide(request["object"], request["namespace"], defaults, selection, **options)
    return applied(request["object"], decision)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "(ref)") for e in container["env"]}


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [
        *pod["spec"].get("initContainers", []),
        *pod["spec"]["containers"],
    ]
    (found,) = (c for c in containers if c["name"] == SIDECAR)
    return found


def fhir_pod(
    ports: list[dict[str, Any]],
    annotations: dict[str, str] | None = None,
    image: str = "registry.example.org/team/fhir-server:2.1",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "fhir-0", "annotations": annotations or {}},
        "spec": {"containers": [{"name": "fhir", "image": image, "ports": ports}], **spec},
    }


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
    assert env["FHIR_AUDIT_REPOSITORY__URL"] == REPOSITORY
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "kube-api-access-x7h2k" in volumes
    assert pod["metadata"]["annotations"] == {STATUS_ANNOTATION: "injected"}
    assert [c["name"] for c in pod["spec"]["containers"]] == ["hapi"]


def test_the_injected_environment_is_read_by_the_proxy_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [k for k in os.environ if k.startswith(("FHIR_AUDIT_", "OTEL_"))]:
        monkeypatch.delenv(key)
    for name, check in (("multi-container", "oauth"), ("restricted-hapi", "probes")):
        sidecar = sidecar_of(patched(name))
        with monkeypatch.context() as env:
            for key, value in env_of(sidecar).items():
                if key.startswith("FHIR_AUDIT_") and key != "FHIR_AUDIT_CONFIG":  # a file
                    env.setenv(key, value.replace("(ref)", "fhir"))
            settings = Settings()
        assert settings.listen.port == DEFAULTS.proxy_port
        assert settings.listen.host == "::"
        assert settings.admin.host == "127.0.0.1"
        assert settings.status.port == DEFAULTS.status_port
        assert settings.store.max_bytes == DEFAULTS.store_max_bytes
        assert settings.telemetry.json_logs is True
        if check == "oauth":
            assert settings.repository.mode == "transaction"
            assert isinstance(settings.repository, HttpRepository)
            assert settings.repository.auth.type == "oauth2_client_credentials"
            assert settings.repository.auth.client_secret_file == Path(
                "/var/run/secrets/fhir-audit-proxy/oauth/client-secret"
            )
        else:
            probes = settings.status.app_probes
            assert set(probes) == {"hapi/startupz", "hapi/readyz", "hapi/livez"}
            assert (probes["hapi/readyz"].kind, probes["hapi/readyz"].path) == (
                "http",
                "/fhir/metadata",
            )
            assert probes["hapi/readyz"].headers == {"Accept": "application/fhir+json"}
            assert probes["hapi/readyz"].timeout_s == 5.0
            assert (probes["hapi/livez"].kind, probes["hapi/livez"].port) == ("tcp", 8080)


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
    assert first["ports"] == [
        {"name": "fhir-audit", "containerPort": 15080, "protocol": "TCP"},
        {"name": "audit-status", "containerPort": 15082, "protocol": "TCP"},
    ]


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
    assert (decision.patch, decision.reason, decision.allowed) == ([], reason, True)


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


def test_injecting_twice_is_a_no_op_and_survives_other_webhooks() -> None:
    once = patched("deployment-hapi")
    again = decide(once, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert (again.patch, again.reason) == ([], "already injected")
    # Even if the status annotation was stripped, the sidecar itself gives it away.
    stripped = copy.deepcopy(once)
    del stripped["metadata"]["annotations"][STATUS_ANNOTATION]
    assert decide(stripped, "fhir", DEFAULTS, Selection.NAMESPACE).reason == "already injected"
    # Another injector (Vault's agent, a policy engine) adds variables and mounts to every
    # container: still the injector's sidecar.
    touched = copy.deepcopy(once)
    for container in touched["spec"]["initContainers"]:
        container["env"].append({"name": "VAULT_ADDR", "value": "https://vault:8200"})
        container["volumeMounts"].append({"name": "vault-secrets", "mountPath": "/vault"})
    assert decide(touched, "fhir", DEFAULTS, Selection.REQUIRED).reason == "already injected"


# --- item 1: which pods get a FHIR proxy in front of which port -----------------------------


@pytest.mark.parametrize(
    ("pod", "injected", "why"),
    [
        (
            fhir_pod([{"name": "http", "containerPort": 8080}], image="hapiproject/hapi:v8"),
            True,
            "",
        ),
        (
            fhir_pod([{"containerPort": 8103}], image="docker.io/medplum/medplum-server:4.3"),
            True,
            "",
        ),
        (fhir_pod([{"name": "fhir", "containerPort": 9000}]), True, ""),
        (fhir_pod([{"name": "http-fhir", "containerPort": 9000}]), True, ""),
        (
            fhir_pod([{"containerPort": 9000}], {"fhir-audit-proxy/upstream-port": "9000"}),
            True,
            "",
        ),
        (fhir_pod([{"containerPort": 9000}], {"fhir-audit-proxy/inject": "true"}), True, ""),
        (
            fhir_pod([{"name": "tcp-postgresql", "containerPort": 5432}], image="postgres:17"),
            False,
            "port 5432 (first containerPort) is not known to serve FHIR over HTTP",
        ),
        (
            fhir_pod([{"name": "http", "containerPort": 8080}]),
            False,
            "port 8080 (first containerPort) is not known to serve FHIR over HTTP",
        ),
        # HAPI's image, but not on its FHIR port.
        (
            fhir_pod([{"containerPort": 9090}], image="hapiproject/hapi:v8"),
            False,
            "port 9090 (first containerPort) is not known",
        ),
        (
            fhir_pod(
                [{"name": "https", "containerPort": 8443}], {"fhir-audit-proxy/inject": "true"}
            ),
            False,
            "port 8443 serves HTTPS",
        ),
        (
            fhir_pod(
                [{"name": "web", "containerPort": 8080}],
                {"fhir-audit-proxy/inject": "true", "fhir-audit-proxy/upstream-scheme": "https"},
            ),
            False,
            "port 8080 serves HTTPS",
        ),
        (
            fhir_pod(
                [{"containerPort": 8443}],
                {"fhir-audit-proxy/inject": "true", "fhir-audit-proxy/upstream-scheme": "http"},
            ),
            True,
            "",
        ),
    ],
)
def test_a_labelled_namespace_injects_only_known_fhir_ports_or_a_yes(
    pod: dict[str, Any], injected: bool, why: str
) -> None:
    decision = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert decision.injected is injected
    assert decision.allowed is True
    if not injected:
        assert why in decision.reason
        assert decision.warnings == [f"fhir-audit-proxy not injected: {decision.reason}"]


def test_postgres_and_https_pods_of_the_captured_reviews_are_refused_with_a_warning() -> None:
    for name, expected in (("postgres", "5432"), ("https-hapi", "serves HTTPS")):
        request = review(name)["request"]
        decision = decide(request["object"], "fhir", DEFAULTS, Selection.NAMESPACE)
        assert not decision.injected and expected in decision.warnings[0]


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("hapiproject/hapi:v8.4.0-2", "hapiproject/hapi"),
        ("docker.io/hapiproject/hapi@sha256:" + "0" * 64, "hapiproject/hapi"),
        ("registry.example.org:5000/medplum/medplum-server:4", "medplum/medplum-server"),
        ("localhost/smilecdr/smilecdr", "smilecdr/smilecdr"),
        ("docker.io/library/postgres:17", "postgres"),
    ],
)
def test_image_repository(image: str, repository: str) -> None:
    assert image_repository(image) == repository


# --- item 2: Pod Security ----------------------------------------------------------------------


def test_the_restricted_app_pod_passes_restricted_before_injection() -> None:
    assert violations(pod_of("restricted-hapi"), "restricted") == []


@pytest.mark.parametrize(
    ("annotations", "pod_security", "level", "traffic"),
    [
        ({}, False, "privileged", "redirect"),
        ({"fhir-audit-proxy/traffic": "takeover"}, False, "restricted", "takeover"),
        (
            {"fhir-audit-proxy/traffic": "takeover", "fhir-audit-proxy/sidecar": "container"},
            False,
            "restricted",
            "takeover",
        ),
        # A namespace that enforces baseline or restricted: takeover, whatever the default.
        ({}, True, "restricted", "takeover"),
    ],
)
def test_each_mode_passes_its_pod_security_level(
    annotations: dict[str, str], pod_security: bool, level: str, traffic: str
) -> None:
    pod = pod_of("restricted-hapi")
    pod["metadata"]["annotations"] = annotations
    result = applied(
        pod, decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE, pod_security=pod_security)
    )
    assert highest_level(result) == level
    if level == "privileged":
        assert violations(result, "baseline") == [
            f"initContainers[{INIT}].securityContext.capabilities.add NET_ADMIN",
            f"initContainers[{INIT}].securityContext.capabilities.add NET_RAW",
        ]
    init = [c["name"] for c in result["spec"].get("initContainers", [])]
    assert (INIT in init) is (traffic == "redirect")
    labels = result["metadata"]["labels"]
    assert labels[INJECTED_LABEL] == "true"
    assert labels.get(TAKEOVER_LABEL) == ("8080" if traffic == "takeover" else None)


def test_redirect_asked_for_where_pod_security_is_enforced_is_refused() -> None:
    pod = pod_of("restricted-hapi")
    pod["metadata"]["annotations"] = {"fhir-audit-proxy/traffic": "redirect"}
    decision = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE, pod_security=True)
    assert not decision.injected
    assert "NET_ADMIN" in decision.reason


# --- item 3: probes ---------------------------------------------------------------------------


def test_the_apps_probes_move_to_the_status_port_with_their_timing() -> None:
    pod = patched("restricted-hapi")
    (hapi,) = pod["spec"]["containers"]
    assert hapi["readinessProbe"] == {
        "httpGet": {"path": "/app-health/hapi/readyz", "port": 15082, "scheme": "HTTP"},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
    }
    assert hapi["livenessProbe"] == {
        "httpGet": {"path": "/app-health/hapi/livez", "port": 15082, "scheme": "HTTP"},
        "periodSeconds": 20,
    }
    assert hapi["startupProbe"]["httpGet"]["path"] == "/app-health/hapi/startupz"
    assert hapi["startupProbe"]["failureThreshold"] == 60
    probes = orjson.loads(env_of(sidecar_of(pod))["FHIR_AUDIT_STATUS__APP_PROBES"])
    assert probes == {
        "hapi/startupz": {
            "kind": "http",
            "port": 8080,
            "path": "/fhir/metadata",
            "scheme": "HTTP",
            "headers": {},
            "timeout_s": 1.0,
        },
        "hapi/readyz": {
            "kind": "http",
            "port": 8080,
            "path": "/fhir/metadata",
            "scheme": "HTTP",
            "headers": {"Accept": "application/fhir+json"},
            "timeout_s": 5.0,
        },
        "hapi/livez": {"kind": "tcp", "port": 8080, "timeout_s": 1.0},
    }


def test_grpc_probes_are_moved_and_exec_or_other_host_probes_left_alone() -> None:
    pod = fhir_pod(
        [{"name": "fhir", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}]
    )
    (app,) = pod["spec"]["containers"]
    app["livenessProbe"] = {"grpc": {"port": 9090, "service": "fhir"}, "timeoutSeconds": 2}
    app["readinessProbe"] = {"exec": {"command": ["true"]}}
    app["startupProbe"] = {"httpGet": {"host": "10.0.0.1", "port": 8080}}
    sidecar_pod = dict(pod)
    sidecar_pod["spec"] = {
        **pod["spec"],
        "containers": [*pod["spec"]["containers"], {"name": "cache", "image": "redis:7"}],
    }
    result = applied(sidecar_pod, decide(sidecar_pod, "fhir", DEFAULTS, Selection.NAMESPACE))
    app = result["spec"]["containers"][0]
    assert app["livenessProbe"]["httpGet"]["path"] == "/app-health/fhir/livez"
    assert app["readinessProbe"] == {"exec": {"command": ["true"]}}
    assert app["startupProbe"] == {"httpGet": {"host": "10.0.0.1", "port": 8080}}
    probes = orjson.loads(env_of(sidecar_of(result))["FHIR_AUDIT_STATUS__APP_PROBES"])
    assert probes == {
        "fhir/livez": {"kind": "grpc", "port": 9090, "service": "fhir", "timeout_s": 2.0}
    }


def test_probes_are_rewritten_before_the_fallback_sidecar_shifts_the_containers() -> None:
    pod = pod_of("restricted-hapi")
    pod["metadata"]["annotations"] = {
        "fhir-audit-proxy/sidecar": "container",
        "fhir-audit-proxy/traffic": "takeover",
    }
    result = applied(pod, decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE))
    sidecar, hapi = result["spec"]["containers"]
    assert sidecar["name"] == SIDECAR and "readinessProbe" in sidecar
    assert sidecar["readinessProbe"]["exec"]["command"][3] == "readyz"
    assert hapi["readinessProbe"]["httpGet"]["path"] == "/app-health/hapi/readyz"


# --- item 4: events when the pod goes -----------------------------------------------------


def test_no_repository_is_refused_unless_the_pod_accepts_local_only_audit() -> None:
    request = review("deployment-hapi")["request"]
    refused = decide(request["object"], "fhir", NO_REPOSITORY, Selection.NAMESPACE)
    assert not refused.injected
    assert refused.reason.startswith("no audit repository")
    assert "fhir-audit-proxy/local-only" in refused.warnings[0]
    pod = copy.deepcopy(request["object"])
    pod["metadata"]["annotations"] = {"fhir-audit-proxy/local-only": "true"}
    accepted = decide(pod, "fhir", NO_REPOSITORY, Selection.NAMESPACE)
    result = applied(pod, accepted)
    assert "lost when the pod is deleted" in accepted.warnings[0]
    assert "FHIR_AUDIT_REPOSITORY__URL" not in env_of(sidecar_of(result))
    # The pod's own repository is a repository too.
    pod["metadata"]["annotations"] = {"fhir-audit-proxy/repository-url": REPOSITORY}
    assert decide(pod, "fhir", NO_REPOSITORY, Selection.NAMESPACE).injected


def test_the_store_volume_is_size_limited_and_the_grace_period_covers_the_drain() -> None:
    pod = patched("restricted-hapi")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    store = volumes["fhir-audit-proxy-store"]["emptyDir"]
    assert parse_bytes(store["sizeLimit"]) == DEFAULTS.store_max_bytes + 64 * 1024 * 1024
    env = env_of(sidecar_of(pod))
    assert int(env["FHIR_AUDIT_STORE__MAX_BYTES"]) == DEFAULTS.store_max_bytes
    assert env["FHIR_AUDIT_SHUTDOWN_GRACE_S"] == "10"
    # The pod's own 45 s, then the proxy's drain: 10 s of requests, 10 s of delivery.
    assert pod["spec"]["terminationGracePeriodSeconds"] == 45 + 10 + 10 + 5
    assert patched("deployment-hapi")["spec"]["terminationGracePeriodSeconds"] == 30 + 25

    smaller = pod_of("restricted-hapi")
    smaller["metadata"]["annotations"] = {"fhir-audit-proxy/store-max-bytes": "256Mi"}
    result = applied(smaller, decide(smaller, "fhir", DEFAULTS, Selection.NAMESPACE))
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    limit = parse_bytes(volumes["fhir-audit-proxy-store"]["emptyDir"]["sizeLimit"])
    assert limit == (256 + 64) * 1024 * 1024
    assert env_of(sidecar_of(result))["FHIR_AUDIT_STORE__MAX_BYTES"] == str(256 * 1024 * 1024)


def test_a_claim_shared_by_a_deployments_pods_is_refused_and_a_statefulset_volume_used() -> None:
    pod = pod_of("restricted-hapi")
    pod["metadata"]["annotations"] = {"fhir-audit-proxy/store-pvc": "hapi-audit"}
    refused = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert not refused.injected
    assert "store-pvc on a pod of a ReplicaSet" in refused.reason
    assert "one ReadWriteOnce claim" in refused.reason

    member = pod_of("restricted-hapi")
    member["metadata"] = {
        "name": "hapi-1",
        "labels": {"app": "hapi"},
        "annotations": {"fhir-audit-proxy/store-volume": "audit-store"},
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "hapi", "uid": "u"}
        ],
    }
    claim = {"claimName": "audit-store-hapi-1"}
    member["spec"]["volumes"].append({"name": "audit-store", "persistentVolumeClaim": claim})
    result = applied(member, decide(member, "fhir", DEFAULTS, Selection.NAMESPACE))
    mounts = {m["mountPath"]: m["name"] for m in sidecar_of(result)["volumeMounts"]}
    assert mounts["/var/lib/fhir-audit-proxy"] == "audit-store"
    assert "fhir-audit-proxy-store" not in {v["name"] for v in result["spec"]["volumes"]}


# --- item 5: ports -----------------------------------------------------------------------------


def test_an_istio_pod_keeps_envoys_ports() -> None:
    pod = pod_of("deployment-hapi")
    pod["spec"]["containers"].append(
        {
            "name": "istio-proxy",
            "image": "docker.io/istio/proxyv2:1.28.0",
            "ports": [
                {"name": "http-envoy-prom", "containerPort": 15090},
                {"name": "tcp-health", "containerPort": 15021},
            ],
        }
    )
    result = applied(pod, decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE))
    ports = {p["containerPort"] for c in result["spec"]["containers"] for p in c.get("ports", [])}
    ours = {p["containerPort"] for p in sidecar_of(result)["ports"]}
    assert ours.isdisjoint(ports)
    env = env_of(sidecar_of(result))
    assert {env["FHIR_AUDIT_LISTEN__PORT"], env["FHIR_AUDIT_ADMIN__PORT"]} == {"15080", "15081"}


@pytest.mark.parametrize(
    ("taken", "annotations", "problem"),
    [
        (
            15080,
            {},
            "port 15080 (container sidecar) is the sidecar's proxy port:"
            " set fhir-audit-proxy/proxy-port",
        ),
        (
            15081,
            {},
            "port 15081 (container sidecar) is the sidecar's admin port:"
            " set fhir-audit-proxy/admin-port",
        ),
        (
            15082,
            {},
            "port 15082 (container sidecar) is the sidecar's status port:"
            " set fhir-audit-proxy/status-port",
        ),
        (
            9999,
            {"fhir-audit-proxy/admin-port": "8080"},
            "port 8080 (the FHIR port) is the sidecar's admin port",
        ),
        (9999, {"fhir-audit-proxy/status-port": "15080"}, "the sidecar's ports must differ"),
    ],
)
def test_a_port_the_pod_declares_is_never_taken(
    taken: int, annotations: dict[str, str], problem: str
) -> None:
    pod = fhir_pod([{"name": "fhir", "containerPort": 8080}], annotations)
    pod["spec"]["containers"].append(
        {"name": "sidecar", "image": "x", "ports": [{"containerPort": taken}]}
    )
    decision = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert not decision.injected
    assert problem in decision.reason


def test_the_ports_are_set_per_pod() -> None:
    pod = fhir_pod(
        [{"name": "fhir", "containerPort": 8080}],
        {"fhir-audit-proxy/proxy-port": "16080", "fhir-audit-proxy/admin-port": "16081",
         "fhir-audit-proxy/status-port": "16082"},
    )  # fmt: skip
    pod["spec"]["containers"].append(
        {"name": "envoy", "image": "x", "ports": [{"containerPort": 15080}]}
    )
    result = applied(pod, decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE))
    init, sidecar = result["spec"]["initContainers"]
    assert init["command"][init["command"].index("--proxy-port") + 1] == "16080"
    env = env_of(sidecar)
    assert (env["FHIR_AUDIT_LISTEN__PORT"], env["FHIR_AUDIT_ADMIN__PORT"]) == ("16080", "16081")
    assert env["FHIR_AUDIT_STATUS__PORT"] == "16082"
    assert [p["containerPort"] for p in sidecar["ports"]] == [16080, 16082]
    assert sidecar["livenessProbe"]["exec"]["command"][-1] == "16081"


# --- items 8 and issue 25's 7: where audit is required ----------------------------------


def required(pod: dict[str, Any], defaults: WebhookSettings = DEFAULTS) -> Decision:
    return decide(pod, "fhir", defaults, Selection.REQUIRED)


def test_a_forged_status_annotation_gets_the_sidecar_anyway() -> None:
    for selection in (Selection.NAMESPACE, Selection.REQUIRED):
        pod = pod_of("forged-status")
        decision = decide(pod, "fhir", DEFAULTS, selection)
        result = applied(pod, decision)
        assert [c["name"] for c in result["spec"]["initContainers"]] == [INIT, SIDECAR]
        assert "carried it without the sidecar" in decision.warnings[0]


def test_a_decoy_container_named_like_the_sidecar_is_refused_and_denied_where_required() -> None:
    pod = pod_of("fake-sidecar")
    warned = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert (warned.injected, warned.allowed) == (False, True)
    assert warned.warnings == [
        "fhir-audit-proxy not injected: the pod has containers named fhir-audit-proxy that"
        " this injector did not make"
    ]
    denied = required(pod)
    assert denied.allowed is False
    assert denied.reason == (
        "fhir-audit-proxy: audit is required in namespace fhir: the pod has containers named"
        " fhir-audit-proxy that this injector did not make"
    )


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda pod: pod["spec"]["initContainers"].pop(0),
            "containers named fhir-audit-proxy that this injector did not make",
        ),
        (
            lambda pod: pod["spec"]["initContainers"][1]["env"].append(
                {"name": "FHIR_AUDIT_REPOSITORY__URL", "value": "http://evil.example/fhir"}
            ),
            "did not make",
        ),
        (
            lambda pod: pod["spec"]["initContainers"][0]["command"].__setitem__(4, "9999"),
            "did not make",
        ),
    ],
)
def test_a_sidecar_edited_after_injection_is_denied_where_required(edit: Any, reason: str) -> None:
    pod = patched("deployment-hapi", Selection.REQUIRED)
    edit(pod)
    decision = required(pod)
    assert decision.allowed is False
    assert reason in decision.reason


@pytest.mark.parametrize(
    ("annotations", "reason"),
    [
        ({"fhir-audit-proxy/inject": "false"}, "fhir-audit-proxy/inject is false"),
        (
            {"fhir-audit-proxy/upstream-prot": "8080"},
            "unknown annotation fhir-audit-proxy/upstream-prot",
        ),
        ({"fhir-audit-proxy/memory-limit": "lots"}, "not a resource quantity"),
        (
            {"fhir-audit-proxy/repository-url": "https://elsewhere.example/fhir"},
            "the pod may not set fhir-audit-proxy/repository-url here",
        ),
        ({"fhir-audit-proxy/config-map": "mine"}, "may not set fhir-audit-proxy/config-map"),
        ({"fhir-audit-proxy/store-pvc": "mine"}, "may not set fhir-audit-proxy/store-pvc"),
        ({"fhir-audit-proxy/local-only": "true"}, "may not set fhir-audit-proxy/local-only"),
        ({"fhir-audit-proxy/traffic": "takeover"}, "may not set fhir-audit-proxy/traffic"),
    ],
)
def test_where_audit_is_required_a_pod_cannot_opt_out_or_send_its_audit_elsewhere(
    annotations: dict[str, str], reason: str
) -> None:
    pod = pod_of("deployment-hapi")
    pod["metadata"]["annotations"] = annotations
    decision = required(pod)
    assert (decision.patch, decision.allowed) == ([], False)
    assert decision.reason.startswith("fhir-audit-proxy: audit is required in namespace fhir: ")
    assert reason in decision.reason


def test_where_audit_is_required_other_pods_are_denied_with_the_reason() -> None:
    for name, reason in (
        ("postgres", "not known to serve FHIR over HTTP"),
        ("https-hapi", "serves HTTPS"),
        ("host-network", "a hostNetwork pod cannot be audited"),
    ):
        decision = required(pod_of(name))
        assert decision.allowed is False and reason in decision.reason
    assert required(pod_of("deployment-hapi"), NO_REPOSITORY).allowed is False
    # The annotations the platform allows are honoured.
    pod = pod_of("deployment-hapi")
    pod["metadata"]["annotations"] = {"fhir-audit-proxy/base-path": "/baseR4"}
    result = applied(pod, required(pod))
    assert env_of(sidecar_of(result))["FHIR_AUDIT_UPSTREAM__URL"] == "http://127.0.0.1:8080/baseR4"


def test_no_container_of_the_pod_may_mount_the_sidecars_store() -> None:
    pod = pod_of("deployment-hapi")
    pod["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "fhir-audit-proxy-store", "mountPath": "/peek"}
    )
    decision = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert not decision.injected
    assert "container hapi mounts fhir-audit-proxy-store" in decision.reason
    assert required(pod).allowed is False


# --- item 9 (the Kubernetes side): who the sidecar is ---------------------------------------


def test_the_sidecar_knows_its_pod_from_the_downward_api() -> None:
    pod = patched("restricted-hapi")
    sidecar = sidecar_of(pod)
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in sidecar["env"]
        if "valueFrom" in e
    }
    assert fields == {
        "FHIR_AUDIT_AUDIT__OBSERVER__SITE": "metadata.namespace",
        "K8S_POD_NAME": "metadata.name",
        "K8S_POD_UID": "metadata.uid",
        "K8S_NAMESPACE_NAME": "metadata.namespace",
        "K8S_NODE_NAME": "spec.nodeName",
        "K8S_POD_IP": "status.podIP",
        "K8S_POD_IPS": "status.podIPs",
    }
    names = [e["name"] for e in sidecar["env"]]
    env = env_of(sidecar)
    assert env["OTEL_SERVICE_NAME"] == "hapi"  # app.kubernetes.io/name
    attributes = dict(a.split("=", 1) for a in env["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    assert attributes == {
        "k8s.pod.name": "$(K8S_POD_NAME)",
        "k8s.pod.uid": "$(K8S_POD_UID)",
        "k8s.namespace.name": "$(K8S_NAMESPACE_NAME)",
        "k8s.node.name": "$(K8S_NODE_NAME)",
        "k8s.container.name": SIDECAR,
        "service.instance.id": f"$(K8S_NAMESPACE_NAME).$(K8S_POD_NAME).{SIDECAR}",
    }
    # Kubernetes expands $(NAME) only from variables listed before.
    for name in ("K8S_POD_NAME", "K8S_POD_UID", "K8S_NAMESPACE_NAME", "K8S_NODE_NAME"):
        assert names.index(name) < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert {"name": "audit-status", "containerPort": 15082, "protocol": "TCP"} in sidecar["ports"]
    annotated = pod_of("deployment-hapi")
    annotated["metadata"]["annotations"] = {"fhir-audit-proxy/service-name": "hapi-eu"}
    result = applied(annotated, decide(annotated, "fhir", DEFAULTS, Selection.NAMESPACE))
    assert env_of(sidecar_of(result))["OTEL_SERVICE_NAME"] == "hapi-eu"


# --- annotations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "problem"),
    [
        (
            {"fhir-audit-proxy/inject": "yes"},
            "fhir-audit-proxy/inject='yes': expected one of false, true",
        ),
        ({"fhir-audit-proxy/upstream-port": "70000"}, "not a port number from 1 to 65535"),
        ({"fhir-audit-proxy/upstream-port": "Http"}, "not a port number or name"),
        ({"fhir-audit-proxy/proxy-port": "80"}, "not a port number from 1024 to 65535"),
        ({"fhir-audit-proxy/status-port": "status"}, "not a port number"),
        ({"fhir-audit-proxy/base-path": "fhir"}, "must start with /"),
        ({"fhir-audit-proxy/repository-url": "ftp://x"}, "not a URL of repository mode"),
        (
            {
                "fhir-audit-proxy/repository-url": "nats://n:4222",
                "fhir-audit-proxy/repository-mode": "bundle",
            },
            "not a URL of repository mode bundle",
        ),
        (
            {"fhir-audit-proxy/repository-mode": "file"},
            "expected one of " + ", ".join(sorted(INJECTABLE_MODES)),
        ),
        ({"fhir-audit-proxy/store-pvc": "Has_Caps"}, "not a Kubernetes object name"),
        ({"fhir-audit-proxy/store-max-bytes": "1.5Gi"}, "not a quantity of bytes"),
        ({"fhir-audit-proxy/cpu-request": "1 core"}, "not a resource quantity"),
        ({"fhir-audit-proxy/sidecar": "daemon"}, "expected one of container, native"),
        ({"fhir-audit-proxy/upstream-scheme": "h2c"}, "expected one of http, https"),
        ({"fhir-audit-proxy/local-only": "yes"}, "expected one of false, true"),
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
        (
            [{"name": "fhir", "containerPort": 15080}],
            None,
            "port 15080 (the FHIR port) is the sidecar's proxy port",
        ),
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
    pod = fhir_pod(ports, {"fhir-audit-proxy/upstream-port": annotation} if annotation else {})
    decision = decide(pod, "fhir", DEFAULTS, Selection.NAMESPACE)
    assert decision.patch == []
    assert len(decision.warnings) == 1
    assert decision.warnings[0].startswith(f"fhir-audit-proxy not injected: {expected}")


def test_a_broker_mode_gets_its_settings_and_its_secret_mounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = DEFAULTS.model_copy(
        update={
            "repository_url": "nats://nats-0.nats:4222",
            "repository_mode": "jetstream",
            "repository_settings": {
                "stream": "AUDIT",
                "creds_file": "/var/run/secrets/fhir-audit-proxy/repository/audit.creds",
                "tls.ca_file": "/var/run/secrets/fhir-audit-proxy/repository/ca.crt",
            },
            "repository_secret": "nats-audit",
        }
    )
    pod = patched("deployment-hapi", defaults=defaults)
    sidecar = sidecar_of(pod)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["fhir-audit-proxy-repository"]["secret"] == {"secretName": "nats-audit"}
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert mounts["/var/run/secrets/fhir-audit-proxy/repository"]["readOnly"] is True
    for key in [k for k in os.environ if k.startswith(("FHIR_AUDIT_", "OTEL_"))]:
        monkeypatch.delenv(key)
    for name, value in env_of(sidecar).items():
        if name.startswith("FHIR_AUDIT_"):
            monkeypatch.setenv(name, value.replace("(ref)", "fhir"))
    repository = Settings().repository
    assert isinstance(repository, JetStreamRepository)
    assert repository.stream == "AUDIT"
    assert repository.tls.ca_file == Path("/var/run/secrets/fhir-audit-proxy/repository/ca.crt")
