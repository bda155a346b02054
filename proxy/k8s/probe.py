"""The injected proxy's exec probe: ``python -m proxy.k8s.probe healthz|readyz --port N``.

The admin listener is bound to loopback inside the pod (it must never be reachable
without authentication), so the kubelet cannot probe it over HTTP; this runs inside the
container instead. Exit 0 when the endpoint answers 200, 1 otherwise. ``--wait S`` retries
for up to S seconds (the postStart hook of the non-native sidecar)."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence


def check(url: str) -> bool:
    """True when ``url`` answers 200 within two seconds."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.k8s.probe")
    parser.add_argument("endpoint", choices=["healthz", "readyz"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--wait", type=float, default=0.0)
    args = parser.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}/{args.endpoint}"
    deadline = time.monotonic() + args.wait
    while not check(url):
        if time.monotonic() >= deadline:
            return 1
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
