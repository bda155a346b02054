"""``fhir-audit-proxy inject -f``, run as a user runs it: manifests in, the injected
manifests out (validated for the supported versions), one line per pod on stderr; and the
webhook, meeting a pod made from the injected template, takes it as injected already."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from proxy.k8s.patch import INIT, SIDECAR, STATUS_ANNOTATION, Selection, decide
from proxy.settings import WebhookSettings

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ("1.29.0", "1.37.0")
ENV = {
    "FHIR_AUDIT_WEBHOOK_IMAGE": "registry.example.org/fhir-audit-proxy:0.1.0",
    "FHIR_AUDIT_WEBHOOK_REPOSITORY_URL": "https://auditbox.example.org/fhir",
}

HAPI = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "hapi", "namespace": "fhir"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "hapi"}},
        "template": {
            "metadata": {"labels": {"app": "hapi"}},
            "spec": {
                "containers": [
                    {
                        "name": "hapi",
                        "image": "hapiproject/hapi:v8.4.0-2",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/fhir/metadata", "port": "http"}},
                    }
                ]
            },
        },
    },
}
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "hapi", "namespace": "fhir"},
    "spec": {"selector": {"app": "hapi"}, "ports": [{"port": 80, "targetPort": "http"}]},
}
POSTGRES = {
    "apiVersion": "apps/v1",
    "kind": "StatefulSet",
    "metadata": {"name": "hapi-db", "namespace": "fhir"},
    "spec": {
        "serviceName": "hapi-db",
        "selector": {"matchLabels": {"app": "hapi-db"}},
        "template": {
            "metadata": {"labels": {"app": "hapi-db"}},
            "spec": {
                "containers": [
                    {
                        "name": "postgres",
                        "image": "postgres:17.2",
                        "ports": [{"containerPort": 5432}],
                    }
                ]
            },
        },
    },
}


def inject(
    tmp_path: Path, documents: list[Any], *args: str, stdin: bool = False
) -> subprocess.CompletedProcess[str]:
    text = yaml.safe_dump_all(documents, sort_keys=False)
    source = "-"
    if not stdin:
        (tmp_path / "manifests.yaml").write_text(text)
        source = str(tmp_path / "manifests.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")} | ENV
    return subprocess.run(
        [sys.executable, "-m", "proxy", "inject", "-f", source, *args],
        input=text if stdin else None,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def test_the_fhir_servers_template_is_injected_and_the_rest_passes_unchanged(
    tmp_path: Path,
) -> None:
    result = inject(tmp_path, [HAPI, SERVICE, POSTGRES])
    assert result.returncode == 0, result.stderr
    deployment, service, database = yaml.safe_load_all(result.stdout)
    assert service == SERVICE and database == POSTGRES
    template = deployment["spec"]["template"]
    assert [c["name"] for c in template["spec"]["initContainers"]] == [INIT, SIDECAR]
    assert template["metadata"]["annotations"] == {STATUS_ANNOTATION: "injected"}
    assert template["metadata"]["labels"]["app"] == "hapi"
    assert "namespace" not in template["metadata"]
    assert "ownerReferences" not in template["metadata"]
    probe = template["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/app-health/hapi/readyz"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)
    lines = result.stderr.splitlines()
    assert lines[0].startswith(
        "Deployment/hapi: ok: injected (native sidecar, redirect, FHIR port 8080"
    )
    assert lines[1].startswith(
        "StatefulSet/hapi-db: ok: fhir-audit-proxy not injected: port 5432 (first"
        " containerPort) is not known to serve FHIR over HTTP"
    )

    # The webhook, meeting a pod of this template, takes it as injected already.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "generateName": "hapi-5c-", "namespace": "fhir"},
        "spec": template["spec"],
    }
    settings = WebhookSettings(
        image=ENV["FHIR_AUDIT_WEBHOOK_IMAGE"],
        repository_url=ENV["FHIR_AUDIT_WEBHOOK_REPOSITORY_URL"],
    )
    for selection in (Selection.NAMESPACE, Selection.REQUIRED):
        decision = decide(pod, "fhir", settings, selection)
        assert (decision.patch, decision.reason, decision.allowed) == ([], "already injected", True)


def test_a_list_from_stdin_in_the_given_namespace_with_pod_security(tmp_path: Path) -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": [HAPI | {"metadata": {"name": "hapi"}}]}
    result = inject(tmp_path, [listing], "--pod-security", "-n", "clinic", stdin=True)
    assert result.returncode == 0, result.stderr
    (done,) = yaml.safe_load_all(result.stdout)
    template = done["items"][0]["spec"]["template"]
    # Takeover: no privileged init container where Pod Security is enforced.
    assert [c["name"] for c in template["spec"]["initContainers"]] == [SIDECAR]
    assert template["metadata"]["labels"]["fhir-audit-proxy/takeover-port"] == "8080"
    assert "takeover" in result.stderr


def test_a_pod_that_would_be_denied_prints_nothing_and_fails(tmp_path: Path) -> None:
    claimed = {
        **HAPI,
        "spec": {
            **HAPI["spec"],  # type: ignore[dict-item]
            "template": {
                "metadata": {
                    "labels": {"app": "hapi"},
                    "annotations": {"fhir-audit-proxy/store-pvc": "hapi-audit"},
                },
                "spec": HAPI["spec"]["template"]["spec"],  # type: ignore[index]
            },
        },
    }
    refused = inject(tmp_path, [claimed])
    assert refused.returncode == 0
    assert "store-pvc on a pod of a ReplicaSet" in refused.stderr
    denied = inject(tmp_path, [claimed], "--injection", "required")
    assert denied.returncode == 1
    assert denied.stdout == ""
    assert denied.stderr.startswith(
        "Deployment/hapi: denied: fhir-audit-proxy: audit is required in namespace fhir:"
        " the pod may not set fhir-audit-proxy/store-pvc here"
    )


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    name = "missing.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "inject", "-f", str(tmp_path / name)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"fhir-audit-proxy: error: {tmp_path / name}: No such file or directory\n"
    )
