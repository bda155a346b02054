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
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from proxy.settings import Settings, WebhookSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "fhir-audit-proxy"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSIONS = ("1.29.0", "1.37.0")
LEGACY_VERSION = "1.27.0"
"""Clusters before native sidecars: the chart with ``injector.sidecar.mode: container``."""
CUSTOM_RESOURCE_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")
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


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = (d for d in docs if d["kind"] == kind)
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
            assert doc["kind"] in {"Issuer", "Certificate", "ServiceMonitor"}
            continue
        for version in versions_for(values_file):
            kubernetes_validate.validate(doc, version, strict=True)
        validated[doc["kind"]] += 1
    assert validated["ServiceAccount"] == 1
    assert validated["Deployment"] + validated["StatefulSet"] == 1
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
    assert [h["clientConfig"]["service"]["path"] for h in hooks] == ["/mutate", "/mutate/opt-in"]


def test_webhook_selects_labelled_namespaces_and_never_system_ones() -> None:
    docs = render(values_of(CHART / "ci" / "injector-self-signed-values.yaml"))
    namespaced, opt_in = by_kind(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert namespaced["failurePolicy"] == "Fail"
    assert opt_in["failurePolicy"] == "Ignore"
    for hook in (namespaced, opt_in):
        never = next(
            e
            for e in hook["namespaceSelector"]["matchExpressions"]
            if e["key"] == "kubernetes.io/metadata.name"
        )
        assert never == {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "kube-public", NAMESPACE],
        }
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["sideEffects"] == "None"
    assert {"key": "fhir-audit-proxy/injection", "operator": "In", "values": ["enabled"]} in (
        namespaced["namespaceSelector"]["matchExpressions"]
    )
    assert opt_in["objectSelector"] == {"matchLabels": {"fhir-audit-proxy/inject": "true"}}


def test_cert_manager_injects_the_ca_and_the_certificate_names_the_service() -> None:
    docs = render(values_of(CHART / "ci" / "injector-cert-manager-values.yaml"))
    assert not any(d["kind"] == "Secret" for d in docs)
    hook = by_kind(docs, "MutatingWebhookConfiguration")
    assert hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/audit-fhir-audit-proxy-webhook"
    )
    assert "caBundle" not in hook["webhooks"][0]["clientConfig"]
    certificate = by_kind(docs, "Certificate")
    assert certificate["spec"]["secretName"] == "audit-fhir-audit-proxy-webhook-tls"
    assert f"audit-fhir-audit-proxy.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
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
    if values["standalone"].get("config"):
        config = yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
        Settings.model_validate(config)


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
