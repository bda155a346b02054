"""The Pod Security Standards' ``baseline`` and ``restricted`` levels as the Pod Security
Admission controller checks a Pod, written from the published level definitions
(kubernetes.io, "Pod Security Standards", policy for the latest version): each control a
function from the pod to the problems it finds. Test support, not a test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Pod = Mapping[str, Any]
Control = Callable[[Pod], list[str]]

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)


def _containers(pod: Pod) -> Iterator[tuple[str, Mapping[str, Any]]]:
    spec = pod.get("spec") or {}
    for kind in ("containers", "initContainers", "ephemeralContainers"):
        for container in spec.get(kind) or []:
            yield f"{kind}[{container.get('name')}]", container


def _security(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return container.get("securityContext") or {}


def _pod_security(pod: Pod) -> Mapping[str, Any]:
    return (pod.get("spec") or {}).get("securityContext") or {}


# --- baseline ------------------------------------------------------------------------------


def host_process(pod: Pod) -> list[str]:
    found = []
    if (_pod_security(pod).get("windowsOptions") or {}).get("hostProcess"):
        found.append("spec.securityContext.windowsOptions.hostProcess")
    for where, c in _containers(pod):
        if (_security(c).get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}.securityContext.windowsOptions.hostProcess")
    return found


def host_namespaces(pod: Pod) -> list[str]:
    spec = pod.get("spec") or {}
    return [f"spec.{k}" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]


def privileged_containers(pod: Pod) -> list[str]:
    return [
        f"{where}.securityContext.privileged"
        for where, c in _containers(pod)
        if _security(c).get("privileged")
    ]


def baseline_capabilities(pod: Pod) -> list[str]:
    found = []
    for where, c in _containers(pod):
        added = set((_security(c).get("capabilities") or {}).get("add") or [])
        for capability in sorted(added - BASELINE_CAPABILITIES):
            found.append(f"{where}.securityContext.capabilities.add {capability}")
    return found


def host_path_volumes(pod: Pod) -> list[str]:
    volumes = (pod.get("spec") or {}).get("volumes") or []
    return [f"spec.volumes[{v.get('name')}].hostPath" for v in volumes if "hostPath" in v]


def host_ports(pod: Pod) -> list[str]:
    return [
        f"{where}.ports[{p.get('containerPort')}].hostPort"
        for where, c in _containers(pod)
        for p in c.get("ports") or []
        if p.get("hostPort")
    ]


def app_armor(pod: Pod) -> list[str]:
    allowed = {"RuntimeDefault", "Localhost"}
    found = []
    profile = _pod_security(pod).get("appArmorProfile") or {}
    if profile and profile.get("type") not in allowed:
        found.append("spec.securityContext.appArmorProfile.type")
    for where, c in _containers(pod):
        profile = _security(c).get("appArmorProfile") or {}
        if profile and profile.get("type") not in allowed:
            found.append(f"{where}.securityContext.appArmorProfile.type")
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            found.append(f"metadata.annotations[{key}]")
    return found


def se_linux(pod: Pod) -> list[str]:
    found = []
    contexts = [("spec.securityContext", _pod_security(pod))]
    contexts += [(f"{where}.securityContext", _security(c)) for where, c in _containers(pod)]
    for where, context in contexts:
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            found.append(f"{where}.seLinuxOptions.type")
        for key in ("user", "role"):
            if options.get(key, ""):
                found.append(f"{where}.seLinuxOptions.{key}")
    return found


def proc_mount(pod: Pod) -> list[str]:
    return [
        f"{where}.securityContext.procMount"
        for where, c in _containers(pod)
        if _security(c).get("procMount", "Default") != "Default"
    ]


def baseline_seccomp(pod: Pod) -> list[str]:
    found = []
    if (_pod_security(pod).get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("spec.securityContext.seccompProfile.type")
    for where, c in _containers(pod):
        if (_security(c).get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}.securityContext.seccompProfile.type")
    return found


def sysctls(pod: Pod) -> list[str]:
    return [
        f"spec.securityContext.sysctls[{s.get('name')}]"
        for s in _pod_security(pod).get("sysctls") or []
        if s.get("name") not in SAFE_SYSCTLS
    ]


BASELINE: tuple[Control, ...] = (
    host_process,
    host_namespaces,
    privileged_containers,
    baseline_capabilities,
    host_path_volumes,
    host_ports,
    app_armor,
    se_linux,
    proc_mount,
    baseline_seccomp,
    sysctls,
)


# --- restricted (everything in baseline, and) ----------------------------------------------


def volume_types(pod: Pod) -> list[str]:
    found = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"spec.volumes[{volume.get('name')}] {', '.join(sorted(kinds))}")
    return found


def privilege_escalation(pod: Pod) -> list[str]:
    return [
        f"{where}.securityContext.allowPrivilegeEscalation"
        for where, c in _containers(pod)
        if _security(c).get("allowPrivilegeEscalation") is not False
    ]


def running_as_non_root(pod: Pod) -> list[str]:
    pod_level = _pod_security(pod).get("runAsNonRoot")
    found = []
    if pod_level is False:
        found.append("spec.securityContext.runAsNonRoot")
    for where, c in _containers(pod):
        value = _security(c).get("runAsNonRoot")
        if value is False or (value is None and pod_level is not True):
            found.append(f"{where}.securityContext.runAsNonRoot")
    return found


def running_as_non_root_user(pod: Pod) -> list[str]:
    found = []
    if _pod_security(pod).get("runAsUser") == 0:
        found.append("spec.securityContext.runAsUser")
    for where, c in _containers(pod):
        if _security(c).get("runAsUser") == 0:
            found.append(f"{where}.securityContext.runAsUser")
    return found


def restricted_seccomp(pod: Pod) -> list[str]:
    allowed = {"RuntimeDefault", "Localhost"}
    pod_type = (_pod_security(pod).get("seccompProfile") or {}).get("type")
    found = []
    if pod_type is not None and pod_type not in allowed:
        found.append("spec.securityContext.seccompProfile.type")
    for where, c in _containers(pod):
        kind = (_security(c).get("seccompProfile") or {}).get("type")
        if (kind is None and pod_type not in allowed) or (kind is not None and kind not in allowed):
            found.append(f"{where}.securityContext.seccompProfile.type")
    return found


def restricted_capabilities(pod: Pod) -> list[str]:
    found = []
    for where, c in _containers(pod):
        capabilities = _security(c).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where}.securityContext.capabilities.drop lacks ALL")
        for capability in capabilities.get("add") or []:
            if capability != "NET_BIND_SERVICE":
                found.append(f"{where}.securityContext.capabilities.add {capability}")
    return found


RESTRICTED: tuple[Control, ...] = (
    *BASELINE,
    volume_types,
    privilege_escalation,
    running_as_non_root,
    running_as_non_root_user,
    restricted_seccomp,
    restricted_capabilities,
)

LEVELS: Mapping[str, tuple[Control, ...]] = {"baseline": BASELINE, "restricted": RESTRICTED}


def violations(pod: Pod, level: str) -> list[str]:
    """What ``pod`` breaks of the Pod Security ``level`` (empty: PSA admits it)."""
    return [problem for control in LEVELS[level] for problem in control(pod)]


def highest_level(pod: Pod) -> str:
    """The most restrictive level ``pod`` passes: restricted, baseline or privileged."""
    for level in ("restricted", "baseline"):
        if not violations(pod, level):
            return level
    return "privileged"
