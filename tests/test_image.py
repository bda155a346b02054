"""The image as the Dockerfile defines it: pinned base, non-root, signal handling, and
defaults that cannot expose the admin API (what `docker run IMAGE` gets with no config)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from proxy.settings import load_settings
from tests.factories import free_port, why_uid_cannot_run_the_proxy

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
        for ln in lines[last_from:]
    ]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in final_stage():
        if instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_base_is_pinned_by_digest() -> None:
    (arg,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", arg)
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def test_runs_as_a_numeric_non_root_user_under_tini() -> None:
    stage = dict(final_stage())
    user = stage["USER"].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user)
    assert stage["ENTRYPOINT"] == '["tini", "--", "fhir-audit-proxy"]'
    assert stage["CMD"] == '["run"]'


def test_defaults_keep_the_admin_api_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FHIR_AUDIT_")]:
        monkeypatch.delenv(key)
    for key, value in image_env().items():
        monkeypatch.setenv(key, value)
    settings = load_settings(None)
    assert settings.admin.host == "127.0.0.1"
    assert settings.admin.tokens == ()
    assert str(settings.store.path).startswith("/var/lib/fhir-audit-proxy/")
    exposed = [rest for instruction, rest in final_stage() if instruction == "EXPOSE"]
    assert exposed == [str(settings.listen.port)]
    assert str(settings.admin.port) not in " ".join(exposed)


def test_no_bytecode_is_written_on_a_read_only_root() -> None:
    assert image_env()["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "/var/lib/fhir-audit-proxy" in dict(final_stage())["VOLUME"]


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "mount and network namespaces need root"
    for tool in ("unshare", "setpriv", "tini", "node", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs tini, iproute2)"
    return why_uid_cannot_run_the_proxy(10001)


# Runs inside fresh mount and network namespaces: the root filesystem read-only, a scratch
# directory (the image's /tmp, named by TMPDIR) and the store on tmpfs (the image's
# volumes), the proxy as UID 10001 under tini with the image's environment, then SIGTERM
# to tini. /tmp itself is left alone: the checkout under test may live there.
READ_ONLY_POD = r"""
set -eu
ip link set lo up
mount --make-rprivate /
mount -o remount,bind,ro /
mount -t tmpfs -o mode=1777 tmpfs "$TMPDIR"
mount -t tmpfs -o uid=10001,gid=10001,mode=0700 tmpfs "$STORE_DIR"
if touch "$ROOT/.write-probe" 2>/dev/null; then echo "root is writable"; exit 3; fi
cd "$ROOT/testserver"
node server.mjs 8081 127.0.0.1 > "$TMPDIR/fhir.log" 2>&1 &
NODE=$!
trap 'kill "$NODE" 2>/dev/null || true' EXIT
cd "$ROOT"
# tini outside setpriv: this machine's Python lives under /root, which UID 10001 can
# reach only through setpriv's own exec; in the image it is /usr/local/bin/python.
tini -s -- setpriv --reuid=10001 --regid=10001 --clear-groups \
  "$PYTHON" -m proxy run 2> "$TMPDIR/proxy.log" &
TINI=$!
"$PYTHON" -m proxy.k8s.probe readyz --port 9000 --wait 30 \
  || { cat "$TMPDIR/proxy.log" "$TMPDIR/fhir.log"; exit 4; }
"$PYTHON" -c '
import urllib.request as u
r = u.urlopen(u.Request("http://127.0.0.1:8080/fhir/Patient", method="POST",
    data=b"{\"resourceType\":\"Patient\"}", headers={"Content-Type": "application/fhir+json"}))
print("status", r.status)
'
kill -TERM "$TINI"
wait "$TINI" && echo "exit 0" || echo "exit $?"
echo "delivered $(wc -l < "$STORE_DIR/repository.ndjson")"
grep -c -i "read-only" "$TMPDIR/proxy.log" || true
"""


@pytest.mark.skipif(_why_no_namespaces() is not None, reason=_why_no_namespaces() or "")
def test_read_only_root_under_tini_serves_and_drains_on_sigterm() -> None:
    store = Path(tempfile.mkdtemp(prefix="fap-ro-", dir="/var/tmp"))
    scratch = Path(tempfile.mkdtemp(prefix="fap-tmp-", dir="/var/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")},
        **image_env(),
        "FHIR_AUDIT_STORE__PATH": str(store / "audit.db"),
        "FHIR_AUDIT_UPSTREAM__URL": "http://127.0.0.1:8081/fhir",
        # Delivered only by the final drain on SIGTERM, not by the periodic flush.
        "FHIR_AUDIT_REPOSITORY__URL": str(store / "repository.ndjson"),
        "FHIR_AUDIT_REPOSITORY__MODE": "file",
        "FHIR_AUDIT_REPOSITORY__FLUSH_INTERVAL_MS": "600000",
        "FHIR_AUDIT_REPOSITORY__MAX_FLUSH_INTERVAL_MS": "600000",
        "STORE_DIR": str(store),
        "TMPDIR": str(scratch),
        "ROOT": str(ROOT),
        "PYTHON": sys.executable,
    }
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--net", "sh", "-c", READ_ONLY_POD],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    out = result.stdout.split("\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert out[:4] == ["status 201", "exit 0", "delivered 1", "0"], result.stdout + result.stderr


def test_the_healthcheck_probes_the_admin_port_the_container_is_given() -> None:
    healthcheck = dict(final_stage())["HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:3] == ["python", "-m", "proxy.k8s.probe"]

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")}
        # An injected sidecar's admin port: what the HEALTHCHECK must follow.
        env["FHIR_AUDIT_ADMIN__PORT"] = str(port)
        checked = subprocess.run([sys.executable, *command[1:]], env=env, cwd=ROOT, timeout=30)
        assert checked.returncode == 0
        env["FHIR_AUDIT_ADMIN__PORT"] = str(free_port())
        missed = subprocess.run([sys.executable, *command[1:]], env=env, cwd=ROOT, timeout=30)
        assert missed.returncode == 1
    finally:
        server.shutdown()
        server.server_close()


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out, by the rules of .dockerignore: the
    last pattern that matches the path or one of its parent directories wins, ``!``
    keeps, ``**`` matches any number of directories."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not keep
    return ignored


def test_the_build_context_holds_what_the_build_copies_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    copied = [
        source
        for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M)
        for source in line.split()[:-1]
    ]
    assert "proxy" in copied
    # Every file the build copies is in the context (a directory: the files below it).
    for source in copied:
        files = (
            [source]
            if (ROOT / source).is_file()
            else [str(f.relative_to(ROOT)) for f in (ROOT / source).rglob("*") if f.is_file()]
        )
        for kept in files:
            # A development tree's own builds (bytecode, mypyc's extension modules built in
            # place by scripts/setup) are not sources: the image compiles its own.
            if "__pycache__" not in kept and not kept.endswith(".so"):
                assert not dockerignored(kept, patterns), kept
    for left_out in [
        ".venv/bin/python",
        ".git/HEAD",
        "data/audit.db",
        "tests/test_image.py",
        "testserver/node_modules/x/index.js",
        "proxy/__pycache__/cli.cpython-311.pyc",
        "proxy/audit/ids.cpython-311-x86_64-linux-gnu.so",
        "helm/fhir-audit-proxy/values.yaml",
    ]:
        assert dockerignored(left_out, patterns), left_out
