"""The transparent redirect, for real, in Linux network namespaces made here: a "pod"
namespace runs the test FHIR server (on all addresses, as in a pod) and the proxy as its
own UID, with the rules the injected init container installs (the same module, run the
same way); a "client" namespace on the other end of a veth pair calls the FHIR port.

Fixed ports inside the pod namespace are safe: it is private to this test, like a pod's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.factories import why_uid_cannot_run_the_proxy

ROOT = Path(__file__).resolve().parents[2]
FHIR_PORT = 8080
PROXY_PORT = 15080
ADMIN_PORT = 15090
PROXY_UID = 10001


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "iptables", "iptables-restore", "setpriv", "node"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs iproute2 and iptables)"
    probe = f"fap-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        nat = subprocess.run(
            ["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"],
            capture_output=True,
            text=True,
        )
        if nat.returncode != 0:
            return f"no nat table in a network namespace here: {nat.stderr.strip()}"
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
    address: str
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
    try:
        sh("ip", "link", "add", veth_pod, "type", "veth", "peer", "name", veth_client)
        sh("ip", "link", "set", veth_pod, "netns", ns)
        sh("ip", "link", "set", veth_client, "netns", client)
        for name, dev, addr in (
            (ns, veth_pod, "10.213.0.1/24"),
            (client, veth_client, "10.213.0.2/24"),
        ):
            sh("ip", "-n", name, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", name, "link", "set", dev, "up")
            sh("ip", "-n", name, "link", "set", "lo", "up")
        # Not under tmp_path: pytest's base directory is closed to other users.
        store = Path(tempfile.mkdtemp(prefix="fap-store-"))
        os.chown(store, PROXY_UID, PROXY_UID)
        yield Pod(ns=ns, client_ns=client, address="10.213.0.1", store=store)
        shutil.rmtree(store, ignore_errors=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "netns", "del", client], check=False)


def wait_for_line(process: subprocess.Popen[str], needle: str) -> str:
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} never printed: {''.join(seen)}")


def client_call(pod: Pod, method: str, url: str, body: bytes | None = None) -> dict[str, object]:
    """An HTTP call from the client namespace: status, X-Request-Id, body."""
    script = (
        "import sys, json, urllib.request as u\n"
        "req = u.Request(sys.argv[2], method=sys.argv[1], data=sys.argv[3].encode() or None,"
        " headers={'Content-Type': 'application/fhir+json'})\n"
        "r = u.urlopen(req, timeout=10)\n"
        "print(json.dumps({'status': r.status, 'request_id': r.headers.get('X-Request-Id'),"
        " 'body': json.loads(r.read() or b'null')}))\n"
    )
    out = sh(
        *pod.run(
            sys.executable, "-c", script, method, url, (body or b"").decode(), ns=pod.client_ns
        )
    )
    result: dict[str, object] = orjson.loads(out)
    return result


def stored_events(pod: Pod) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{ADMIN_PORT}/fhir/AuditEvent?_count=100"
    script = (
        "import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1]).read().decode())"
    )
    bundle = orjson.loads(sh(*pod.run(sys.executable, "-c", script, url)))
    return [entry["resource"] for entry in bundle.get("entry", [])]


def request_ids(events: list[dict[str, object]]) -> list[str]:
    ids = []
    for event in events:
        for entity in event["entity"]:  # type: ignore[attr-defined]
            if entity.get("type", {}).get("code") == "XrequestId":
                ids.append(entity["what"]["identifier"]["value"])
    return ids


def test_inbound_fhir_traffic_is_redirected_audited_and_not_looped(pod: Pod) -> None:
    fhir = subprocess.Popen(
        pod.run("node", str(ROOT / "testserver" / "server.mjs"), str(FHIR_PORT), "0.0.0.0"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT / "testserver",
    )  # fmt: skip
    env = {
        **os.environ,
        "FHIR_AUDIT_LISTEN__HOST": "0.0.0.0",
        "FHIR_AUDIT_LISTEN__PORT": str(PROXY_PORT),
        "FHIR_AUDIT_UPSTREAM__URL": f"http://127.0.0.1:{FHIR_PORT}/fhir",
        "FHIR_AUDIT_ADMIN__HOST": "127.0.0.1",
        "FHIR_AUDIT_ADMIN__PORT": str(ADMIN_PORT),
        "FHIR_AUDIT_STORE__PATH": str(pod.store / "audit.db"),
        "FHIR_AUDIT_AUDIT__READ_BEFORE_DELETE": "false",
    }
    proxy = subprocess.Popen(
        pod.run(sys.executable, "-m", "proxy", "run", user=PROXY_UID),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_for_line(fhir, "listening ")
        wait_for_line(proxy, "proxy on 0.0.0.0")
        health = pod.run(
            sys.executable,
            "-m",
            "proxy.k8s.probe",
            "healthz",
            "--port",
            str(ADMIN_PORT),
            "--wait",
            "20",
        )
        if subprocess.run(health, cwd=ROOT).returncode != 0:
            proxy.terminate()
            pytest.fail(f"proxy not healthy: {proxy.communicate(timeout=10)[0]}")
        fhir_url = f"http://{pod.address}:{FHIR_PORT}/fhir/Patient"

        # Without the rules the FHIR port answers directly, unaudited: what the redirect fixes.
        before = client_call(pod, "POST", fhir_url, b'{"resourceType":"Patient"}')
        assert before["status"] == 201 and before["request_id"] is None
        assert stored_events(pod) == []

        redirect = pod.run(
            sys.executable, "-m", "proxy.k8s.redirect", "--fhir-port", str(FHIR_PORT),
            "--proxy-port", str(PROXY_PORT), "--proxy-uid", str(PROXY_UID),
        )  # fmt: skip
        for _ in range(2):  # an init container may run again; the rules must not double
            subprocess.run(redirect, check=True, cwd=ROOT, capture_output=True)
        rules = sh(*pod.run("iptables-save", "-t", "nat"))
        assert rules.count("-j FHIR_AUDIT_INBOUND") == 1
        assert rules.count("-j FHIR_AUDIT_OUTPUT") == 1
        assert f"--uid-owner {PROXY_UID} -j RETURN" in rules

        # From another namespace, to the FHIR port: through the proxy, audited once.
        created = client_call(pod, "POST", fhir_url, b'{"resourceType":"Patient"}')
        assert created["status"] == 201
        patient_id = created["body"]["id"]  # type: ignore[index]
        read = client_call(pod, "GET", f"{fhir_url}/{patient_id}")
        assert read["status"] == 200 and read["body"]["id"] == patient_id  # type: ignore[index]
        # From inside the pod, as another user (root), to localhost: redirected too.
        show_request_id = (
            "import sys, urllib.request as u\nprint(u.urlopen(sys.argv[1]).headers['X-Request-Id'])"
        )
        local_url = f"http://127.0.0.1:{FHIR_PORT}/fhir/Patient/{patient_id}"
        local = sh(*pod.run(sys.executable, "-c", show_request_id, local_url)).strip()

        events = stored_events(pod)
        ids = request_ids(events)
        # The proxy's own upstream connections (UID exempt) reached the FHIR server:
        # had they looped, each request would have been audited again and again.
        assert sorted(ids) == sorted([str(created["request_id"]), str(read["request_id"]), local])
        assert len(events) == 3
        assert {e["action"] for e in events} == {"C", "R"}
    finally:
        for process in (proxy, fhir):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.stdout is not None:
                process.stdout.close()
