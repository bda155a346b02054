"""The pod patch that injects the proxy: a pure function from a Pod and the injector's
defaults to a decision (a JSONPatch, or a reason not to inject, plus warnings).

Selection follows Istio's sidecar injector: the namespace label is matched by the
MutatingWebhookConfiguration's ``namespaceSelector`` (an ``AdmissionReview`` carries no
namespace labels), so every pod that reaches :func:`decide` is a candidate unless its
annotation ``fhir-audit-proxy/inject: "false"`` says otherwise. Pods reached through the
opt-in path (:attr:`Selection.ANNOTATION`) are injected only with ``inject: "true"``
(annotation or label); ``"false"`` in either place always wins.
``kube-system``, ``kube-public`` and ``hostNetwork`` pods are never injected, nor is a pod
that already carries the sidecar (the API server may call the webhook again).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.settings import WebhookSettings

PREFIX = "fhir-audit-proxy/"
SIDECAR = "fhir-audit-proxy"
"""Name of the injected proxy container."""
INIT = "fhir-audit-proxy-init"
"""Name of the init container that installs the traffic redirect."""
STATUS_ANNOTATION = PREFIX + "status"
"""Set on an injected pod; its presence makes a second injection a no-op."""
PROXY_PORT_NAME = "fhir-audit"
"""The sidecar's named port: a Service's ``targetPort`` for port takeover."""
STORE_VOLUME = "fhir-audit-proxy-store"
TMP_VOLUME = "fhir-audit-proxy-tmp"
CONFIG_VOLUME = "fhir-audit-proxy-config"
OAUTH_VOLUME = "fhir-audit-proxy-oauth"
STORE_DIR = "/var/lib/fhir-audit-proxy"
CONFIG_DIR = "/etc/fhir-audit-proxy"
OAUTH_DIR = "/var/run/secrets/fhir-audit-proxy/oauth"
NEVER_NAMESPACES = frozenset({"kube-system", "kube-public"})

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
"""An IANA service name, as a containerPort's name must be."""


class Selection(enum.Enum):
    """How the pod reached the webhook (one path of the webhook per selector)."""

    NAMESPACE = "namespace"
    """Its namespace carries ``fhir-audit-proxy/injection: enabled``: inject unless opted out."""
    ANNOTATION = "annotation"
    """Any other namespace: inject only with ``fhir-audit-proxy/inject: "true"`` as an
    annotation or a label (the chart selects these pods by the label, since the API
    server can select by labels only)."""


KNOWN_ANNOTATIONS: Mapping[str, str] = {
    "inject": '"true" or "false"; "false" always wins',
    "status": "set by the injector",
    "container": "name of the FHIR server container (default: the first container)",
    "upstream-port": "the FHIR server's port, number or name (default: its first containerPort)",
    "base-path": "the FHIR base path (default /fhir)",
    "fhir-version": "R4 or R5",
    "repository-url": "the audit repository's FHIR base URL",
    "repository-mode": "bundle, single or transaction",
    "config-map": "a ConfigMap whose key config.yaml is the proxy's configuration",
    "store-pvc": "a PersistentVolumeClaim for the store (default: an emptyDir)",
    "oauth-secret": "a Secret whose key client-secret is the OAuth2 client secret",
    "oauth-token-url": "the IdP's token endpoint",
    "oauth-client-id": "the OAuth2 client id",
    "oauth-scope": "the OAuth2 scope",
    "sidecar": "native (init container, restartPolicy Always) or container (before 1.29)",
    "traffic": "redirect (iptables, needs NET_ADMIN) or takeover (Service targetPort)",
    "cpu-request": "a quantity",
    "cpu-limit": "a quantity",
    "memory-request": "a quantity",
    "memory-limit": "a quantity",
}
_CHOICES: Mapping[str, frozenset[str]] = {
    "inject": frozenset({"true", "false"}),
    "fhir-version": frozenset({"R4", "R5"}),
    "repository-mode": frozenset({"bundle", "single", "transaction"}),
    "sidecar": frozenset({"native", "container"}),
    "traffic": frozenset({"redirect", "takeover"}),
}
_NAMES = ("config-map", "store-pvc", "oauth-secret", "container")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the webhook answers for one pod."""

    patch: list[dict[str, Any]]
    """RFC 6902 operations; empty when nothing is injected."""
    reason: str
    """Why the pod was or was not injected (logged, and sent back as a warning when odd)."""
    warnings: list[str] = field(default_factory=list)
    """Sent back in ``AdmissionReview.response.warnings`` (kubectl prints them)."""

    @property
    def injected(self) -> bool:
        return bool(self.patch)


def _skip(reason: str, warnings: list[str] | None = None) -> Decision:
    return Decision(patch=[], reason=reason, warnings=warnings or [])


def read_annotations(annotations: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The pod's ``fhir-audit-proxy/*`` annotations without their prefix, and one
    problem per unknown or malformed annotation (empty when all are good)."""
    ours = {k[len(PREFIX) :]: v for k, v in annotations.items() if k.startswith(PREFIX)}
    problems: list[str] = []
    for key, value in ours.items():
        if key not in KNOWN_ANNOTATIONS:
            problems.append(f"unknown annotation {PREFIX}{key}")
        elif key in _CHOICES and value not in _CHOICES[key]:
            allowed = ", ".join(sorted(_CHOICES[key]))
            problems.append(f"{PREFIX}{key}={value!r}: expected one of {allowed}")
        elif key.endswith(("-request", "-limit")) and not _QUANTITY.match(value):
            problems.append(f"{PREFIX}{key}={value!r}: not a resource quantity")
        elif key in _NAMES and not _DNS_NAME.match(value):
            problems.append(f"{PREFIX}{key}={value!r}: not a Kubernetes object name")
        elif key == "upstream-port" and not (
            0 < int(value) < 65536 if value.isdigit() else _PORT_NAME.match(value)
        ):
            problems.append(f"{PREFIX}{key}={value!r}: not a port number or name")
        elif key == "base-path" and not value.startswith("/"):
            problems.append(f"{PREFIX}{key}={value!r}: must start with /")
        elif key in ("repository-url", "oauth-token-url") and not value.startswith(
            ("http://", "https://")
        ):
            problems.append(f"{PREFIX}{key}={value!r}: not an http(s) URL")
    return ours, problems


def _upstream_port(
    spec: Mapping[str, Any], container_name: str | None, port: str | None
) -> tuple[int | None, str]:
    """The FHIR server's port number, or None and why not."""
    containers: list[dict[str, Any]] = list(spec.get("containers") or [])
    if container_name is not None:
        chosen = [c for c in containers if c.get("name") == container_name]
        if not chosen:
            return None, f"no container named {container_name!r}"
        containers = chosen + [c for c in containers if c.get("name") != container_name]
    declared = [
        p for c in containers for p in c.get("ports") or [] if p.get("protocol", "TCP") == "TCP"
    ]
    if port is None:
        if not declared:
            return None, "no containerPort declared; set fhir-audit-proxy/upstream-port"
        return int(declared[0]["containerPort"]), "first declared containerPort"
    if port.isdigit():
        return int(port), "annotation"
    for p in declared:
        if p.get("name") == port:
            return int(p["containerPort"]), f"named port {port}"
    return None, f"no containerPort named {port!r}"


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _resources(ann: Mapping[str, str], defaults: WebhookSettings) -> dict[str, Any]:
    requests = {
        "cpu": ann.get("cpu-request", defaults.cpu_request),
        "memory": ann.get("memory-request", defaults.memory_request),
    }
    limits = {
        k: v
        for k, v in (
            ("cpu", ann.get("cpu-limit", defaults.cpu_limit)),
            ("memory", ann.get("memory-limit", defaults.memory_limit)),
        )
        if v
    }
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def _probe(defaults: WebhookSettings, check: str, **timing: int) -> dict[str, Any]:
    command = ["python", "-m", "proxy.k8s.probe", check, "--port", str(defaults.admin_port)]
    return {"exec": {"command": command}, "timeoutSeconds": 3, **timing}


def _sidecar(
    ann: Mapping[str, str], defaults: WebhookSettings, upstream_port: int, native: bool
) -> dict[str, Any]:
    base_path = ann.get("base-path", defaults.base_path).rstrip("/")
    env = [
        _env("FHIR_AUDIT_LISTEN__HOST", "0.0.0.0"),
        _env("FHIR_AUDIT_LISTEN__PORT", str(defaults.proxy_port)),
        _env("FHIR_AUDIT_UPSTREAM__URL", f"http://127.0.0.1:{upstream_port}{base_path}"),
        # Loopback only: the admin API is never reachable from outside the pod.
        _env("FHIR_AUDIT_ADMIN__HOST", "127.0.0.1"),
        _env("FHIR_AUDIT_ADMIN__PORT", str(defaults.admin_port)),
        _env("FHIR_AUDIT_STORE__PATH", f"{STORE_DIR}/audit.db"),
        _env("FHIR_AUDIT_AUDIT__FHIR_VERSION", ann.get("fhir-version", defaults.fhir_version)),
        _env("FHIR_AUDIT_SHUTDOWN_GRACE_S", str(defaults.drain_s)),
        _env("FHIR_AUDIT_TELEMETRY__JSON_LOGS", str(defaults.json_logs).lower()),
        {
            "name": "FHIR_AUDIT_AUDIT__OBSERVER__SITE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
    ]
    if defaults.otlp_endpoint:
        env.append(_env("FHIR_AUDIT_TELEMETRY__OTLP_ENDPOINT", defaults.otlp_endpoint))
    repository_url = ann.get("repository-url", defaults.repository_url)
    if repository_url:
        env.append(_env("FHIR_AUDIT_REPOSITORY__URL", repository_url))
        env.append(
            _env(
                "FHIR_AUDIT_REPOSITORY__MODE", ann.get("repository-mode", defaults.repository_mode)
            )
        )
    mounts: list[dict[str, Any]] = [
        {"name": STORE_VOLUME, "mountPath": STORE_DIR},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if "config-map" in ann:
        env.append(_env("FHIR_AUDIT_CONFIG", f"{CONFIG_DIR}/config.yaml"))
        mounts.append({"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True})
    if "oauth-secret" in ann:
        env.append(_env("FHIR_AUDIT_REPOSITORY__AUTH__TYPE", "oauth2_client_credentials"))
        env.append(
            _env("FHIR_AUDIT_REPOSITORY__AUTH__CLIENT_SECRET_FILE", f"{OAUTH_DIR}/client-secret")
        )
        for key, setting in (
            ("oauth-token-url", "TOKEN_URL"),
            ("oauth-client-id", "CLIENT_ID"),
            ("oauth-scope", "SCOPE"),
        ):
            if key in ann:
                env.append(_env(f"FHIR_AUDIT_REPOSITORY__AUTH__{setting}", ann[key]))
        mounts.append({"name": OAUTH_VOLUME, "mountPath": OAUTH_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": defaults.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "args": ["run"],
        "env": env,
        "ports": [
            {"name": PROXY_PORT_NAME, "containerPort": defaults.proxy_port, "protocol": "TCP"}
        ],
        "resources": _resources(ann, defaults),
        "volumeMounts": mounts,
        "securityContext": {
            "runAsUser": defaults.proxy_uid,
            "runAsGroup": defaults.proxy_uid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "livenessProbe": _probe(defaults, "healthz", periodSeconds=10, failureThreshold=3),
        "readinessProbe": _probe(defaults, "readyz", periodSeconds=5, failureThreshold=3),
    }
    if native:
        # The kubelet starts the next container only once this probe passes: the FHIR
        # server never runs without its proxy. Native sidecars stop after the main
        # containers, so in-flight requests have finished before the proxy drains.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = _probe(
            defaults, "healthz", periodSeconds=1, failureThreshold=60
        )
    else:
        # A regular container: the kubelet starts containers in order and waits for each
        # postStart hook, so the FHIR server starts only after the proxy answers. On
        # termination every container gets SIGTERM at once; preStop keeps the proxy
        # serving while endpoints are removed and in-flight requests finish.
        wait = ["python", "-m", "proxy.k8s.probe", "healthz", "--port", str(defaults.admin_port)]
        container["lifecycle"] = {
            "postStart": {"exec": {"command": [*wait, "--wait", "60"]}},
            "preStop": {
                "exec": {
                    "command": ["python", "-c", f"import time; time.sleep({defaults.drain_s})"]
                }
            },
        }
    return container


def _redirect_init(defaults: WebhookSettings, upstream_port: int) -> dict[str, Any]:
    return {
        "name": INIT,
        "image": defaults.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": [
            "python",
            "-m",
            "proxy.k8s.redirect",
            "--fhir-port",
            str(upstream_port),
            "--proxy-port",
            str(defaults.proxy_port),
            "--proxy-uid",
            str(defaults.proxy_uid),
        ],
        # iptables takes its lock under /run by default, which is read-only here.
        "env": [_env("XTABLES_LOCKFILE", "/tmp/xtables.lock")],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _volumes(ann: Mapping[str, str]) -> list[dict[str, Any]]:
    store: dict[str, Any] = (
        {"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": ann["store-pvc"]}}
        if "store-pvc" in ann
        else {"name": STORE_VOLUME, "emptyDir": {}}
    )
    volumes = [store, {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}]
    if "config-map" in ann:
        volumes.append({"name": CONFIG_VOLUME, "configMap": {"name": ann["config-map"]}})
    if "oauth-secret" in ann:
        volumes.append({"name": OAUTH_VOLUME, "secret": {"secretName": ann["oauth-secret"]}})
    return volumes


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def decide(
    pod: Mapping[str, Any], namespace: str, defaults: WebhookSettings, selection: Selection
) -> Decision:
    """Whether and how to inject the proxy into ``pod`` (as the API server sent it, in
    ``namespace``). Never raises on a malformed annotation: that is a warning and no patch."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations: Mapping[str, str] = metadata.get("annotations") or {}
    if namespace in NEVER_NAMESPACES:
        return _skip(f"namespace {namespace} is never injected")
    if spec.get("hostNetwork"):
        return _skip("hostNetwork pods are never injected")
    names = {
        c.get("name")
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    }
    if STATUS_ANNOTATION in annotations or SIDECAR in names:
        return _skip("already injected")
    ann, problems = read_annotations(annotations)
    label = (metadata.get("labels") or {}).get(PREFIX + "inject")
    if ann.get("inject") == "false" or label == "false":
        return _skip("fhir-audit-proxy/inject is false")
    if problems:
        return _skip("bad annotations", [f"fhir-audit-proxy not injected: {p}" for p in problems])
    if selection is Selection.ANNOTATION and "true" not in (ann.get("inject"), label):
        return _skip("not opted in")
    upstream_port, why = _upstream_port(spec, ann.get("container"), ann.get("upstream-port"))
    if upstream_port is None:
        return _skip(why, [f"fhir-audit-proxy not injected: {why}"])
    if upstream_port == defaults.proxy_port:
        problem = f"the FHIR port {upstream_port} is the proxy's own port"
        return _skip(problem, [f"fhir-audit-proxy not injected: {problem}"])

    native = ann.get("sidecar", defaults.sidecar) == "native"
    traffic = ann.get("traffic", defaults.traffic)
    patch: list[dict[str, Any]] = []
    if "annotations" in metadata:
        patch.append(
            {
                "op": "add",
                "path": f"/metadata/annotations/{_escape(STATUS_ANNOTATION)}",
                "value": "injected",
            }
        )
    else:
        patch.append(
            {"op": "add", "path": "/metadata/annotations", "value": {STATUS_ANNOTATION: "injected"}}
        )

    # Order: the redirect first (before anything can serve), then the native sidecar,
    # then the pod's own init containers.
    front: list[dict[str, Any]] = []
    if traffic == "redirect":
        front.append(_redirect_init(defaults, upstream_port))
    sidecar = _sidecar(ann, defaults, upstream_port, native)
    if native:
        front.append(sidecar)
    if "initContainers" in spec:
        patch.extend(
            {"op": "add", "path": f"/spec/initContainers/{i}", "value": c}
            for i, c in enumerate(front)
        )
    elif front:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": front})
    if not native:
        patch.append({"op": "add", "path": "/spec/containers/0", "value": sidecar})

    if "volumes" in spec:
        patch.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in _volumes(ann))
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": _volumes(ann)})
    return Decision(
        patch=patch,
        reason=f"injected ({'native sidecar' if native else 'container'}, {traffic}, "
        f"FHIR port {upstream_port} from {why})",
    )
