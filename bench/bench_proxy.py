"""What auditing costs on the hot path, next to a plain reverse proxy.

Runs, in one script and on one machine: nginx serving FHIR JSON as the upstream; the same
load (wrk) against (a) the upstream directly, (b) nginx as a reverse proxy in front of it,
(c) a bare aiohttp reverse proxy (``plain_proxy.py``: the same Python stack with no audit,
so the ratio to it is what auditing costs), and (d) fhir-audit-proxy in front of it,
auditing every request with a durable fsync'd commit. Prints requests/s, latencies and
the ratios.

    python bench/bench_proxy.py [--seconds 5] [--connections 64]

Needs Debian's ``wrk`` and ``nginx`` (``apt-get install wrk nginx-light``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PATIENT = {
    "resourceType": "Patient",
    "id": "1",
    "meta": {"versionId": "3", "lastUpdated": "2026-11-01T10:00:00Z"},
    "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
    "gender": "male",
    "birthDate": "1974-12-25",
}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream fhir {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{upstream};
    location /fhir/ {{ default_type application/fhir+json; alias {dir}/www/; try_files $uri =404; }}
  }}
  server {{
    listen 127.0.0.1:{peer};
    location / {{
      proxy_pass http://fhir;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer")


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        match = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "non2xx": float(errors.group(1)) if errors else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed: apt-get install wrk nginx-light")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # nginx's workers run as another user and must read www/
        (d / "www" / "Patient").mkdir(parents=True)
        (d / "www" / "Patient" / "1").write_text(json.dumps(PATIENT))
        upstream, peer, plain, proxy_port, admin_port = (free_port() for _ in range(5))
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, upstream=upstream, peer=peer))
        nginx = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf")])
        config = d / "proxy.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"host": "127.0.0.1", "port": proxy_port},
                    "admin": {"host": "127.0.0.1", "port": admin_port},
                    "upstream": {"url": f"http://127.0.0.1:{upstream}/fhir"},
                    "store": {"path": str(d / "store" / "audit.db")},
                    "log_level": "WARNING",
                }
            )
        )
        proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy", "-c", str(config), "run"],
            cwd=ROOT,
            env=os.environ.copy(),
        )
        bare = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "plain_proxy.py"),
                f"http://127.0.0.1:{upstream}",
                str(plain),
            ]
        )
        try:
            path = "/fhir/Patient/1"
            wait_http(f"http://127.0.0.1:{upstream}{path}")
            wait_http(f"http://127.0.0.1:{peer}{path}")
            wait_http(f"http://127.0.0.1:{plain}{path}")
            wait_http(f"http://127.0.0.1:{proxy_port}{path}")
            results = {}
            for name, port in (
                ("upstream direct", upstream),
                ("nginx proxy", peer),
                ("aiohttp, no audit", plain),
                ("fhir-audit-proxy", proxy_port),
            ):
                wrk(f"http://127.0.0.1:{port}{path}", 1, args.connections)  # warm-up
                results[name] = wrk(
                    f"http://127.0.0.1:{port}{path}", args.seconds, args.connections
                )
            with urllib.request.urlopen(
                f"http://127.0.0.1:{admin_port}/fhir/AuditEvent?_count=1"
            ) as r:
                audited = json.load(r)["total"]
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=20)
            bare.kill()
            bare.wait(timeout=10)
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=10)

    print(f"load: wrk -t2 -c{args.connections} -d{args.seconds}s GET /fhir/Patient/1 (2 cores)")
    for name, r in results.items():
        print(
            f"  {name:18s} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
            f"  p99 {r['p99_ms']:6.2f} ms  non-2xx {r['non2xx']:.0f}"
        )
    ours = results["fhir-audit-proxy"]["rps"]
    bare_rps = results["aiohttp, no audit"]["rps"]
    print(f"ratio fhir-audit-proxy / aiohttp no audit: {ours / bare_rps:.2f}  (cost of auditing)")
    print(f"ratio fhir-audit-proxy / nginx proxy:     {ours / results['nginx proxy']['rps']:.2f}")
    print(
        f"ratio fhir-audit-proxy / upstream direct: {ours / results['upstream direct']['rps']:.2f}"
    )
    print(f"events committed durably: {audited}")


if __name__ == "__main__":
    main()
