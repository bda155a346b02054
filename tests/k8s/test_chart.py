"""The Helm chart, rendered offline with helm-python-sdk (Helm's own Go library, no helm
binary) for every values file under ``helm/fhir-audit-proxy/ci/`` (the chart-testing
convention), each manifest validated with kubernetes-validate against the oldest and
newest supported Kubernetes versions. Custom resources (cert-manager, Prometheus
Operator) have no schema there and are counted apart."""

from __future__ import annotations

import base64
import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from proxy.delivery.jetstream import JetStreamConnection
from proxy.delivery.kafka import KafkaConnection
from proxy.k8s.patch import INJECTED_LABEL, STATUS_PORT_NAME, Selection, decide
from proxy.settings import Settings, WebhookSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "fhir-audit-proxy"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSIONS = ("1.29.0", "1.37.0")
LEGACY_VERSION = "1.27.0"
"""Clusters before native sidecars: the chart with ``injector.sidecar.mode: container``."""
CUSTOM_RESOURCE_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")
CUSTOM_KINDS = {"Issuer", "Certificate", "ServiceMonitor", "PodMonitor"}
NAMESPACE = "fhir-audit"


def values_of(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def versions_for(values_file: Path) -> tuple[str, ...]:
    sidecar = values_of(values_file).get("injector", {}).get("sidecar", {})
    legacy = sidecar.get("mode") == "container"
    return (LEGACY_VERSION, *K8S_VERSIONS) if legacy else K8S_VERSIONS


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name="audit", namespace=NAMESPACE, is_install=True)
    return [
        doc
        for template, text in sorted(rendered.items())
        if template.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = (d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"]))
    return found


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_every_manifest_is_valid_for_every_supported_version(values_file: Path) -> None:
    docs = render(values_of(values_file))
    validated = collections.Counter[str]()
    for doc in docs:
        if doc["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS):
            assert doc["kind"] in CUSTOM_KINDS
            continue
        for version in versions_for(values_file):
            kubernetes_validate.validate(doc, version, strict=True)
        validated[doc["kind"]] += 1
    assert validated["ServiceAccount"] == 1
    relay = bool(values_of(values_file).get("relay", {}).get("enabled"))
    assert validated["Deployment"] + validated["StatefulSet"] == 1 + relay
    for workload in (d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container)
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts


def test_the_set_of_values_files_covers_both_modes_and_every_certificate_source() -> None:
    combos = set()
    for path in CI_VALUES:
        values = values_of(path)
        injector = values.get("injector", {})
        combos.add(
            (
                values["mode"],
                injector.get("certificate", {}).get("source", "self-signed"),
                injector.get("sidecar", {}).get("mode", "native"),
            )
        )
    assert {
        ("injector", "self-signed", "native"),
        ("injector", "cert-manager", "native"),
        ("injector", "self-signed", "container"),
        ("standalone", "self-signed", "native"),
    } <= combos


def test_chart_lints_clean_for_each_values_file() -> None:
    for path in CI_VALUES:
        oldest = versions_for(path)[0]
        report = helm.lint(CHART, values_of(path), strict=True, kube_version=f"v{oldest}")
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_self_signed_certificate_serves_the_webhook_service_and_is_the_ca_bundle() -> None:
    docs = render(values_of(CHART / "ci" / "injector-self-signed-values.yaml"))
    secret = by_kind(docs, "Secret")
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    served = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    served.verify_directly_issued_by(ca)
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"audit-fhir-audit-proxy.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    hooks = by_kind(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert {h["clientConfig"]["caBundle"] for h in hooks} == {secret["data"]["ca.crt"]}
    assert len(hooks) == 6


def test_the_chart_made_ca_is_kept_and_signs_a_shorter_lived_serving_certificate() -> None:
    docs = render(values_of(CHART / "ci" / "injector-self-signed-values.yaml"))
    secret = by_kind(docs, "Secret")
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    served = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    # The CA's key stays in the Secret, so an upgrade signs a new serving certificate with
    # the same CA and the caBundle the API server trusts does not change.
    assert "ca.key" in secret["data"]
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    served_days = (served.not_valid_after_utc - served.not_valid_before_utc).days
    assert (ca_days, served_days) == (3650, 365)
    not_after = int(secret["metadata"]["annotations"]["fhir-audit-proxy/serving-not-after"])
    assert abs(not_after - served.not_valid_after_utc.timestamp()) < 120
    # The webhook's pods get the serving pair, never the CA's key.
    volumes = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (certs,) = (v for v in volumes if v["name"] == "certs")
    assert [i["key"] for i in certs["secret"]["items"]] == ["tls.crt", "tls.key"]


def test_webhook_selects_labelled_namespaces_and_never_system_ones() -> None:
    docs = render(values_of(CHART / "ci" / "injector-self-signed-values.yaml"))
    hooks = by_kind(docs, "MutatingWebhookConfiguration")["webhooks"]
    by_name = {h["name"].split(".")[0]: h for h in hooks}
    assert {name: h["clientConfig"]["service"]["path"] for name, h in by_name.items()} == {
        "namespace": "/mutate",
        "namespace-pod-security": "/mutate/pod-security",
        "required": "/mutate/required",
        "required-pod-security": "/mutate/required/pod-security",
        "pod": "/mutate/opt-in",
        "pod-pod-security": "/mutate/opt-in/pod-security",
    }
    assert {name: h["failurePolicy"] for name, h in by_name.items()} == {
        "namespace": "Fail",
        "namespace-pod-security": "Fail",
        "required": "Fail",
        "required-pod-security": "Fail",
        "pod": "Ignore",
        "pod-pod-security": "Ignore",
    }
    for name, hook in by_name.items():
        expressions = {e["key"]: e for e in hook["namespaceSelector"]["matchExpressions"]}
        assert expressions["kubernetes.io/metadata.name"] == {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "kube-public", NAMESPACE],
        }
        assert expressions["pod-security.kubernetes.io/enforce"] == {
            "key": "pod-security.kubernetes.io/enforce",
            "operator": "In" if name.endswith("pod-security") else "NotIn",
            "values": ["baseline", "restricted"],
        }
        injection = expressions["fhir-audit-proxy/injection"]
        selection = name.removesuffix("-pod-security")
        assert (injection["operator"], injection["values"]) == {
            "namespace": ("In", ["enabled"]),
            "required": ("In", ["required"]),
            "pod": ("NotIn", ["enabled", "required"]),
        }[selection]
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["sideEffects"] == "None"
        # Where audit is required every pod is sent: a pod's own inject=false is denied.
        assert (
            hook.get("objectSelector")
            == {
                "namespace": {
                    "matchExpressions": [
                        {"key": "fhir-audit-proxy/inject", "operator": "NotIn", "values": ["false"]}
                    ]
                },
                "required": None,
                "pod": {"matchLabels": {"fhir-audit-proxy/inject": "true"}},
            }[selection]
        )


def test_cert_manager_injects_a_stable_ca_and_the_certificate_names_the_service() -> None:
    docs = render(values_of(CHART / "ci" / "injector-cert-manager-values.yaml"))
    assert not any(d["kind"] == "Secret" for d in docs)
    hook = by_kind(docs, "MutatingWebhookConfiguration")
    assert hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/audit-fhir-audit-proxy-webhook"
    )
    assert "caBundle" not in hook["webhooks"][0]["clientConfig"]
    serving = by_kind(docs, "Certificate", "audit-fhir-audit-proxy-webhook")
    assert serving["spec"]["secretName"] == "audit-fhir-audit-proxy-webhook-tls"
    assert f"audit-fhir-audit-proxy.{NAMESPACE}.svc" in serving["spec"]["dnsNames"]
    # The chain: a self-signed Issuer makes the CA, a CA Issuer signs the serving
    # certificate. cainjector injects the serving Secret's ca.crt, which is then the CA:
    # renewing the serving certificate leaves the caBundle as it was (no TLS gap under
    # failurePolicy Fail). A self-signed Issuer signing the serving certificate directly
    # would change the caBundle at every renewal.
    assert serving["spec"]["issuerRef"] == {"name": "audit-fhir-audit-proxy-ca", "kind": "Issuer"}
    assert serving["spec"]["renewBefore"] == "1440h"
    ca_issuer = by_kind(docs, "Issuer", "audit-fhir-audit-proxy-ca")
    ca = by_kind(docs, "Certificate", "audit-fhir-audit-proxy-ca")
    assert ca_issuer["spec"] == {"ca": {"secretName": ca["spec"]["secretName"]}}
    assert ca["spec"]["isCA"] is True
    assert ca["spec"]["issuerRef"] == {
        "name": "audit-fhir-audit-proxy-selfsigned",
        "kind": "Issuer",
    }
    assert by_kind(docs, "Issuer", "audit-fhir-audit-proxy-selfsigned")["spec"] == {
        "selfSigned": {}
    }
    image = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.org/fhir-audit-proxy@sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "values_file",
    [p for p in CI_VALUES if p.name.startswith("injector")],
    ids=lambda p: p.name,
)
def test_webhook_environment_is_read_by_the_webhook_settings(
    values_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = values_of(values_file)
    webhook = by_kind(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = env_values(webhook)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = WebhookSettings()
    sidecar = values.get("injector", {}).get("sidecar", {})
    assert settings.sidecar == sidecar.get("mode", "native")
    assert settings.traffic == sidecar.get("traffic", "redirect")
    assert settings.image == env["FHIR_AUDIT_WEBHOOK_IMAGE"]
    assert settings.fail_closed is (values["injector"].get("failurePolicy", "Fail") == "Fail")
    assert settings.otlp_endpoint == (values.get("telemetry", {}).get("otlpEndpoint") or None)
    assert settings.required_pod_annotations == WebhookSettings().required_pod_annotations
    assert (settings.proxy_port, settings.admin_port, settings.status_port) == (15080, 15081, 15082)
    assert settings.store_max_bytes == 1024 * 1024 * 1024


@pytest.mark.parametrize(
    "values_file",
    [p for p in CI_VALUES if p.name.startswith("standalone")],
    ids=lambda p: p.name,
)
def test_standalone_environment_is_read_by_the_proxy_settings(
    values_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = values_of(values_file)
    docs = render(values)
    proxy = by_kind(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = env_values(proxy)
    env.pop("FHIR_AUDIT_CONFIG", None)  # a mounted file; its content is checked below
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    exposed = bool(values.get("admin", {}).get("tokenSecret", {}).get("name"))
    if exposed:
        monkeypatch.setenv("FHIR_AUDIT_ADMIN__TOKENS", '["from-the-secret"]')
    settings = Settings()
    assert settings.upstream.url == values["standalone"]["upstreamUrl"]
    assert settings.store.path == Path("/var/lib/fhir-audit-proxy/audit.db")
    # The admin API leaves loopback only together with bearer tokens.
    assert (settings.admin.host, bool(settings.admin.tokens)) == (
        ("0.0.0.0", True) if exposed else ("127.0.0.1", False)
    )
    repository = values["standalone"].get("repository", {})
    if repository.get("url"):
        assert settings.repository.mode == repository["mode"]
        for name, value in repository.get("settings", {}).items():
            section: Any = settings.repository
            *parents, leaf = name.split(".")
            for parent in parents:
                section = getattr(section, parent)
            assert str(getattr(section, leaf)) == str(value), name
    if values["standalone"].get("config"):
        config = yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
        Settings.model_validate(config)


@pytest.mark.parametrize(
    "values_file",
    [p for p in CI_VALUES if values_of(p).get("relay", {}).get("enabled")],
    ids=lambda p: p.name,
)
def test_the_relay_environment_is_read_by_the_relay_settings(
    values_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = values_of(values_file)
    relay = by_kind(render(values), "Deployment")
    assert relay["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "relay"
    container = relay["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["relay"]
    for name, value in env_values(container).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    wanted = values["relay"]
    source = settings.relay.source
    assert source.url == wanted["source"]["url"]
    kafka = wanted["source"]["url"].startswith("kafka://")
    assert isinstance(source, KafkaConnection if kafka else JetStreamConnection)
    if isinstance(source, KafkaConnection):
        assert source.topic == wanted["source"].get("topic", "audit")
    else:
        assert source.stream == wanted["source"].get("stream", "AUDIT")
    for name, value in wanted["source"].get("settings", {}).items():
        assert str(getattr(source, name)) == str(value), name
    assert settings.relay.consumer == wanted.get("consumer", "fhir-audit-relay")
    assert settings.repository.url == wanted["repository"]["url"]
    assert settings.repository.mode == wanted["repository"]["mode"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    if wanted["source"].get("secret"):
        assert "/var/run/secrets/fhir-audit-proxy/source" in mounts


def test_defaults_never_expose_the_admin_api() -> None:
    for values in (
        {"mode": "injector"},
        {"mode": "standalone", "standalone": {"upstreamUrl": "http://f/fhir"}},
    ):
        for doc in render(values):
            if doc["kind"] == "Service":
                assert [p["name"] for p in doc["spec"]["ports"]] in (["https"], ["http"])


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"mode": "sidecar"}, "mode"),
        ({"mode": "injector", "injector": {"failurePolicy": "Sometimes"}}, "failurePolicy"),
        ({"mode": "injector", "injector": {"sidecar": {"traffic": "magic"}}}, "traffic"),
        ({"mode": "injector", "unknownKey": 1}, "unknownKey"),
        ({"mode": "standalone"}, "upstreamUrl"),
        ({"mode": "injector", "image": {"digest": "latest"}}, "digest"),
        # Item 7: a webhook that fails closed with one replica blocks pod creation when down.
        ({"mode": "injector", "injector": {"replicas": 1}}, "/injector/replicas': minimum"),
        (
            {"mode": "injector", "injector": {"replicas": 1, "failurePolicy": "Ignore"}},
            "/injector/replicas': minimum",  # the required webhook fails closed too
        ),
        # Item 10: no root, no privileges, no nonsense quantities, no empty requests.
        (
            {"mode": "injector", "securityContext": {"privileged": True}},
            "/securityContext/privileged'",
        ),
        ({"mode": "injector", "securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser'"),
        (
            {"mode": "injector", "securityContext": {"allowPrivilegeEscalation": True}},
            "/securityContext/allowPrivilegeEscalation'",
        ),
        (
            {"mode": "injector", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}},
            "/capabilities/add'",
        ),
        (
            {"mode": "injector", "podSecurityContext": {"runAsUser": 0}},
            "/podSecurityContext/runAsUser'",
        ),
        (
            {"mode": "injector", "podSecurityContext": {"runAsNonRoot": False}},
            "/podSecurityContext/runAsNonRoot'",
        ),
        (
            {"mode": "injector", "resources": {"requests": {"cpu": "lots"}}},
            "/resources/requests/cpu'",
        ),
        ({"mode": "injector", "resources": {"requests": {"cpu": ""}}}, "/resources/requests/cpu'"),
        (
            {"mode": "injector", "resources": {"limits": {"memory": "a lot"}}},
            "/resources/limits/memory'",
        ),
        (
            {"mode": "injector", "injector": {"sidecar": {"resources": {"cpuRequest": ""}}}},
            "/resources/cpuRequest'",
        ),
        (
            {"mode": "injector", "injector": {"sidecar": {"resources": {"memoryRequest": ""}}}},
            "/resources/memoryRequest'",
        ),
        ({"mode": "injector", "injector": {"sidecar": {"ports": {"proxy": 80}}}}, "/ports/proxy'"),
        (
            {"mode": "injector", "injector": {"takeoverNetworkPolicies": [{"namespace": "fhir"}]}},
            "missing property 'fhirPort'",
        ),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=complaint):
        chart.validate_schema(values)


def test_service_monitor_without_admin_tokens_is_refused() -> None:
    values = {
        "mode": "standalone",
        "standalone": {"upstreamUrl": "http://f/fhir"},
        "serviceMonitor": {"enabled": True},
    }
    with pytest.raises(helm.HelmRenderError, match=r"admin\.tokenSecret\.name"):
        render(values)


def test_one_replica_is_allowed_only_when_nothing_fails_closed() -> None:
    values = {
        "mode": "injector",
        "injector": {"replicas": 1, "failurePolicy": "Ignore", "required": {"enabled": False}},
    }
    assert by_kind(render(values), "Deployment")["spec"]["replicas"] == 1


def test_the_webhook_stays_available_spread_prioritised_and_stopping_gently() -> None:
    values = {"mode": "injector", "injector": {"priorityClassName": "system-cluster-critical"}}
    docs = render(values)
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["priorityClassName"] == "system-cluster-critical"
    selector = deployment["spec"]["selector"]["matchLabels"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"] == {"matchLabels": selector} for c in spread.values())
    (webhook,) = pod["containers"]
    pause = webhook["lifecycle"]["preStop"]["exec"]["command"]
    assert pause == ["python", "-c", "import time; time.sleep(5)"]
    assert pod["terminationGracePeriodSeconds"] > 5
    budget = by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == selector
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)


def test_pod_monitors_scrape_every_sidecar_and_the_webhook() -> None:
    docs = render(values_of(CHART / "ci" / "injector-cert-manager-values.yaml"))
    sidecars = by_kind(docs, "PodMonitor", "audit-fhir-audit-proxy-sidecars")
    assert sidecars["spec"]["namespaceSelector"] == {"any": True}
    assert sidecars["spec"]["selector"] == {"matchLabels": {INJECTED_LABEL: "true"}}
    (endpoint,) = sidecars["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (STATUS_PORT_NAME, "/metrics")
    webhook = by_kind(docs, "PodMonitor", "audit-fhir-audit-proxy-webhook")
    (endpoint,) = webhook["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["scheme"], endpoint["path"]) == (
        "https",
        "https",
        "/metrics",
    )
    assert endpoint["tlsConfig"]["ca"]["secret"] == {
        "name": "audit-fhir-audit-proxy-webhook-tls",
        "key": "ca.crt",
    }
    assert endpoint["tlsConfig"]["serverName"] == f"audit-fhir-audit-proxy.{NAMESPACE}.svc"


def admits(policy: dict[str, Any], port: int, protocol: str = "TCP") -> bool:
    """Whether a NetworkPolicy's ingress rules admit ``port`` (from anywhere: the rules
    here have no ``from``)."""
    for rule in policy["spec"]["ingress"]:
        assert "from" not in rule
        for allowed in rule["ports"]:
            if allowed["protocol"] == protocol and allowed["port"] <= port <= allowed["endPort"]:
                return True
    return False


def test_the_takeover_network_policy_closes_the_fhir_port_of_injected_pods_only() -> None:
    docs = render(values_of(CHART / "ci" / "injector-legacy-takeover-values.yaml"))
    policy = by_kind(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "fhir"
    review = yaml.safe_load((ROOT / "tests/k8s/admission/fallback-takeover.yaml").read_text())
    request = review["request"]
    settings = WebhookSettings(traffic="takeover", repository_url="https://a.example/fhir")
    decision = decide(request["object"], request["namespace"], settings, Selection.ANNOTATION)
    pod = jsonpatch.apply_patch(request["object"], decision.patch)
    labels = pod["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert policy["metadata"]["namespace"] == pod["metadata"]["namespace"]
    assert admits(policy, 4080) is False
    sidecar = pod["spec"]["containers"][0]
    for port in [p["containerPort"] for p in sidecar["ports"]] + [1, 4079, 4081, 65535]:
        assert admits(policy, port), port
    assert admits(policy, 4080, "UDP")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)


def notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="audit", namespace=NAMESPACE, is_install=True)
    return rendered["fhir-audit-proxy/templates/NOTES.txt"]


def test_notes_warn_about_a_missing_repository_and_pod_security_and_show_the_recipes() -> None:
    text = notes({"mode": "injector"})
    assert "WARNING: no audit repository is set" in text
    assert "LOST when the pod is deleted" in text
    assert 'only the "privileged" level admits' in text
    assert "kubectl -n <ns> port-forward pod/<pod> 9000:15081" in text
    assert "fhir-audit-proxy inject -f pod.yaml" in text
    configured = notes(values_of(CHART / "ci" / "injector-self-signed-values.yaml"))
    assert "WARNING" not in configured
    takeover = notes(values_of(CHART / "ci" / "injector-legacy-takeover-values.yaml"))
    assert "privileged" not in takeover
    standalone = notes({"mode": "standalone", "standalone": {"upstreamUrl": "http://f/fhir"}})
    assert "WARNING: no audit repository is set" in standalone
