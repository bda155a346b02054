"""How the proxy scales from one worker to two (``workers: N``, SO_REUSEPORT).

nginx serves canned FHIR JSON as the upstream; the proxy runs with ``workers: 1`` and then
``workers: 2`` (each with a fresh store), and wrk loads each with the same requests:

- ``GET Patient/1`` (one PatientRead event a request),
- ``POST Observation`` (an intent committed before forwarding, the event after).

It prints requests/s of each and the ratio 2 workers / 1 worker, measured in the same run.

    python bench/bench_workers.py [--seconds 8] [--connections 64]

Needs Debian's ``wrk`` and ``nginx`` (``apt-get install wrk nginx-light``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_proxy import (
    CREATED,
    NGINX_CONF,
    PATIENT,
    POST_LUA,
    all_serving,
    free_port,
    observation,
    running,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent


def wrk(url: str, seconds: int, connections: int, script: str | None) -> tuple[float, int]:
    """Requests/s, and the number of non-2xx answers and socket errors."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s"]
    cmd += ["-s", script] if script else []
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*?(\d+).*?(\d+).*?(\d+).*?(\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (
        sum(int(g) for g in errors.groups()) if errors else 0
    )
    return rps, failed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its children (the workers), in seconds."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0.0
    for each in [pid, *map(int, children)]:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install wrk nginx-light")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # nginx's workers run as another user and must read www/
        (d / "www" / "Patient").mkdir(parents=True)
        (d / "www" / "Patient" / "1").write_text(json.dumps(PATIENT))
        (d / "post.lua").write_text(POST_LUA.format(body=json.dumps(observation(0, 1))))
        upstream = free_port()
        (d / "nginx.conf").write_text(
            NGINX_CONF.format(dir=d, upstream=upstream, created=json.dumps(CREATED))
        )
        requests = [
            ("GET Patient/1", "/fhir/Patient/1", None),
            ("POST Observation", "/fhir/Observation", str(d / "post.lua")),
        ]
        results: dict[tuple[str, int], tuple[float, int]] = {}
        cores: dict[tuple[str, int], float] = {}
        """CPU cores the proxy's processes kept busy during the measured run."""
        with running(["nginx", "-c", str(d / "nginx.conf")]):
            wait_http(f"http://127.0.0.1:{upstream}/fhir/Patient/1")
            for workers in (1, 2):
                port, admin = free_port(), free_port()
                config = d / f"proxy-{workers}.yaml"
                config.write_text(
                    json.dumps(
                        {
                            "listen": {"host": "127.0.0.1", "port": port},
                            "admin": {"host": "127.0.0.1", "port": admin},
                            "upstream": {"url": f"http://127.0.0.1:{upstream}/fhir"},
                            "store": {"path": str(d / f"store-{workers}" / "audit.db")},
                            "workers": workers,
                            "log_level": "WARNING",
                        }
                    )
                )
                cmd = [sys.executable, "-m", "proxy", "-c", str(config), "run"]
                with running(cmd, cwd=ROOT) as proxy:
                    wait_http(f"http://127.0.0.1:{port}/fhir/Patient/1")
                    deadline = time.monotonic() + 30
                    store = d / f"store-{workers}" / "audit.db"
                    while not all_serving(port, store, workers) and time.monotonic() < deadline:
                        time.sleep(0.1)
                    for name, path, script in requests:
                        url = f"http://127.0.0.1:{port}{path}"
                        wrk(url, 1, args.connections, script)  # warm-up
                        before, t0 = cpu_seconds(proxy.pid), time.monotonic()
                        results[(name, workers)] = wrk(url, args.seconds, args.connections, script)
                        used = cpu_seconds(proxy.pid) - before
                        cores[(name, workers)] = used / (time.monotonic() - t0)

    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores,"
        f" wrk -t1 -c{args.connections} -d{args.seconds}s, nginx upstream,"
        f" load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    print("| request | 1 worker req/s (cores) | 2 workers req/s (cores) | ratio |")
    print("|---|---|---|---|")
    for name, _, _ in requests:
        (one, bad1), (two, bad2) = results[(name, 1)], results[(name, 2)]
        note = f" ({bad1}/{bad2} failed)" if bad1 or bad2 else ""
        print(
            f"| {name} | {one:,.0f} ({cores[(name, 1)]:.2f}) | {two:,.0f} ({cores[(name, 2)]:.2f})"
            f" | {two / one:.2f}x{note} |"
        )


if __name__ == "__main__":
    main()
