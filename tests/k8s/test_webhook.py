"""The admission webhook as the API server meets it: ``fhir-audit-proxy webhook`` started
from the CLI as a real HTTPS server with a certificate made here, real AdmissionReview
requests over TLS (on each path the chart's selectors use), the returned JSONPatch
applied with a real JSONPatch library and the result validated as a Pod (and against the
Pod Security levels); bypass attempts and pods that are no FHIR server; the certificate
replaced on disk and picked up; ``/metrics``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import orjson
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.k8s.patch import INIT, SIDECAR, Selection
from proxy.k8s.webhook import review_response
from proxy.settings import WebhookSettings
from tests.factories import write_certificate
from tests.k8s.pod_security import highest_level

ADMISSION = Path(__file__).parent / "admission"
K8S_VERSIONS = ("1.29.0", "1.37.0")


@dataclass
class Webhook:
    url: str
    certs: Path
    log: Path
    """Where the webhook's stderr (its log) goes."""
    process: subprocess.Popen[bytes]

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs / "cert.pem"))


@contextlib.contextmanager
def launch(directory: Path) -> Iterator[Webhook]:
    """``fhir-audit-proxy webhook`` on an ephemeral port with a new certificate."""
    write_certificate(directory, "webhook-1")
    env = {
        **os.environ,
        "FHIR_AUDIT_WEBHOOK_IMAGE": "registry.example.org/fhir-audit-proxy:0.1.0",
        "FHIR_AUDIT_WEBHOOK_REPOSITORY_URL": "https://auditbox.example.org/fhir",
        "FHIR_AUDIT_WEBHOOK_CERT_RELOAD_S": "0.1",
    }
    log = directory / "webhook.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "webhook", "--cert", str(directory / "cert.pem"),
             "--key", str(directory / "key.pem"), "--host", "127.0.0.1", "--port", "0"],
            env=env,
            stderr=sink,
        )  # fmt: skip
    try:
        for _ in range(300):
            started = re.search(r"admission webhook on (https://\S+)", log.read_text())
            if started or process.poll() is not None:
                break
            time.sleep(0.05)
        if not started:
            pytest.fail(f"webhook did not start: {log.read_text()}")
        yield Webhook(url=started.group(1), certs=directory, log=log, process=process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    """One webhook for the module: the API server sends it many reviews too."""
    with launch(tmp_path_factory.mktemp("webhook")) as hook:
        yield hook


def webhook_log(hook: Webhook, expected: str) -> str:
    """The webhook's log once ``expected`` appears in it (log lines are flushed as
    written, but by another process)."""
    for _ in range(100):
        text = hook.log.read_text()
        if expected in text:
            break
        time.sleep(0.02)
    return text


def review(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ADMISSION / f"{name}.yaml").read_text())
    return loaded


async def admit(hook: Webhook, body: dict[str, Any], path: str = "/mutate") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            hook.url + path, data=orjson.dumps(body), ssl=hook.client_context()
        ) as response,
    ):
        assert response.status == 200
        answer: dict[str, Any] = orjson.loads(await response.read())
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    inner: dict[str, Any] = answer["response"]
    assert inner["uid"] == body["request"]["uid"]
    return inner


def apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    operations = orjson.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(pod, operations)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(result, version, strict=True)
    return result


@pytest.mark.parametrize(
    ("name", "path", "init", "containers"),
    [
        ("deployment-hapi", "/mutate", ["fhir-audit-proxy-init", "fhir-audit-proxy"], ["hapi"]),
        (
            "init-containers",
            "/mutate",
            ["fhir-audit-proxy-init", "fhir-audit-proxy", "migrate"],
            ["smile"],
        ),
        (
            "multi-container",
            "/mutate",
            ["fhir-audit-proxy-init", "fhir-audit-proxy"],
            ["log-shipper", "aidbox"],
        ),
        ("fallback-takeover", "/mutate/opt-in", [], ["fhir-audit-proxy", "firely"]),
    ],
)
async def test_injected_pod_is_a_valid_pod_with_the_sidecar_in_order(
    webhook: Webhook, name: str, path: str, init: list[str], containers: list[str]
) -> None:
    body = review(name)
    response = await admit(webhook, body, path)
    pod = apply(body["request"]["object"], response)
    assert [c["name"] for c in pod["spec"].get("initContainers", [])] == init
    assert [c["name"] for c in pod["spec"]["containers"]] == containers
    assert "warnings" not in response
    # The API server calls the webhook again after other webhooks mutated the pod.
    body["request"]["object"] = pod
    again = await admit(webhook, body, path)
    assert again == {"uid": body["request"]["uid"], "allowed": True}


@pytest.mark.parametrize(
    ("name", "path", "warned"),
    [
        ("host-network", "/mutate", False),
        ("kube-system", "/mutate", False),
        ("opted-out", "/mutate", False),
        ("deployment-hapi", "/mutate/opt-in", False),
        ("bad-annotations", "/mutate", True),
    ],
)
async def test_admitted_without_a_patch(
    webhook: Webhook, name: str, path: str, warned: bool
) -> None:
    body = review(name)
    response = await admit(webhook, body, path)
    assert response["allowed"] is True
    assert "patch" not in response
    assert ("warnings" in response) is warned
    if warned:
        assert response["warnings"] == [
            "fhir-audit-proxy not injected: unknown annotation fhir-audit-proxy/upstream-prot",
            "fhir-audit-proxy not injected: fhir-audit-proxy/memory-limit='lots': "
            "not a resource quantity",
        ]
        expected = "pod fhir/hapi-typo not injected: "
        assert expected in webhook_log(webhook, expected)


async def test_generated_name_is_logged_with_its_namespace(webhook: Webhook) -> None:
    body = review("deployment-hapi")
    body["request"]["object"]["metadata"]["generateName"] = "hapi-logged-"
    await admit(webhook, body)
    expected = "pod fhir/hapi-logged-*: injected (native sidecar, redirect"
    assert expected in webhook_log(webhook, expected)


async def test_a_malformed_review_is_a_400_and_the_webhook_lives_on(webhook: Webhook) -> None:
    async with aiohttp.ClientSession() as session:
        for junk in (b"{not json", b"[]", b'{"request": 3}'):
            async with session.post(
                webhook.url + "/mutate", data=junk, ssl=webhook.client_context()
            ) as rejected:
                assert rejected.status == 400
    response = await admit(webhook, review("deployment-hapi"))
    assert response["allowed"] is True and "patch" in response


async def test_a_pod_the_builder_chokes_on_is_denied_and_logged(webhook: Webhook) -> None:
    body = review("deployment-hapi")
    body["request"]["object"]["metadata"]["generateName"] = "hapi-choke-"
    body["request"]["object"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080x"
    response = await admit(webhook, body)
    assert response["allowed"] is False
    assert response["status"]["message"] == "fhir-audit-proxy injection failed: ValueError"
    expected = "injection failed for pod fhir/hapi-choke-*"
    assert expected in webhook_log(webhook, expected)


@pytest.fixture
def own_webhook(tmp_path: Path) -> Iterator[Webhook]:
    """A webhook of its own, for a test that replaces its certificate."""
    with launch(tmp_path) as hook:
        yield hook


async def test_the_certificate_is_reloaded_when_the_files_change(own_webhook: Webhook) -> None:
    webhook = own_webhook

    def served_common_name() -> str:
        host, port = webhook.url.removeprefix("https://").split(":")
        pem = ssl.get_server_certificate((host, int(port)))
        cert = x509.load_pem_x509_certificate(pem.encode())
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    assert served_common_name() == "webhook-1"
    write_certificate(webhook.certs, "webhook-2")
    for _ in range(200):
        if served_common_name() == "webhook-2":
            break
        await asyncio.sleep(0.05)
    assert served_common_name() == "webhook-2"
    # A client that trusts only the new certificate is served.
    response = await admit(webhook, review("deployment-hapi"))
    assert response["allowed"] is True


@pytest.mark.parametrize(
    ("change", "fail_closed", "expected"),
    [
        ({"operation": "UPDATE"}, True, {"allowed": True}),
        (
            {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
            True,
            {"allowed": True},
        ),
        (
            {
                "object": {
                    "spec": {"containers": [{"name": "x", "ports": [{"containerPort": "x"}]}]}
                }
            },
            False,
            {"allowed": True, "warnings": ["fhir-audit-proxy not injected: ValueError"]},
        ),
    ],
)
def test_answers_without_a_patch(
    change: dict[str, Any], fail_closed: bool, expected: dict[str, Any]
) -> None:
    body = review("deployment-hapi")
    body["request"].update(change)
    settings = WebhookSettings(fail_closed=fail_closed)
    answer = review_response(body, settings, Selection.NAMESPACE)
    assert answer["response"] == {"uid": body["request"]["uid"], **expected}


# --- what a labelled namespace no longer does, and what a required one refuses -------------


@pytest.mark.parametrize(
    ("name", "warning"),
    [
        ("postgres", "port 5432 (first containerPort) is not known to serve FHIR over HTTP"),
        ("https-hapi", "port 8443 serves HTTPS, and the proxy reaches the FHIR server over HTTP"),
    ],
)
async def test_a_pod_that_is_no_http_fhir_server_is_admitted_unchanged_with_a_warning(
    webhook: Webhook, name: str, warning: str
) -> None:
    response = await admit(webhook, review(name))
    assert response["allowed"] is True and "patch" not in response
    (said,) = response["warnings"]
    assert said.startswith(f"fhir-audit-proxy not injected: {warning}")


async def test_a_forged_status_annotation_is_injected_over_tls(webhook: Webhook) -> None:
    for path in ("/mutate", "/mutate/required"):
        body = review("forged-status")
        response = await admit(webhook, body, path)
        pod = apply(body["request"]["object"], response)
        assert [c["name"] for c in pod["spec"]["initContainers"]] == [INIT, SIDECAR]


@pytest.mark.parametrize(
    ("name", "annotations", "message"),
    [
        ("fake-sidecar", None, "the pod has containers named fhir-audit-proxy that this"),
        ("deployment-hapi", {"fhir-audit-proxy/inject": "false"}, "inject is false"),
        ("bad-annotations", None, "unknown annotation fhir-audit-proxy/upstream-prot"),
        (
            "deployment-hapi",
            {"fhir-audit-proxy/repository-url": "https://elsewhere.example/fhir"},
            "the pod may not set fhir-audit-proxy/repository-url here",
        ),
        ("postgres", None, "not known to serve FHIR over HTTP"),
    ],
)
async def test_where_audit_is_required_bypasses_are_denied_with_the_reason(
    webhook: Webhook, name: str, annotations: dict[str, str] | None, message: str
) -> None:
    body = review(name)
    if annotations is not None:
        body["request"]["object"]["metadata"]["annotations"] = annotations
    response = await admit(webhook, body, "/mutate/required")
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert response["status"]["message"].startswith(
        "fhir-audit-proxy: audit is required in namespace fhir: "
    )
    assert message in response["status"]["message"]
    assert "patch" not in response
    expected = "denied: fhir-audit-proxy: audit is required"
    assert expected in webhook_log(webhook, expected)


async def test_where_audit_is_required_an_injected_pod_called_again_is_admitted(
    webhook: Webhook,
) -> None:
    body = review("deployment-hapi")
    pod = apply(body["request"]["object"], await admit(webhook, body, "/mutate/required"))
    body["request"]["object"] = pod
    again = await admit(webhook, body, "/mutate/required")
    assert again == {"uid": body["request"]["uid"], "allowed": True}


@pytest.mark.parametrize("path", ["/mutate/pod-security", "/mutate/required/pod-security"])
async def test_where_pod_security_is_enforced_the_pod_is_injected_to_pass_restricted(
    webhook: Webhook, path: str
) -> None:
    body = review("restricted-hapi")
    assert highest_level(body["request"]["object"]) == "restricted"
    pod = apply(body["request"]["object"], await admit(webhook, body, path))
    assert highest_level(pod) == "restricted"
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [SIDECAR]
    assert pod["metadata"]["labels"]["fhir-audit-proxy/takeover-port"] == "8080"
    # The same pod on the default path gets the redirect, which only "privileged" admits.
    plain = apply(body["request"]["object"], await admit(webhook, review("restricted-hapi")))
    assert highest_level(plain) == "privileged"


async def test_the_webhook_serves_its_metrics(webhook: Webhook) -> None:
    async def scrape() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(webhook.url + "/metrics", ssl=webhook.client_context()) as response,
        ):
            assert response.status == 200
            return await response.text()

    def count(text: str, labels: str) -> float:
        prefix = f"fhir_audit_webhook_reviews_total{{{labels}}} "
        found = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(found[0].removeprefix(prefix)) if found else 0.0

    before = await scrape()
    await admit(webhook, review("deployment-hapi"))
    await admit(webhook, review("postgres"))
    await admit(webhook, review("fake-sidecar"), "/mutate/required")
    after = await scrape()
    for labels in (
        'path="/mutate",result="injected"',
        'path="/mutate",result="refused"',
        'path="/mutate/required",result="denied"',
    ):
        assert count(after, labels) == count(before, labels) + 1
    pem = (webhook.certs / "cert.pem").read_bytes()
    expires = x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    gauge = "fhir_audit_webhook_certificate_expiry_timestamp_seconds "
    (line,) = [line for line in after.splitlines() if line.startswith(gauge)]
    assert float(line.removeprefix(gauge)) == expires
    assert "fhir_audit_webhook_review_seconds_count" in after
