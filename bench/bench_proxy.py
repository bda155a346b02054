"""What auditing costs on the hot path, next to the same stack without it.

Runs, in one script and on one machine: nginx serving canned FHIR JSON as the upstream,
then the same load (wrk) against (a) a bare aiohttp pass-through (``plain_proxy.py``: the
same Python stack with no audit, so the ratio to it is what auditing costs), (b)
fhir-audit-proxy, auditing every request with a durable fsync'd commit, and (c) mitmproxy
11 in reverse mode with a minimal audit add-on (one JSON line per flow, flushed),
installed into ``bench/.venv-mitm`` on first use. Four requests, each at two
concurrencies:

- ``GET Patient/1`` (one PatientRead event),
- the same with ``Authorization: Bearer`` an RS256 JWT, which the proxy verifies against
  the JWKS nginx serves (``audit.identity.jwks_url``): the read of a SMART client,
- ``GET Observation?patient=1`` answering a searchset of 10 Observations of 7 patients
  (7 events, one per patient),
- ``POST Observation`` (an intent committed before forwarding, the event after).

Then the memory scenario: 200 concurrent clients downloading a ~5 MB search Bundle
through the proxy; the proxy's resident memory before, at its peak (``VmHWM``) and after.

    python bench/bench_proxy.py [--seconds 5] [--connections 32 64] [--no-mitm] [--no-memory]
                                [--before DIR] [--workers N] [--repeat N]

``--before DIR`` runs a second fhir-audit-proxy from another source tree (say ``git archive
REV proxy | tar -x -C DIR``) through the same load, so a change is measured in one run.
``--workers N`` runs fhir-audit-proxy a second time with ``workers: N`` in its configuration
(N processes on one port, a store shard each) through the same load, and reports its
scaling over the one-worker proxy.

Needs Debian's ``wrk`` and ``nginx`` (``apt-get install wrk nginx-light``). Ratios in one
run are what count: the machine's load moves absolute figures between runs. ``--repeat N``
measures every target N times, interleaved, and reports medians.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MITM_VENV = ROOT / "bench" / ".venv-mitm"
MITM_VERSION = "mitmproxy==11.0.2"

PATIENT = {
    "resourceType": "Patient",
    "id": "1",
    "meta": {"versionId": "3", "lastUpdated": "2026-11-01T10:00:00Z"},
    "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
    "gender": "male",
    "birthDate": "1974-12-25",
}


def observation(i: int, patient: int) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "id": f"obs-{i}",
        "meta": {"versionId": "1", "lastUpdated": "2026-11-01T10:00:00Z"},
        "status": "final",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]
        },
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-11-01T09:30:00Z",
        "valueQuantity": {
            "value": 60 + i % 40,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def searchset(n: int, patients: int) -> dict[str, object]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": n,
        "entry": [
            {
                "fullUrl": f"http://fhir/Observation/obs-{i}",
                "resource": observation(i, 1 + i % patients),
                "search": {"mode": "match"},
            }
            for i in range(n)
        ],
    }


CREATED = observation(0, 1) | {"id": "new-1"}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{upstream};
    default_type application/fhir+json;
    location = /fhir/Observation {{
      if ($request_method = POST) {{
        add_header Location "http://127.0.0.1:{upstream}/fhir/Observation/new-1/_history/1";
        return 201 '{created}';
      }}
      alias {dir}/www/Observation;
    }}
    location /fhir/ {{ alias {dir}/www/; try_files $uri =404; }}
  }}
}}
"""

MITM_ADDON = '''
"""A minimal audit add-on: one JSON line per answered flow, written and flushed."""
import json, os, time

class Audit:
    def __init__(self):
        self.out = open(os.environ["AUDIT_LOG"], "a")

    def response(self, flow):
        self.out.write(json.dumps({
            "t": time.time(), "method": flow.request.method, "path": flow.request.path,
            "status": flow.response.status_code, "client": flow.client_conn.peername[0],
        }) + "\\n")
        self.out.flush()

addons = [Audit()]
'''

JWT_LUA = """
wrk.headers["Authorization"] = "Bearer {token}"
"""


def signed_token(www: Path) -> str:
    """An RS256 JWT valid for a day, its public key written to ``www/jwks.json``."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    public |= {"kid": "bench", "alg": "RS256", "use": "sig"}
    (www / "jwks.json").write_text(json.dumps({"keys": [public]}))
    now = int(time.time())
    claims = {
        "iss": "https://idp.example.org",
        "sub": "dr-who",
        "name": "Dr Who",
        "client_id": "ehr-app",
        "scope": "user/*.read openid",
        "iat": now,
        "exp": now + 86400,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"})


POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.body = [[{body}]]
"""


@dataclass(frozen=True)
class Request:
    name: str
    path: str
    script: str | None = None


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    errors: int
    cpu_us: float = float("nan")
    """CPU time of the target's processes (every thread, and child processes such as
    the store's writer) per request answered: it moves less with the machine's load
    than requests/s do."""


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU time so far of ``pids`` and all their descendants."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            total += cpu_seconds([int(c) for c in children])
    return total


def median_result(runs: Sequence[Result]) -> Result:
    """Each figure's median over ``runs`` (non-2xx and errors: their sum)."""
    return Result(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        non2xx=sum(r.non2xx for r in runs),
        errors=sum(r.errors for r in runs),
        cpu_us=statistics.median(r.cpu_us for r in runs),
    )


def measured(
    url: str, seconds: int, connections: int, script: str | None, pids: Sequence[int]
) -> Result:
    """:func:`wrk` with the CPU the target spent per request."""
    before = cpu_seconds(pids)
    result = wrk(url, seconds, connections, script)
    spent = cpu_seconds(pids) - before
    answered = result.rps * seconds
    return dataclasses.replace(result, cpu_us=spent / answered * 1e6 if answered else float("nan"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def wrk(url: str, seconds: int, connections: int, script: str | None = None) -> Result:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "--latency"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        match = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*?(\d+).*?(\d+).*?(\d+).*?(\d+)", out)
    return Result(
        rps=rps,
        p50_ms=ms("50"),
        p99_ms=ms("99"),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def listeners(port: int) -> int:
    """Sockets listening on loopback ``port``."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1] == f"0100007F:{port:04X}" and r.split()[3] == "0A")


def all_serving(port: int, store: Path, workers: int) -> bool:
    """Every worker of the proxy on ``port`` with ``store`` serves: as its supervisor
    reports beside the store, or, for a version before that report (whose workers bind
    the port themselves), once ``workers`` sockets listen on the port."""
    try:
        report = json.loads(store.with_suffix(".workers.json").read_text())
    except FileNotFoundError:
        return listeners(port) >= workers
    return all(worker["serving"] for worker in report["workers"])


def proxy_config(
    path: Path, port: int, admin: int, upstream: int, store: Path, **more: object
) -> Path:
    """Write a fhir-audit-proxy configuration for the bench (JSON is YAML) to ``path``."""
    path.write_text(
        json.dumps(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "admin": {"host": "127.0.0.1", "port": admin},
                "upstream": {"url": f"http://127.0.0.1:{upstream}/fhir"},
                # Room for every event of a run (millions): a full store fails requests.
                "store": {"path": str(store / "audit.db"), "max_bytes": 32 << 30},
                # The bench's tokens are checked against the key nginx serves.
                "audit": {"identity": {"jwks_url": f"http://127.0.0.1:{upstream}/fhir/jwks.json"}},
                "log_level": "WARNING",
                **more,
            }
        )
    )
    return path


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of the proxy, in KiB, plus the memory of its
    child processes (its store's writer) that is their own (``RssAnon``, now): the
    interpreter and libraries they map are the proxy's pages too, counted once."""
    total = _status_kib(pid, field)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        with contextlib.suppress(OSError):
            total += _status_kib(int(child), "RssAnon")
    return total


def ensure_mitmproxy() -> Path:
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if not mitmdump.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True)
        subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", MITM_VERSION], check=True)
    return mitmdump


@contextlib.contextmanager
def running(cmd: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each target this many times, interleaved, and report the median of"
        " each figure (this machine's speed drifts between runs)",
    )
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--requests", nargs="+", default=["read", "read-jwt", "search", "create"])
    parser.add_argument(
        "--before",
        type=Path,
        help="a source tree of an earlier fhir-audit-proxy (its proxy/ package) to run"
        " side by side as 'before', so a change is measured in the same run",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also run fhir-audit-proxy with 'workers: N' through the same load (N >= 2)",
    )
    parser.add_argument("--no-mitm", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-clients", type=int, default=200)
    parser.add_argument("--memory-seconds", type=int, default=10)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed: apt-get install wrk nginx-light")
    mitmdump = None if args.no_mitm else ensure_mitmproxy()

    requests = {
        "read": Request("GET Patient/1", "/fhir/Patient/1"),
        "read-jwt": Request("GET Patient/1, RS256 JWT", "/fhir/Patient/1", "jwt.lua"),
        "search": Request("GET Observation?patient=1 (7 patients)", "/fhir/Observation?patient=1"),
        "create": Request("POST Observation", "/fhir/Observation", "post.lua"),
    }
    chosen = [requests[r] for r in args.requests]

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # nginx's workers run as another user and must read www/
        www = d / "www"
        (www / "Patient").mkdir(parents=True)
        (www / "Patient" / "1").write_text(json.dumps(PATIENT))
        (www / "Observation").write_text(json.dumps(searchset(10, 7)))
        big = json.dumps(searchset(10000, 5))
        (www / "Big").write_text(big)
        (d / "post.lua").write_text(POST_LUA.format(body=json.dumps(observation(0, 1))))
        (d / "jwt.lua").write_text(JWT_LUA.format(token=signed_token(www)))
        upstream, plain, proxy_port, admin_port, mitm_port, before_port, before_admin = (
            free_port() for _ in range(7)
        )
        workers_port, workers_admin, plain_many = free_port(), free_port(), free_port()
        (d / "nginx.conf").write_text(
            NGINX_CONF.format(dir=d, upstream=upstream, created=json.dumps(CREATED))
        )
        # The Merkle log's checkpoints signed as a deployment signs them (once a second
        # here, the worst the settings allow in practice): its leaves are always made.
        key = d / "log.key"
        keygen = ["log", "keygen", "--name", "bench.example/log", "--out", str(key)]
        subprocess.run(
            [sys.executable, "-m", "proxy", *keygen],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        signed = {"log": {"key_file": str(key), "checkpoint_interval_s": 1.0}}
        config = proxy_config(
            d / "proxy.yaml", proxy_port, admin_port, upstream, d / "store", **signed
        )
        targets: dict[str, int] = {"bare aiohttp": plain, "fhir-audit-proxy": proxy_port}
        if args.before is not None:
            before_config = proxy_config(
                d / "before.yaml", before_port, before_admin, upstream, d / "before"
            )
            targets["before"] = before_port
        if args.workers:
            workers_config = proxy_config(
                d / "workers.yaml",
                workers_port,
                workers_admin,
                upstream,
                d / "workers",
                workers=args.workers,
            )
            targets["workers"] = workers_port
            targets["bare aiohttp, N processes"] = plain_many
        with contextlib.ExitStack() as stack:
            stack.enter_context(running(["nginx", "-c", str(d / "nginx.conf")]))
            proxy = stack.enter_context(
                running([sys.executable, "-m", "proxy", "-c", str(config), "run"], cwd=ROOT)
            )
            pids = {"fhir-audit-proxy": [proxy.pid]}
            bare_one = stack.enter_context(
                running(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "plain_proxy.py"),
                        f"http://127.0.0.1:{upstream}",
                        str(plain),
                    ]
                )
            )
            pids["bare aiohttp"] = [bare_one.pid]
            before = None
            if args.before is not None:
                before = stack.enter_context(
                    running(
                        [sys.executable, "-m", "proxy", "-c", str(before_config), "run"],
                        cwd=args.before,
                    )
                )
                pids["before"] = [before.pid]
            if args.workers:
                supervisor = stack.enter_context(
                    running(
                        [sys.executable, "-m", "proxy", "-c", str(workers_config), "run"], cwd=ROOT
                    )
                )
                pids["workers"] = [supervisor.pid]
                pids["bare aiohttp, N processes"] = []
                for _ in range(args.workers):  # the bare stack scaled the same way
                    bare_n = stack.enter_context(
                        running(
                            [
                                sys.executable,
                                str(ROOT / "bench" / "plain_proxy.py"),
                                f"http://127.0.0.1:{upstream}",
                                str(plain_many),
                            ]
                        )
                    )
                    pids["bare aiohttp, N processes"].append(bare_n.pid)
            if mitmdump is not None:
                (d / "audit_addon.py").write_text(MITM_ADDON)
                mitm = stack.enter_context(
                    running(
                        [
                            str(mitmdump),
                            "-q",
                            "--mode",
                            f"reverse:http://127.0.0.1:{upstream}",
                            "--listen-host",
                            "127.0.0.1",
                            "-p",
                            str(mitm_port),
                            "-s",
                            str(d / "audit_addon.py"),
                            "--set",
                            f"confdir={d / 'mitm'}",
                        ],
                        env={**os.environ, "AUDIT_LOG": str(d / "mitm-audit.jsonl")},
                    )
                )
                targets["mitmproxy reverse+audit"] = mitm_port
                pids["mitmproxy reverse+audit"] = [mitm.pid]
            for port in targets.values():
                wait_http(f"http://127.0.0.1:{port}/fhir/Patient/1")
            deadline = time.monotonic() + 30
            while args.workers and not (
                all_serving(workers_port, d / "workers" / "audit.db", args.workers)
                and listeners(plain_many) >= args.workers
            ):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{args.workers} workers did not all listen")
                time.sleep(0.1)

            load_before = load_average()
            results: dict[tuple[str, int, str], Result] = {}
            for req in chosen:
                script = str(d / req.script) if req.script else None
                for c in args.connections:
                    runs: dict[str, list[Result]] = {}
                    for _ in range(args.repeat):  # interleaved: each target sees the same noise
                        for name, port in targets.items():
                            if name.startswith("mitmproxy") and c != args.connections[-1]:
                                continue  # one concurrency is enough for the slow peer
                            url = f"http://127.0.0.1:{port}{req.path}"
                            wrk(url, 1, c, script)  # warm-up
                            runs.setdefault(name, []).append(
                                measured(url, args.seconds, c, script, pids[name])
                            )
                    for name, measured_runs in runs.items():
                        results[(req.name, c, name)] = median_result(measured_runs)
            with urllib.request.urlopen(
                f"http://127.0.0.1:{admin_port}/fhir/AuditEvent?_count=1"
            ) as r:
                audited = json.load(r)["total"]

            memory: dict[str, dict[str, float]] = {}
            pids = {"fhir-audit-proxy": (proxy.pid, proxy_port)}
            if before is not None:
                pids["before"] = (before.pid, before_port)
            for name, (pid, port) in [] if args.no_memory else pids.items():
                memory[name] = memory_scenario(
                    pid,
                    f"http://127.0.0.1:{port}/fhir/Big",
                    args.memory_clients,
                    args.memory_seconds,
                )
                memory[name]["size_mb"] = len(big) / 1e6
            load_after = load_average()

    report(args, chosen, targets, results, audited, memory, load_before, load_after)


def memory_scenario(pid: int, url: str, clients: int, seconds: int) -> dict[str, float]:
    """Peak and settled RSS of the proxy while ``clients`` download a large body at once."""
    before = rss_kib(pid, "VmRSS")
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib(pid, "VmRSS"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = wrk(url, seconds, clients)
    finally:
        stop.set()
        sampler.join()
    time.sleep(1)
    return {
        "before_mb": before / 1024,
        "peak_mb": max(peak, rss_kib(pid, "VmHWM")) / 1024,
        "after_mb": rss_kib(pid, "VmRSS") / 1024,
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "non2xx": result.non2xx,
        "errors": result.errors,
    }


def report(
    args: argparse.Namespace,
    chosen: list[Request],
    targets: dict[str, int],
    results: dict[tuple[str, int, str], Result],
    audited: int,
    memory: dict[str, dict[str, float]],
    load_before: str,
    load_after: str,
) -> None:
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, wrk -t1"
        f" -d{args.seconds}s after a 1 s warm-up"
        + (f", median of {args.repeat} interleaved runs" if args.repeat > 1 else "")
        + f"; load average {load_before} -> {load_after}"
    )
    print()
    print(
        "| request | -c | bare aiohttp | fhir-audit-proxy | ratio | p50 added | p99 added"
        " | CPU µs/request, bare / proxy | mitmproxy + audit | x mitmproxy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for req in chosen:
        mitm = results.get((req.name, args.connections[-1], "mitmproxy reverse+audit"))
        for c in args.connections:
            bare = results[(req.name, c, "bare aiohttp")]
            ours = results[(req.name, c, "fhir-audit-proxy")]
            bad = ours.non2xx + ours.errors + bare.non2xx + bare.errors
            mitm_cells = (
                f"{mitm.rps:,.0f} | {ours.rps / mitm.rps:.1f}x"
                if mitm is not None and c == args.connections[-1]
                else " | "
            )
            print(
                f"| `{req.name}` | {c} | {bare.rps:,.0f}, p50 {bare.p50_ms:.1f} ms"
                f" | {ours.rps:,.0f}, p50 {ours.p50_ms:.1f} ms | {ours.rps / bare.rps:.2f}"
                f" | {ours.p50_ms - bare.p50_ms:+.1f} ms | {ours.p99_ms - bare.p99_ms:+.1f} ms"
                f" | {bare.cpu_us:.0f} / {ours.cpu_us:.0f}"
                f" | {mitm_cells} |" + (f" ({bad} non-2xx/errors)" if bad else "")
            )
    if "before" in targets:
        print()
        print(
            "| request | -c | before | ratio before | after | ratio after"
            " | CPU µs/request, before / after |"
        )
        print("|---|---|---|---|---|---|---|")
        for req in chosen:
            for c in args.connections:
                bare = results[(req.name, c, "bare aiohttp")]
                ours = results[(req.name, c, "fhir-audit-proxy")]
                old = results[(req.name, c, "before")]
                print(
                    f"| `{req.name}` | {c}"
                    f" | {old.rps:,.0f}, p50 {old.p50_ms:.1f} ms, p99 {old.p99_ms:.1f} ms"
                    f" | {old.rps / bare.rps:.2f}"
                    f" | {ours.rps:,.0f}, p50 {ours.p50_ms:.1f} ms, p99 {ours.p99_ms:.1f} ms"
                    f" | {ours.rps / bare.rps:.2f} | {old.cpu_us:.0f} / {ours.cpu_us:.0f} |"
                )
    if "workers" in targets:
        print()
        n = args.workers
        print(
            f"| request | -c | 1 worker | {n} workers | scaling | bare, {n} processes"
            f" | {n} workers / bare {n} processes | {n} workers / bare 1 process |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for req in chosen:
            for c in args.connections:
                bare = results[(req.name, c, "bare aiohttp")]
                bare_many = results[(req.name, c, "bare aiohttp, N processes")]
                one = results[(req.name, c, "fhir-audit-proxy")]
                many = results[(req.name, c, "workers")]
                bad = many.non2xx + many.errors
                print(
                    f"| `{req.name}` | {c} | {one.rps:,.0f}, p50 {one.p50_ms:.1f} ms"
                    f" | {many.rps:,.0f}, p50 {many.p50_ms:.1f} ms | {many.rps / one.rps:.2f}x"
                    f" | {bare_many.rps:,.0f} | {many.rps / bare_many.rps:.2f}"
                    f" | {many.rps / bare.rps:.2f} |" + (f" ({bad} non-2xx/errors)" if bad else "")
                )
    print()
    print(f"events committed durably during the run: {audited}")
    for name, m in memory.items():
        print(
            f"memory, {name}: {args.memory_clients} clients x {m['size_mb']:.1f} MB Bundle"
            f" for {args.memory_seconds} s: RSS {m['before_mb']:.0f} MB at rest,"
            f" peak {m['peak_mb']:.0f} MB, {m['after_mb']:.0f} MB after; {m['rps']:.1f} req/s,"
            f" p50 {m['p50_ms']:.0f} ms, non-2xx {m['non2xx']:.0f},"
            f" socket errors {m['errors']:.0f}"
        )


if __name__ == "__main__":
    main()
