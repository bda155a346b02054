"""The injected proxy's exec probe: ``python -m proxy.k8s.probe healthz|readyz --port N``.

The admin listener is bound to loopback inside the pod (it must never be reachable
without authentication), so the kubelet cannot probe it over HTTP; this runs inside the
container instead. Exit 0 when the endpoint answers 200, 1 otherwise. ``--wait S`` retries
for up to S seconds (the postStart hook of the non-native sidecar). Without ``--port``,
the admin port of ``FHIR_AUDIT_ADMIN__PORT`` (as the injector and the chart set it), else
the default 9000: the image's HEALTHCHECK follows the container's own setting."""

from __future__ import annotations

import argparse
import os
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
    default = os.environ.get("FHIR_AUDIT_ADMIN__PORT", "9000")
    parser.add_argument("--port", type=int, default=int(default) if default.isdigit() else 9000)
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
