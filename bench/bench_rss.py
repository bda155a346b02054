"""The proxy's resident memory at rest: each of its processes' VmRSS a few seconds after start.

The proxy starts as ``bench_rate.py`` starts it (``bench_proxy.proxy_config``: identity with a
``jwks_url``, nothing listening upstream), or without the identity section (``--no-jwks``: the
JWKS fetch at start loads PyJWT and cryptography), left idle for ``--wait`` seconds; then the
main process and every process under it are listed with their VmRSS. ``--tree DIR`` runs the
proxy of another checkout (``git archive``) with this Python, to compare side by side.

    python bench/bench_rss.py [--wait 6] [--no-jwks] [--tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_proxy import free_port, proxy_config


def rss_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=float, default=6.0, help="seconds at rest before reading")
    parser.add_argument("--no-jwks", action="store_true", help="no identity section")
    parser.add_argument("--tree", type=Path, default=None, help="the checkout to run")
    args = parser.parse_args()
    tree = (args.tree or Path(__file__).resolve().parent.parent).resolve()
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        port, admin, upstream = free_port(), free_port(), free_port()
        config = proxy_config(work / "p.yaml", port, admin, upstream, work / "store")
        if args.no_jwks:
            settings = json.loads(config.read_text())
            settings.pop("audit", None)
            config.write_text(json.dumps(settings))
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "-c", str(config), "run"],
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(args.wait)
            if process.poll() is not None:
                raise SystemExit(f"the proxy exited with {process.returncode}")
            todo, total = [process.pid], 0
            while todo:
                pid = todo.pop()
                todo += children(pid)
                command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:70]
                size = rss_mb(pid)
                total += size
                print(f"{pid:>8} {size:>4} MB  {command}")
            print(f"{'':>8} {total:>4} MB  in all ({tree})")
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
