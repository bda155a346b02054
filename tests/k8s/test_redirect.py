"""The injected pod's network, for real, in Linux network namespaces made here: a "pod"
namespace runs the test FHIR server (on all addresses, as in a pod) and the proxy as its
own UID with the environment the injector gives the sidecar, and the rules the injected
init container installs (the same module, run with the injected command); a "client"
namespace on the other end of a veth pair (IPv4 and IPv6) calls the pod, as other pods
and the kubelet do.

Fixed ports inside the pod namespace are safe: it is private to this test, like a pod's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import orjson
import pytest
import yaml

from proxy.admin.access import is_admin_access
from proxy.k8s.patch import INIT, SIDECAR, Selection, decide
from proxy.settings import WebhookSettings
from tests.factories import why_uid_cannot_run_the_proxy

ROOT = Path(__file__).resolve().parents[2]
ADMISSION = Path(__file__).parent / "admission"
FHIR_PORT = 8080
PROXY_PORT = 15080
ADMIN_PORT = 15081
STATUS_PORT = 15082
PROXY_UID = 10001
POD_V4, CLIENT_V4 = "10.213.0.1", "10.213.0.2"
POD_V6, CLIENT_V6 = "fd00:213::1", "fd00:213::2"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "iptables", "iptables-restore", "ip6tables-restore", "setpriv", "node"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs iproute2 and iptables)"
    probe = f"fap-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        for tool in ("iptables", "ip6tables"):
            nat = subprocess.run(
                ["ip", "netns", "exec", probe, tool, "-t", "nat", "-L", "-n"],
                capture_output=True,
                text=True,
            )
            if nat.returncode != 0:
                return f"no {tool} nat table in a network namespace here: {nat.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=False)
    return why_uid_cannot_run_the_proxy(PROXY_UID)


REASON = _why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@dataclass
class Pod:
    ns: str
    client_ns: str
    store: Path

    def run(self, *args: str, user: int | None = None, ns: str | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", ns or self.ns]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return [*prefix, *args]


@pytest.fixture
def pod() -> Iterator[Pod]:
    tag = uuid.uuid4().hex[:6]
    ns, client = f"fap-pod-{tag}", f"fap-cli-{tag}"
    veth_pod, veth_client = f"vp{tag}", f"vc{tag}"
    sh("ip", "netns", "add", ns)
    sh("ip", "netns", "add", client)
    store = Path(tempfile.mkdtemp(prefix="fap-store-"))
    try:
        sh("ip", "link", "add", veth_pod, "type", "veth", "peer", "name", veth_client)
        sh("ip", "link", "set", veth_pod, "netns", ns)
        sh("ip", "link", "set", veth_client, "netns", client)
        for name, dev, v4, v6 in (
            (ns, veth_pod, POD_V4, POD_V6),
            (client, veth_client, CLIENT_V4, CLIENT_V6),
        ):
            sh("ip", "-n", name, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", name, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", name, "link", "set", dev, "up")
            sh("ip", "-n", name, "link", "set", "lo", "up")
        # Not under tmp_path: pytest's base directory is closed to other users.
        os.chown(store, PROXY_UID, PROXY_UID)
        yield Pod(ns=ns, client_ns=client, store=store)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "netns", "del", client], check=False)
        shutil.rmtree(store, ignore_errors=True)


def injected(annotations: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The init container's command and the sidecar's environment, as the injector makes
    them for the captured HAPI pod with its probes (local-only audit: no repository here)."""
    request = yaml.safe_load((ADMISSION / "restricted-hapi.yaml").read_text())["request"]
    request["object"]["metadata"]["annotations"] = {
        "fhir-audit-proxy/local-only": "true",
        **(annotations or {}),
    }
    defaults = WebhookSettings(image="fhir-audit-proxy:test")
    decision = decide(request["object"], request["namespace"], defaults, Selection.NAMESPACE)
    pod: dict[str, Any] = jsonpatch.apply_patch(request["object"], decision.patch)
    containers = {c["name"]: c for c in pod["spec"]["initContainers"]}
    command = containers[INIT]["command"] if INIT in containers else []
    env = {e["name"]: e["value"] for e in containers[SIDECAR]["env"] if "value" in e}
    return command, env


@dataclass
class Running:
    fhir: subprocess.Popen[str]
    proxy: subprocess.Popen[bytes]
    log: Path


def start(pod: Pod, env: dict[str, str]) -> Running:
    fhir = subprocess.Popen(
        pod.run("node", str(ROOT / "testserver" / "server.mjs"), str(FHIR_PORT), "0.0.0.0"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT / "testserver",
    )  # fmt: skip
    log = pod.store / "proxy.log"
    environment = {
        **os.environ,
        **env,
        # The emptyDir's path in the pod is the test's directory here.
        "FHIR_AUDIT_STORE__PATH": str(pod.store / "audit.db"),
        "FHIR_AUDIT_AUDIT__READ_BEFORE_DELETE": "false",
    }
    with log.open("wb") as sink:
        proxy = subprocess.Popen(
            pod.run(sys.executable, "-m", "proxy", "run", user=PROXY_UID),
            stdout=sink, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
        )  # fmt: skip
    running = Running(fhir=fhir, proxy=proxy, log=log)
    assert fhir.stdout is not None
    line = fhir.stdout.readline()
    assert line.startswith("listening "), line
    health = pod.run(
        sys.executable, "-m", "proxy.k8s.probe", "healthz", "--port", str(ADMIN_PORT),
        "--wait", "20",
    )  # fmt: skip
    if subprocess.run(health, cwd=ROOT).returncode != 0:
        stop(running)
        pytest.fail(f"proxy not healthy: {log.read_text()}")
    return running


def stop(running: Running) -> None:
    for process in (running.proxy, running.fhir):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if running.fhir.stdout is not None:
        running.fhir.stdout.close()


def install_redirect(pod: Pod, command: list[str]) -> None:
    assert command[:3] == ["python", "-m", "proxy.k8s.redirect"]
    redirect = pod.run(sys.executable, *command[1:])
    for _ in range(2):  # an init container may run again; the rules must not double
        subprocess.run(redirect, check=True, cwd=ROOT, capture_output=True)


CLIENT = """
import json, socket, sys, urllib.error, urllib.request as u
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3].encode() or None
if method == "CONNECT":
    host, port = url.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        print(json.dumps({"status": "connected"}))
    except OSError as exc:
        print(json.dumps({"status": type(exc).__name__}))
    sys.exit()
req = u.Request(url, method=method, data=body, headers={"Content-Type": "application/fhir+json"})
try:
    r = u.urlopen(req, timeout=10)
except urllib.error.HTTPError as error:
    r = error
raw = r.read()
print(json.dumps({"status": r.status, "request_id": r.headers.get("X-Request-Id"),
                  "body": json.loads(raw) if raw.startswith(b"{") else raw.decode()}))
"""


def client_call(pod: Pod, method: str, url: str, body: bytes | None = None) -> dict[str, Any]:
    """An HTTP call (or, for ``CONNECT``, a bare TCP connection, as a ``tcpSocket`` probe
    makes) from the client namespace: status, X-Request-Id, body."""
    out = sh(
        *pod.run(
            sys.executable, "-c", CLIENT, method, url, (body or b"").decode(), ns=pod.client_ns
        )
    )
    result: dict[str, Any] = orjson.loads(out)
    return result


def stored_events(pod: Pod) -> list[dict[str, Any]]:
    """The events of FHIR traffic in the sidecar's store (not those recording these very
    reads of the trail)."""
    url = f"http://127.0.0.1:{ADMIN_PORT}/fhir/AuditEvent?_count=100"
    script = (
        "import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1]).read().decode())"
    )
    bundle = orjson.loads(sh(*pod.run(sys.executable, "-c", script, url)))
    events = [entry["resource"] for entry in bundle.get("entry", [])]
    return [event for event in events if not is_admin_access(event)]


def request_ids(events: list[dict[str, Any]]) -> list[str]:
    ids = []
    for event in events:
        for entity in event["entity"]:
            if entity.get("type", {}).get("code") == "XrequestId":
                ids.append(entity["what"]["identifier"]["value"])
    return ids


def test_inbound_fhir_traffic_is_redirected_audited_and_not_looped_on_both_families(
    pod: Pod,
) -> None:
    command, env = injected()
    assert env["FHIR_AUDIT_LISTEN__HOST"] == "::"
    running = start(pod, env)
    try:
        fhir_url = f"http://{POD_V4}:{FHIR_PORT}/fhir/Patient"

        # Without the rules the FHIR port answers directly, unaudited: what the redirect fixes.
        before = client_call(pod, "POST", fhir_url, b'{"resourceType":"Patient"}')
        assert before["status"] == 201 and before["request_id"] is None
        assert stored_events(pod) == []

        install_redirect(pod, command)
        for tool, chains in (("iptables-save", 1), ("ip6tables-save", 1)):
            rules = sh(*pod.run(tool, "-t", "nat"))
            assert rules.count("-j FHIR_AUDIT_INBOUND") == chains
            assert rules.count("-j FHIR_AUDIT_OUTPUT") == chains
            assert f"--uid-owner {PROXY_UID} -j RETURN" in rules

        # From another namespace, to the FHIR port: through the proxy, audited once.
        created = client_call(pod, "POST", fhir_url, b'{"resourceType":"Patient"}')
        assert created["status"] == 201
        patient_id = created["body"]["id"]
        read = client_call(pod, "GET", f"{fhir_url}/{patient_id}")
        assert read["status"] == 200 and read["body"]["id"] == patient_id
        # Over IPv6, to the pod's IPv6 address: redirected by ip6tables, and the proxy
        # listens there too.
        read6 = client_call(pod, "GET", f"http://[{POD_V6}]:{FHIR_PORT}/fhir/Patient/{patient_id}")
        assert read6["status"] == 200 and read6["body"]["id"] == patient_id
        assert read6["request_id"] is not None
        # From inside the pod, as another user (root), to localhost: redirected too.
        show_request_id = (
            "import sys, urllib.request as u\nprint(u.urlopen(sys.argv[1]).headers['X-Request-Id'])"
        )
        local_url = f"http://127.0.0.1:{FHIR_PORT}/fhir/Patient/{patient_id}"
        local = sh(*pod.run(sys.executable, "-c", show_request_id, local_url)).strip()

        events = stored_events(pod)
        # The proxy's own upstream connections (UID exempt) reached the FHIR server:
        # had they looped, each request would have been audited again and again.
        expected = [created["request_id"], read["request_id"], read6["request_id"], local]
        assert sorted(request_ids(events)) == sorted(map(str, expected))
        assert len(events) == 4
        assert {e["action"] for e in events} == {"C", "R"}
    finally:
        stop(running)


def test_probes_reach_the_app_not_the_proxy_and_fail_when_the_fhir_server_is_dead(
    pod: Pod,
) -> None:
    command, env = injected()
    assert set(orjson.loads(env["FHIR_AUDIT_STATUS__APP_PROBES"])) == {
        "hapi/startupz",
        "hapi/readyz",
        "hapi/livez",
    }
    running = start(pod, env)
    try:
        install_redirect(pod, command)
        status = f"http://{POD_V4}:{STATUS_PORT}/app-health/hapi"
        old_http = f"http://{POD_V4}:{FHIR_PORT}/fhir/metadata"
        old_tcp = f"{POD_V4}:{FHIR_PORT}"

        # The kubelet's probes as injected pods had them: an httpGet on the FHIR port is
        # proxied and audited; the rewritten ones are not.
        assert client_call(pod, "GET", old_http)["status"] == 200
        audited = len(stored_events(pod))
        assert audited == 1
        for probe in ("readyz", "livez", "startupz"):
            assert client_call(pod, "GET", f"{status}/{probe}") == {
                "status": 200,
                "request_id": None,
                "body": "ok\n",
            }
        # Over IPv6 too (an IPv6 cluster's kubelet probes the pod's IPv6 address).
        v6 = client_call(pod, "GET", f"http://[{POD_V6}]:{STATUS_PORT}/app-health/hapi/readyz")
        assert v6["status"] == 200
        assert len(stored_events(pod)) == audited

        # The FHIR server dies; the proxy lives on.
        running.fhir.send_signal(signal.SIGKILL)
        running.fhir.wait(timeout=10)
        # The old tcpSocket probe still succeeds (the proxy accepts the connection): the
        # defect. The rewritten probes fail, so the kubelet restarts or unreadies the app.
        assert client_call(pod, "CONNECT", old_tcp)["status"] == "connected"
        ready = client_call(pod, "GET", f"{status}/readyz")
        assert ready["status"] == 503
        assert ready["body"] == "GET /fhir/metadata on port 8080: ClientConnectorError\n"
        live = client_call(pod, "GET", f"{status}/livez")
        assert (live["status"], live["body"]) == (503, "port 8080: ConnectionRefusedError\n")
        # Prometheus scrapes the sidecar's metrics from the pod's address.
        metrics = client_call(pod, "GET", f"http://{POD_V4}:{STATUS_PORT}/metrics")
        assert metrics["status"] == 200
        assert "fhir_audit_requests_total" in metrics["body"]
        # And the admin API stays out of reach from outside the pod.
        admin = client_call(pod, "CONNECT", f"{POD_V4}:{ADMIN_PORT}")
        assert admin["status"] == "ConnectionRefusedError"
    finally:
        stop(running)
    assert "Traceback" not in running.log.read_text()


def test_takeover_needs_no_rules_and_the_proxy_port_answers_on_both_families(pod: Pod) -> None:
    command, env = injected({"fhir-audit-proxy/traffic": "takeover"})
    assert command == []
    running = start(pod, env)
    try:
        for host in (POD_V4, f"[{POD_V6}]"):
            answer = client_call(pod, "GET", f"http://{host}:{PROXY_PORT}/fhir/metadata")
            assert answer["status"] == 200 and answer["request_id"] is not None
        assert len(stored_events(pod)) == 2
        assert sh(*pod.run("iptables-save", "-t", "nat")).count("FHIR_AUDIT") == 0
    finally:
        stop(running)
