"""The pod patch that injects the proxy: a pure function from a Pod and the injector's
defaults to a decision (a JSONPatch, or a reason not to inject, plus warnings; or, where
audit is required, a denial).

Which pods: the MutatingWebhookConfiguration's selectors choose the path a pod comes by
(:class:`Selection`: an AdmissionReview carries no namespace labels). Unlike Istio's or
Linkerd's proxies, this one speaks HTTP only, so a namespace label alone never puts it in
front of a port: a pod is injected when it says yes (``fhir-audit-proxy/inject: "true"``,
as the Vault injector asks) or when its port is known to serve FHIR over HTTP (a port
named ``fhir`` or ``http-fhir``, the port named by ``fhir-audit-proxy/upstream-port``, or
the documented port of a known FHIR server image). Any other pod is refused with a warning
(or, where audit is required, denied) that says why. ``"false"`` always wins, except where
audit is required, where it is denied. ``kube-system``, ``kube-public`` and ``hostNetwork``
pods are never injected, nor is a pod that already carries the sidecar this injector would
add (the API server may call the webhook again); a pod that only claims to carry it (the
status annotation, or a container of the sidecar's name that is not the injector's) does
not pass for injected.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from proxy.delivery.modes import REPOSITORY_MODES, repository_settings
from proxy.settings import WebhookSettings

PREFIX = "fhir-audit-proxy/"
SIDECAR = "fhir-audit-proxy"
"""Name of the injected proxy container."""
INIT = "fhir-audit-proxy-init"
"""Name of the init container that installs the traffic redirect."""
STATUS_ANNOTATION = PREFIX + "status"
"""Set on an injected pod."""
INJECTED_LABEL = PREFIX + "injected"
"""Set (``"true"``) on an injected pod: what a PodMonitor selects."""
TAKEOVER_LABEL = PREFIX + "takeover-port"
"""Set on a pod injected with ``traffic: takeover``: its FHIR port, which the chart's
NetworkPolicy closes to every other pod."""
PROXY_PORT_NAME = "fhir-audit"
"""The sidecar's named port: a Service's ``targetPort`` for port takeover."""
STATUS_PORT_NAME = "audit-status"
"""The sidecar's status port: the app's probes and ``/metrics``."""
STORE_VOLUME = "fhir-audit-proxy-store"
TMP_VOLUME = "fhir-audit-proxy-tmp"
CONFIG_VOLUME = "fhir-audit-proxy-config"
OAUTH_VOLUME = "fhir-audit-proxy-oauth"
REPOSITORY_VOLUME = "fhir-audit-proxy-repository"
OUR_VOLUMES = frozenset({STORE_VOLUME, TMP_VOLUME, CONFIG_VOLUME, OAUTH_VOLUME, REPOSITORY_VOLUME})
STORE_DIR = "/var/lib/fhir-audit-proxy"
CONFIG_DIR = "/etc/fhir-audit-proxy"
OAUTH_DIR = "/var/run/secrets/fhir-audit-proxy/oauth"
REPOSITORY_DIR = "/var/run/secrets/fhir-audit-proxy/repository"
"""Where a ``repository-secret`` is mounted: the files repository settings name."""
INJECTABLE_MODES = tuple(mode for mode in REPOSITORY_MODES if mode != "file")
"""Repository modes a sidecar may use: all but ``file``, which would write inside it."""
NEVER_NAMESPACES = frozenset({"kube-system", "kube-public"})
APP_PROBES_ENV = "FHIR_AUDIT_STATUS__APP_PROBES"
"""Derived from the app's probes, which are rewritten once injected: not part of what
tells a sidecar made by this injector apart (see :func:`fingerprint`)."""
DEFAULT_GRACE_S = 30
"""The pod's ``terminationGracePeriodSeconds`` when it sets none."""
STORE_HEADROOM = 64 * 1024 * 1024
"""Room in the store's emptyDir beyond ``store.max_bytes`` (the token key, SQLite's
temporary files): the proxy refuses requests (507) at its own limit before the kubelet
would evict the pod, and its events with it, at the volume's."""

FHIR_IMAGES: Mapping[str, int] = {
    "hapiproject/hapi": 8080,
    "medplum/medplum-server": 8103,
    "smilecdr/smilecdr": 8000,
    "firely/server": 4080,
}
"""FHIR server images (repository, without registry or tag) and the port on which each
serves FHIR over plain HTTP by default. Not Aidbox: its port is whatever its required
``AIDBOX_PORT`` says, so its pods name the port or say yes."""
FHIR_PORT_NAMES = frozenset({"fhir", "http-fhir"})
"""Port names that say the port serves FHIR over HTTP."""
HTTPS_PORTS = frozenset({443, 8443, 9443})
"""Port numbers taken for HTTPS unless ``fhir-audit-proxy/upstream-scheme: http`` says
otherwise."""
_HTTPS_NAME = re.compile(r"^(https|tls|grpc)")
PROBES = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
"""A container's probe fields and their name in ``/app-health/<container>/<probe>``."""
_PROBE_TIMING = (
    "initialDelaySeconds",
    "timeoutSeconds",
    "periodSeconds",
    "successThreshold",
    "failureThreshold",
    "terminationGracePeriodSeconds",
)
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_BYTES = re.compile(r"^([0-9]+)(k|Ki|M|Mi|G|Gi|T|Ti)?$")
_UNITS = {
    None: 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
"""An IANA service name, as a containerPort's name must be."""
_SHARED_OWNERS = frozenset({"ReplicaSet", "DaemonSet", "Job", "ReplicationController"})
"""Owners whose pods all name the same claim and may run at once (a rolling update runs
old and new pods of a Deployment together, even with one replica)."""


class Selection(enum.Enum):
    """How the pod reached the webhook (one path of the webhook per selector)."""

    NAMESPACE = "namespace"
    """Its namespace carries ``fhir-audit-proxy/injection: enabled``: inject pods that say
    yes or serve FHIR on a known port; refuse others with a warning."""
    REQUIRED = "required"
    """Its namespace carries ``fhir-audit-proxy/injection: required``: every pod gets the
    sidecar or is denied with the reason; only the annotations of
    :attr:`WebhookSettings.required_pod_annotations` may be set."""
    ANNOTATION = "annotation"
    """Any other namespace: inject only with ``fhir-audit-proxy/inject: "true"`` as an
    annotation or a label (the chart selects these pods by the label, since the API
    server can select by labels only)."""


KNOWN_ANNOTATIONS: Mapping[str, str] = {
    "inject": '"true" or "false"; "false" always wins (denied where audit is required)',
    "status": "set by the injector",
    "container": "name of the FHIR server container (default: the first container)",
    "upstream-port": "the FHIR server's port, number or name (default: its first containerPort)",
    "upstream-scheme": "http (default) or https (refused: the proxy's upstream is HTTP)",
    "base-path": "the FHIR base path (default /fhir)",
    "fhir-version": "R4 or R5",
    "service-name": "OTEL_SERVICE_NAME of the sidecar (default: the app's name label)",
    "repository-url": "where events go, in the form the repository mode takes",
    "repository-mode": "a repository mode: " + ", ".join(INJECTABLE_MODES),
    "repository-secret": f"a Secret mounted at {REPOSITORY_DIR} (stream credentials, certificates)",
    "local-only": '"true": keep events in the pod only (lost with it) when no repository is set',
    "config-map": "a ConfigMap whose key config.yaml is the proxy's configuration",
    "store-pvc": "a PersistentVolumeClaim for the store (default: an emptyDir)",
    "store-volume": "a volume of the pod for the store (a StatefulSet's volume claim template)",
    "store-max-bytes": "store.max_bytes, a quantity (sizes the emptyDir)",
    "oauth-secret": "a Secret whose key client-secret is the OAuth2 client secret",
    "oauth-token-url": "the IdP's token endpoint",
    "oauth-client-id": "the OAuth2 client id",
    "oauth-scope": "the OAuth2 scope",
    "sidecar": "native (init container, restartPolicy Always) or container (before 1.29)",
    "traffic": "redirect (iptables, needs NET_ADMIN) or takeover (Service targetPort)",
    "proxy-port": "the proxy's port in the pod (default 15080)",
    "admin-port": "the admin API's loopback port (default 15081)",
    "status-port": "the status port: probes and /metrics (default 15082)",
    "cpu-request": "a quantity",
    "cpu-limit": "a quantity",
    "memory-request": "a quantity",
    "memory-limit": "a quantity",
}
_CHOICES: Mapping[str, frozenset[str]] = {
    "inject": frozenset({"true", "false"}),
    "local-only": frozenset({"true", "false"}),
    "upstream-scheme": frozenset({"http", "https"}),
    "fhir-version": frozenset({"R4", "R5"}),
    "repository-mode": frozenset(INJECTABLE_MODES),
    "sidecar": frozenset({"native", "container"}),
    "traffic": frozenset({"redirect", "takeover"}),
}
_NAMES = (
    "config-map",
    "store-pvc",
    "store-volume",
    "oauth-secret",
    "repository-secret",
    "container",
    "service-name",
)
_OUR_PORTS = ("proxy-port", "admin-port", "status-port")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the webhook answers for one pod."""

    patch: list[dict[str, Any]]
    """RFC 6902 operations; empty when nothing is injected."""
    reason: str
    """Why the pod was or was not injected (logged; the denial's message)."""
    warnings: list[str] = field(default_factory=list)
    """Sent back in ``AdmissionReview.response.warnings`` (kubectl prints them)."""
    allowed: bool = True
    """False: the pod is denied (only where audit is required)."""

    @property
    def injected(self) -> bool:
        return bool(self.patch)


def _skip(reason: str, warnings: list[str] | None = None) -> Decision:
    return Decision(patch=[], reason=reason, warnings=warnings or [])


def _refuse(selection: Selection, namespace: str, reason: str) -> Decision:
    """No sidecar for ``reason``: a warning, or where audit is required a denial."""
    if selection is Selection.REQUIRED:
        return Decision(
            patch=[],
            reason=f"fhir-audit-proxy: audit is required in namespace {namespace}: {reason}",
            allowed=False,
        )
    return _skip(reason, [f"fhir-audit-proxy not injected: {reason}"])


def parse_bytes(quantity: str) -> int:
    """A whole-byte Kubernetes quantity (``512Mi``, ``1G``, ``1048576``) in bytes."""
    found = _BYTES.match(quantity)
    if found is None:
        raise ValueError(f"{quantity!r} is not a quantity of bytes")
    return int(found.group(1)) * _UNITS[found.group(2)]


def _port_problem(value: str, *, ours: bool) -> str | None:
    if value.isdigit():
        low = 1024 if ours else 1
        # The proxy drops every capability: it cannot bind a port below 1024.
        return None if low <= int(value) < 65536 else f"not a port number from {low} to 65535"
    if ours:
        return "not a port number"
    return None if _PORT_NAME.match(value) else "not a port number or name"


def read_annotations(annotations: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The pod's ``fhir-audit-proxy/*`` annotations without their prefix, and one
    problem per unknown or malformed annotation (empty when all are good)."""
    ours = {k[len(PREFIX) :]: v for k, v in annotations.items() if k.startswith(PREFIX)}
    problems: list[str] = []
    for key, value in ours.items():
        problem: str | None = None
        if key not in KNOWN_ANNOTATIONS:
            problems.append(f"unknown annotation {PREFIX}{key}")
            continue
        if key in _CHOICES and value not in _CHOICES[key]:
            problem = f"expected one of {', '.join(sorted(_CHOICES[key]))}"
        elif key.endswith(("-request", "-limit")) and not _QUANTITY.match(value):
            problem = "not a resource quantity"
        elif key == "store-max-bytes" and not _BYTES.match(value):
            problem = "not a quantity of bytes"
        elif key in _NAMES and not _DNS_NAME.match(value):
            problem = "not a Kubernetes object name"
        elif key == "upstream-port" or key in _OUR_PORTS:
            problem = _port_problem(value, ours=key in _OUR_PORTS)
        elif key == "base-path" and not value.startswith("/"):
            problem = "must start with /"
        elif key == "oauth-token-url" and not value.startswith(("http://", "https://")):
            problem = "not an http(s) URL"
        elif key == "repository-url":
            mode = ours.get("repository-mode")
            modes = [mode] if mode in INJECTABLE_MODES else list(INJECTABLE_MODES)
            if not any(_url_problem(m, value) is None for m in modes):
                problem = (
                    f"not a URL of repository mode {' or '.join(modes)}:"
                    f" {_url_problem(modes[0], value)}"
                )
        if problem:
            problems.append(f"{PREFIX}{key}={value!r}: {problem}")
    return ours, problems


def _url_problem(mode: str, url: str) -> str | None:
    """Why ``url`` is no URL of repository ``mode``, or None when it is."""
    try:
        repository_settings(mode=mode, url=url)
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
    return None


def _repository_problem(ann: Mapping[str, str], defaults: WebhookSettings) -> str | None:
    """Why the pod's repository URL does not suit the injector's default mode, when the
    pod names no mode of its own (:func:`read_annotations` checks it against that one)."""
    url = ann.get("repository-url")
    if url is None or "repository-mode" in ann:
        return None
    problem = _url_problem(defaults.repository_mode, url)
    if problem is None:
        return None
    return (
        f"{PREFIX}repository-url={url!r}: not a URL of mode {defaults.repository_mode}: {problem}"
    )


def _repository_secret(ann: Mapping[str, str], defaults: WebhookSettings) -> str | None:
    return ann.get("repository-secret", defaults.repository_secret)


def _containers(spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def image_repository(image: str) -> str:
    """``image`` without its registry, tag and digest (``hapiproject/hapi``)."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    name = f"{head}/{tail.split(':', 1)[0]}" if head else tail.split(":", 1)[0]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class FhirPort:
    """The port the proxy fronts, as found in the pod."""

    number: int
    name: str | None
    """The containerPort's name, if it is a declared port with a name."""
    image: str | None
    """The image of the container that declares it."""
    why: str
    """How it was found (for the log)."""
    declared_by_annotation: bool
    """``fhir-audit-proxy/upstream-port`` named it."""

    @property
    def known_fhir(self) -> bool:
        """Whether the pod says, or its image is known to mean, that FHIR is served over
        HTTP on this port."""
        if self.declared_by_annotation or self.name in FHIR_PORT_NAMES:
            return True
        return (
            self.image is not None and FHIR_IMAGES.get(image_repository(self.image)) == self.number
        )


def _fhir_port(
    spec: Mapping[str, Any], container_name: str | None, port: str | None
) -> FhirPort | str:
    """The FHIR server's port, or why there is none."""
    containers: list[dict[str, Any]] = list(spec.get("containers") or [])
    if container_name is not None:
        chosen = [c for c in containers if c.get("name") == container_name]
        if not chosen:
            return f"no container named {container_name!r}"
        containers = chosen + [c for c in containers if c.get("name") != container_name]
    declared = [
        (c, p)
        for c in containers
        for p in c.get("ports") or []
        if p.get("protocol", "TCP") == "TCP"
    ]
    if port is None:
        if not declared:
            return "no containerPort declared; set fhir-audit-proxy/upstream-port"
        c, p = declared[0]
        return FhirPort(
            int(p["containerPort"]), p.get("name"), c.get("image"), "first containerPort", False
        )
    if port.isdigit():
        number = int(port)
        owner = next((c for c, p in declared if int(p["containerPort"]) == number), None)
        if owner is None and containers:
            owner = containers[0]
        return FhirPort(number, None, (owner or {}).get("image"), "annotation", True)
    for c, p in declared:
        if p.get("name") == port:
            return FhirPort(
                int(p["containerPort"]), port, c.get("image"), f"named port {port}", True
            )
    return f"no containerPort named {port!r}"


def _https_problem(ann: Mapping[str, str], port: FhirPort) -> str | None:
    scheme = ann.get("upstream-scheme")
    https = scheme == "https" or (
        scheme is None
        and (port.number in HTTPS_PORTS or bool(port.name and _HTTPS_NAME.match(port.name)))
    )
    if not https:
        return None
    return (
        f"port {port.number} serves HTTPS, and the proxy reaches the FHIR server over HTTP"
        " only: serve FHIR over plain HTTP on a port for the proxy and name it in"
        " fhir-audit-proxy/upstream-port (or set fhir-audit-proxy/upstream-scheme: http"
        " if the port is plain HTTP)"
    )


@dataclass(frozen=True, slots=True)
class Ports:
    """The sidecar's ports in this pod."""

    proxy: int
    admin: int
    status: int


def _our_ports(ann: Mapping[str, str], defaults: WebhookSettings) -> Ports:
    return Ports(
        proxy=int(ann.get("proxy-port", defaults.proxy_port)),
        admin=int(ann.get("admin-port", defaults.admin_port)),
        status=int(ann.get("status-port", defaults.status_port)),
    )


def _port_clash(spec: Mapping[str, Any], ports: Ports, fhir: int) -> str | None:
    """Why the sidecar's ports cannot be used in this pod, or None."""
    ours = {"proxy-port": ports.proxy, "admin-port": ports.admin, "status-port": ports.status}
    if len(set(ours.values())) < len(ours):
        return f"the sidecar's ports must differ: {', '.join(f'{k} {v}' for k, v in ours.items())}"
    taken = {fhir: "the FHIR port"}
    for container in _containers(spec):
        for port in container.get("ports") or []:
            taken.setdefault(int(port["containerPort"]), f"container {container.get('name')}")
    for annotation, number in ours.items():
        if number in taken:
            role = annotation.removesuffix("-port")
            return (
                f"port {number} ({taken[number]}) is the sidecar's {role} port:"
                f" set fhir-audit-proxy/{annotation} to a free port"
            )
    return None


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


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


def _probe(ports: Ports, check: str, **timing: int) -> dict[str, Any]:
    command = ["python", "-m", "proxy.k8s.probe", check, "--port", str(ports.admin)]
    return {"exec": {"command": command}, "timeoutSeconds": 3, **timing}


def _service_name(metadata: Mapping[str, Any], ann: Mapping[str, str], fhir_container: str) -> str:
    labels: Mapping[str, str] = metadata.get("labels") or {}
    return (
        ann.get("service-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or fhir_container
    )


def _telemetry_env(service_name: str) -> list[dict[str, Any]]:
    """The pod's identity from the downward API, and the OpenTelemetry resource built
    from it (Kubernetes expands ``$(NAME)`` from the variables listed before)."""
    resource = ",".join(
        [
            "k8s.pod.name=$(K8S_POD_NAME)",
            "k8s.pod.uid=$(K8S_POD_UID)",
            "k8s.namespace.name=$(K8S_NAMESPACE_NAME)",
            "k8s.node.name=$(K8S_NODE_NAME)",
            f"k8s.container.name={SIDECAR}",
            f"service.instance.id=$(K8S_NAMESPACE_NAME).$(K8S_POD_NAME).{SIDECAR}",
        ]
    )
    return [
        _field_env("K8S_POD_NAME", "metadata.name"),
        _field_env("K8S_POD_UID", "metadata.uid"),
        _field_env("K8S_NAMESPACE_NAME", "metadata.namespace"),
        _field_env("K8S_NODE_NAME", "spec.nodeName"),
        _field_env("K8S_POD_IP", "status.podIP"),
        _field_env("K8S_POD_IPS", "status.podIPs"),
        _env("OTEL_SERVICE_NAME", service_name),
        _env("OTEL_RESOURCE_ATTRIBUTES", resource),
    ]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the sidecar is built from, decided before anything is built."""

    ann: Mapping[str, str]
    fhir: FhirPort
    ports: Ports
    native: bool
    traffic: str
    repository_url: str | None
    store_max_bytes: int
    service_name: str
    app_probes: Mapping[str, dict[str, Any]]
    """What each rewritten probe checks, by ``<container>/<probe>``."""
    probe_operations: list[dict[str, Any]]
    """The patch operations that rewrite the app's probes."""
    warnings: list[str]


def _sidecar(plan: Plan, defaults: WebhookSettings) -> dict[str, Any]:
    ann, ports = plan.ann, plan.ports
    base_path = ann.get("base-path", defaults.base_path).rstrip("/")
    env = [
        # "::" listens on both families: IPv6 clients reach the proxy too.
        _env("FHIR_AUDIT_LISTEN__HOST", "::"),
        _env("FHIR_AUDIT_LISTEN__PORT", str(ports.proxy)),
        _env("FHIR_AUDIT_UPSTREAM__URL", f"http://127.0.0.1:{plan.fhir.number}{base_path}"),
        # Loopback only: the admin API is never reachable from outside the pod.
        _env("FHIR_AUDIT_ADMIN__HOST", "127.0.0.1"),
        _env("FHIR_AUDIT_ADMIN__PORT", str(ports.admin)),
        _env("FHIR_AUDIT_STATUS__PORT", str(ports.status)),
        _env("FHIR_AUDIT_STORE__PATH", f"{STORE_DIR}/audit.db"),
        _env("FHIR_AUDIT_STORE__MAX_BYTES", str(plan.store_max_bytes)),
        _env("FHIR_AUDIT_AUDIT__FHIR_VERSION", ann.get("fhir-version", defaults.fhir_version)),
        _env("FHIR_AUDIT_SHUTDOWN_GRACE_S", str(defaults.drain_s)),
        _env("FHIR_AUDIT_TELEMETRY__JSON_LOGS", str(defaults.json_logs).lower()),
        _field_env("FHIR_AUDIT_AUDIT__OBSERVER__SITE", "metadata.namespace"),
        *_telemetry_env(plan.service_name),
    ]
    if plan.app_probes:
        env.append(_env(APP_PROBES_ENV, orjson.dumps(plan.app_probes).decode()))
    if defaults.otlp_endpoint:
        env.append(_env("FHIR_AUDIT_TELEMETRY__OTLP_ENDPOINT", defaults.otlp_endpoint))
    if plan.repository_url:
        env.append(_env("FHIR_AUDIT_REPOSITORY__URL", plan.repository_url))
        mode = ann.get("repository-mode", defaults.repository_mode)
        env.append(_env("FHIR_AUDIT_REPOSITORY__MODE", mode))
        for name, value in sorted(defaults.repository_settings.items()):
            variable = "FHIR_AUDIT_REPOSITORY__" + name.replace(".", "__").upper()
            env.append(_env(variable, value))
    mounts: list[dict[str, Any]] = [
        {"name": ann.get("store-volume", STORE_VOLUME), "mountPath": STORE_DIR},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if _repository_secret(ann, defaults):
        mounts.append({"name": REPOSITORY_VOLUME, "mountPath": REPOSITORY_DIR, "readOnly": True})
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
            {"name": PROXY_PORT_NAME, "containerPort": ports.proxy, "protocol": "TCP"},
            {"name": STATUS_PORT_NAME, "containerPort": ports.status, "protocol": "TCP"},
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
        "livenessProbe": _probe(ports, "healthz", periodSeconds=10, failureThreshold=3),
        "readinessProbe": _probe(ports, "readyz", periodSeconds=5, failureThreshold=3),
    }
    if plan.native:
        # The kubelet starts the next container only once this probe passes: the FHIR
        # server never runs without its proxy. Native sidecars stop after the main
        # containers, so in-flight requests have finished before the proxy drains.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = _probe(ports, "healthz", periodSeconds=1, failureThreshold=60)
    else:
        # A regular container: the kubelet starts containers in order and waits for each
        # postStart hook, so the FHIR server starts only after the proxy answers. On
        # termination every container gets SIGTERM at once; preStop keeps the proxy
        # serving while endpoints are removed and in-flight requests finish.
        wait = ["python", "-m", "proxy.k8s.probe", "healthz", "--port", str(ports.admin)]
        container["lifecycle"] = {
            "postStart": {"exec": {"command": [*wait, "--wait", "60"]}},
            "preStop": {
                "exec": {
                    "command": ["python", "-c", f"import time; time.sleep({defaults.drain_s})"]
                }
            },
        }
    return container


def _redirect_init(defaults: WebhookSettings, plan: Plan) -> dict[str, Any]:
    return {
        "name": INIT,
        "image": defaults.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": [
            "python",
            "-m",
            "proxy.k8s.redirect",
            "--fhir-port",
            str(plan.fhir.number),
            "--proxy-port",
            str(plan.ports.proxy),
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


def _volumes(plan: Plan, defaults: WebhookSettings) -> list[dict[str, Any]]:
    ann = plan.ann
    volumes: list[dict[str, Any]] = []
    if "store-pvc" in ann:
        claim = {"claimName": ann["store-pvc"]}
        volumes.append({"name": STORE_VOLUME, "persistentVolumeClaim": claim})
    elif "store-volume" not in ann:
        size = plan.store_max_bytes + STORE_HEADROOM
        volumes.append({"name": STORE_VOLUME, "emptyDir": {"sizeLimit": str(size)}})
    volumes.append({"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
    if "config-map" in ann:
        volumes.append({"name": CONFIG_VOLUME, "configMap": {"name": ann["config-map"]}})
    if "oauth-secret" in ann:
        volumes.append({"name": OAUTH_VOLUME, "secret": {"secretName": ann["oauth-secret"]}})
    secret = _repository_secret(ann, defaults)
    if secret:
        volumes.append({"name": REPOSITORY_VOLUME, "secret": {"secretName": secret}})
    return volumes


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _resolve(container: Mapping[str, Any], port: Any) -> int | None:
    """A probe's port (number or the container's port name) as a number."""
    if isinstance(port, int):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for declared in container.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
    return None


def _app_probe(container: Mapping[str, Any], probe: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the status listener must check for ``probe``, or None to leave it alone (an
    exec probe, one aimed at another host, a port that does not resolve)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if (http := probe.get("httpGet")) is not None:
        port = _resolve(container, http.get("port"))
        if port is None or http.get("host"):
            return None
        headers = {h["name"]: h.get("value", "") for h in http.get("httpHeaders") or []}
        return {
            "kind": "http",
            "port": port,
            "path": http.get("path") or "/",
            "scheme": http.get("scheme", "HTTP"),
            "headers": headers,
            "timeout_s": timeout,
        }
    if (tcp := probe.get("tcpSocket")) is not None:
        port = _resolve(container, tcp.get("port"))
        if port is None or tcp.get("host"):
            return None
        return {"kind": "tcp", "port": port, "timeout_s": timeout}
    if (grpc := probe.get("grpc")) is not None:
        port = _resolve(container, grpc.get("port"))
        if port is None:
            return None
        return {
            "kind": "grpc",
            "port": port,
            "service": grpc.get("service", ""),
            "timeout_s": timeout,
        }
    return None


def _probe_rewrites(
    spec: Mapping[str, Any], status_port: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The app containers' probes moved to the status port, as Istio does: the patch
    operations and what each new path checks."""
    operations: list[dict[str, Any]] = []
    checks: dict[str, dict[str, Any]] = {}
    for index, container in enumerate(spec.get("containers") or []):
        for kind, name in PROBES.items():
            probe = container.get(kind)
            if not probe:
                continue
            check = _app_probe(container, probe)
            if check is None:
                continue
            path = f"{container['name']}/{name}"
            checks[path] = check
            rewritten: dict[str, Any] = {
                "httpGet": {"path": f"/app-health/{path}", "port": status_port, "scheme": "HTTP"}
            }
            rewritten.update({k: probe[k] for k in _PROBE_TIMING if k in probe})
            operations.append(
                {"op": "replace", "path": f"/spec/containers/{index}/{kind}", "value": rewritten}
            )
    return operations, checks


def fingerprint(containers: Sequence[Mapping[str, Any]]) -> str:
    """A digest of what makes containers the injector's: name, image, command, args and
    the proxy's own variables (``FHIR_AUDIT_*``: upstream, ports, store, repository). Other
    webhooks may add variables, mounts or security settings to them without changing it."""
    parts = []
    for c in sorted(containers, key=lambda c: str(c.get("name"))):
        env = sorted(
            (e.get("name"), e.get("value"), orjson.dumps(e.get("valueFrom")).decode())
            for e in c.get("env") or []
            if str(e.get("name", "")).startswith("FHIR_AUDIT_") and e.get("name") != APP_PROBES_ENV
        )
        parts.append([c.get("name"), c.get("image"), c.get("command"), c.get("args"), env])
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()


def _ours(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in _containers(spec) if c.get("name") in (SIDECAR, INIT)]


def _without_ours(pod: Mapping[str, Any]) -> dict[str, Any]:
    """``pod`` as it was before injection, as far as it can be told: the injector's
    containers, volumes and status annotation removed."""
    metadata = dict(pod.get("metadata") or {})
    metadata["annotations"] = {
        k: v for k, v in (metadata.get("annotations") or {}).items() if k != STATUS_ANNOTATION
    }
    spec = dict(pod.get("spec") or {})
    for key in ("initContainers", "containers"):
        if key in spec:
            spec[key] = [c for c in spec[key] if c.get("name") not in (SIDECAR, INIT)]
    if "volumes" in spec:
        spec["volumes"] = [v for v in spec["volumes"] if v.get("name") not in OUR_VOLUMES]
    return {**pod, "metadata": metadata, "spec": spec}


def _built(plan: Plan, defaults: WebhookSettings) -> list[dict[str, Any]]:
    """The containers the injector adds for ``plan``."""
    init = [_redirect_init(defaults, plan)] if plan.traffic == "redirect" else []
    return [*init, _sidecar(plan, defaults)]


def decide(
    pod: Mapping[str, Any],
    namespace: str,
    defaults: WebhookSettings,
    selection: Selection,
    *,
    pod_security: bool = False,
) -> Decision:
    """Whether and how to inject the proxy into ``pod`` (as the API server sent it, in
    ``namespace``). ``pod_security``: the namespace enforces the Pod Security level
    ``baseline`` or ``restricted``, which refuse the redirect's privileges, so traffic is
    taken over instead. Never raises on a malformed annotation: that is a warning and no
    patch (a denial where audit is required)."""
    if namespace in NEVER_NAMESPACES:
        return _skip(f"namespace {namespace} is never injected")
    present = _ours(pod.get("spec") or {})
    if not present:
        planned = _plan(pod, namespace, defaults, selection, pod_security)
        if isinstance(planned, Decision):
            return planned
        warnings = list(planned.warnings)
        if STATUS_ANNOTATION in ((pod.get("metadata") or {}).get("annotations") or {}):
            warnings.append(
                f"fhir-audit-proxy: {STATUS_ANNOTATION} is the injector's to set; the pod"
                " carried it without the sidecar and was injected"
            )
        return Decision(
            patch=_patch(pod.get("metadata") or {}, pod.get("spec") or {}, planned, defaults),
            reason=f"injected ({'native sidecar' if planned.native else 'container'},"
            f" {planned.traffic}, FHIR port {planned.fhir.number} from {planned.fhir.why})",
            warnings=warnings,
        )
    # Containers of the sidecar's names: the injector's own work (the API server calls
    # again after other webhooks), or a pod that poses as injected. Only what this
    # injector would add to the pod as it was counts as injected.
    planned = _plan(_without_ours(pod), namespace, defaults, selection, pod_security)
    if isinstance(planned, Plan):
        if fingerprint(_built(planned, defaults)) == fingerprint(present):
            return _skip("already injected")
    elif not planned.allowed:
        return planned
    names = ", ".join(sorted({str(c.get("name")) for c in present}))
    return _refuse(
        selection,
        namespace,
        f"the pod has containers named {names} that this injector did not make",
    )


def _plan(
    pod: Mapping[str, Any],
    namespace: str,
    defaults: WebhookSettings,
    selection: Selection,
    pod_security: bool,
) -> Plan | Decision:
    """The plan for a pod without containers of the sidecar's names, or the decision not
    to inject it."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations: Mapping[str, str] = metadata.get("annotations") or {}
    required = selection is Selection.REQUIRED

    def refuse(reason: str) -> Decision:
        return _refuse(selection, namespace, reason)

    ann, problems = read_annotations(annotations)
    repository_problem = _repository_problem(ann, defaults)
    if repository_problem:
        problems.append(repository_problem)
    if problems:
        if required:
            return refuse("; ".join(problems))
        return _skip("bad annotations", [f"fhir-audit-proxy not injected: {p}" for p in problems])
    label = (metadata.get("labels") or {}).get(PREFIX + "inject")
    if ann.get("inject") == "false" or label == "false":
        if required:
            return refuse("fhir-audit-proxy/inject is false")
        return _skip("fhir-audit-proxy/inject is false")
    if required:
        refused = sorted(
            k for k in ann if k != "status" and k not in defaults.required_pod_annotations
        )
        if refused:
            return refuse(f"the pod may not set {', '.join(PREFIX + k for k in refused)} here")
    if spec.get("hostNetwork"):
        if required:
            return refuse("a hostNetwork pod cannot be audited")
        return _skip("hostNetwork pods are never injected")
    said_yes = "true" in (ann.get("inject"), label)
    if selection is Selection.ANNOTATION and not said_yes:
        return _skip("not opted in")

    found = _fhir_port(spec, ann.get("container"), ann.get("upstream-port"))
    if isinstance(found, str):
        return refuse(found)
    if not said_yes and not found.known_fhir:
        return refuse(
            f"port {found.number} ({found.why}) is not known to serve FHIR over HTTP: say"
            ' yes with fhir-audit-proxy/inject: "true" (and fhir-audit-proxy/upstream-port),'
            " or name the port fhir or http-fhir"
        )
    if (https := _https_problem(ann, found)) is not None:
        return refuse(https)
    ports = _our_ports(ann, defaults)
    if (clash := _port_clash(spec, ports, found.number)) is not None:
        return refuse(clash)
    for container in _containers(spec):
        mounted = {m.get("name") for m in container.get("volumeMounts") or []} & OUR_VOLUMES
        if mounted:
            return refuse(
                f"container {container.get('name')} mounts {', '.join(sorted(mounted))},"
                " the sidecar's own volume"
            )
    repository_url = ann.get("repository-url", defaults.repository_url)
    if not repository_url and ann.get("local-only") != "true":
        return refuse(
            "no audit repository: events would live only in the pod and die with it; set"
            " the injector's repository (injector.sidecar.repository.url) or"
            " fhir-audit-proxy/repository-url, or accept local-only audit with"
            ' fhir-audit-proxy/local-only: "true"'
        )
    owners = {o.get("kind") for o in metadata.get("ownerReferences") or []} & _SHARED_OWNERS
    if "store-pvc" in ann and owners:
        return refuse(
            f"fhir-audit-proxy/store-pvc on a pod of a {sorted(owners)[0]}: its pods (old and"
            " new ones together during a rollout) would share one ReadWriteOnce claim; use a"
            " StatefulSet with a volume claim template and fhir-audit-proxy/store-volume"
        )
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    if "store-volume" in ann and ann["store-volume"] not in volumes:
        return refuse(
            f"fhir-audit-proxy/store-volume: the pod has no volume {ann['store-volume']!r}"
        )
    traffic = ann.get("traffic", defaults.traffic)
    if pod_security:
        if ann.get("traffic") == "redirect":
            return refuse(
                "fhir-audit-proxy/traffic: redirect needs a root init container with"
                " NET_ADMIN and NET_RAW, which this namespace's Pod Security level refuses"
            )
        traffic = "takeover"

    probe_operations, app_probes = _probe_rewrites(spec, ports.status)
    containers = list(spec.get("containers") or [])
    serving = [
        c
        for c in containers
        if any(int(p["containerPort"]) == found.number for p in c.get("ports") or [])
    ]
    fhir_container = str((serving or containers or [{"name": "fhir"}])[0].get("name"))
    warnings = []
    if not repository_url:
        warnings.append(
            "fhir-audit-proxy: local-only audit: no repository is set, so the events stay"
            " in this pod's store and are lost when the pod is deleted"
        )
    return Plan(
        ann=ann,
        fhir=found,
        ports=ports,
        native=ann.get("sidecar", defaults.sidecar) == "native",
        traffic=traffic,
        repository_url=repository_url,
        store_max_bytes=parse_bytes(ann["store-max-bytes"])
        if "store-max-bytes" in ann
        else defaults.store_max_bytes,
        service_name=_service_name(metadata, ann, fhir_container),
        app_probes=app_probes,
        probe_operations=probe_operations,
        warnings=warnings,
    )


def _patch(
    metadata: Mapping[str, Any], spec: Mapping[str, Any], plan: Plan, defaults: WebhookSettings
) -> list[dict[str, Any]]:
    patch: list[dict[str, Any]] = []
    labels = {INJECTED_LABEL: "true"}
    if plan.traffic == "takeover":
        labels[TAKEOVER_LABEL] = str(plan.fhir.number)
    for key, values in (("annotations", {STATUS_ANNOTATION: "injected"}), ("labels", labels)):
        if metadata.get(key) is not None:
            patch.extend(
                {"op": "add", "path": f"/metadata/{key}/{_escape(k)}", "value": v}
                for k, v in values.items()
            )
        else:
            patch.append({"op": "add", "path": f"/metadata/{key}", "value": values})
    # Before the sidecar is added at /spec/containers/0 (the fallback), which shifts them.
    patch.extend(plan.probe_operations)

    # Order: the redirect first (before anything can serve), then the native sidecar,
    # then the pod's own init containers.
    *front, sidecar = _built(plan, defaults)
    if plan.native:
        front.append(sidecar)
    if "initContainers" in spec:
        patch.extend(
            {"op": "add", "path": f"/spec/initContainers/{i}", "value": c}
            for i, c in enumerate(front)
        )
    elif front:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": front})
    if not plan.native:
        patch.append({"op": "add", "path": "/spec/containers/0", "value": sidecar})

    if "volumes" in spec:
        volumes = _volumes(plan, defaults)
        patch.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes)
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": _volumes(plan, defaults)})
    # The proxy stops after the app (native sidecar), then takes up to drain_s for the
    # requests still open and up to drain_s more to deliver what is pending.
    grace = int(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
    patch.append(
        {
            "op": "add",
            "path": "/spec/terminationGracePeriodSeconds",
            "value": grace + 2 * defaults.drain_s + 5,
        }
    )
    return patch
