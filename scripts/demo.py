"""The quick-start demo: the test FHIR server (Medplum's engine on Node, in memory) with the
proxy in front of it, events shipped to an NDJSON file. Ctrl-C stops both.

A development script, not part of the installed command: it needs ``testserver/`` and its
``node_modules`` (``scripts/setup``). Run it through ``scripts/demo``, which installs first:

    scripts/demo [--port 8080] [--fhir-port 8081] [--admin-port 9000] [--data data/demo] [--keep]

Each run starts with an empty store and repository file (the FHIR server is empty at every
start, so events kept from an earlier run would name patients that no longer exist);
``--keep`` keeps them. A port in use (another demo running) is a one-line error, exit 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from proxy.cli import StartupError, configure_logging, serve
from proxy.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
TESTSERVER = ROOT / "testserver" / "server.mjs"
HOST = "127.0.0.1"
PROG = "scripts/demo"


class DemoError(Exception):
    """Why the demo cannot start, in one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Start the test FHIR server (in memory) and the proxy in front of it,"
        " print the URLs, and run until Ctrl-C. Every listener is on 127.0.0.1.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8080,
        metavar="N",
        help="the proxy's port: your FHIR base (default 8080)",
    )
    parser.add_argument(
        "--fhir-port",
        type=int,
        default=8081,
        metavar="N",
        help="the test FHIR server's port (default 8081)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=9000,
        metavar="N",
        help="the admin API: audit search, audit log, health (default 9000)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/demo"),
        metavar="DIR",
        help="directory for the store and the NDJSON repository file (default data/demo)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the events of earlier demos (default: start with an empty store)",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="a proxy configuration to start from; the demo sets the listeners, upstream,"
        " store and repository, and runs one worker",
    )
    return parser.parse_args(argv)


def check_port_free(port: int, option: str) -> None:
    """Fail early, in one line, when another process (an earlier demo) holds ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers themselves do: connections of a demo just stopped (TIME_WAIT) do
        # not hold the port, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise DemoError(
                f"port {port} on {HOST} is in use ({exc.strerror}): is another demo running?"
                f" stop it with Ctrl-C in its terminal, or pass {option} N"
            ) from None


def reset(data: Path) -> None:
    """Empty the demo's store and repository file."""
    for name in ("audit.db", "audit.db-wal", "audit.db-shm", "audit-repository.ndjson"):
        (data / name).unlink(missing_ok=True)


def start_fhir_server(port: int, log_path: Path) -> tuple[subprocess.Popen[str], str]:
    """The test FHIR server, once it accepts connections, and its base URL."""
    node = shutil.which("node")
    if node is None or not (TESTSERVER.parent / "node_modules").is_dir():
        raise DemoError("the demo needs node and testserver/node_modules: run scripts/setup")
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(log_fd, "w") as log_file:
        fhir = subprocess.Popen(
            [node, str(TESTSERVER), str(port), HOST],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            cwd=TESTSERVER.parent,
        )
    assert fhir.stdout is not None
    line = fhir.stdout.readline()
    if line.startswith("listening "):
        return fhir, line.split()[1]
    fhir.kill()
    fhir.wait()
    fhir.stdout.close()
    errors = [ln.strip() for ln in log_path.read_text().splitlines() if "Error" in ln]
    reason = errors[0] if errors else f"it exited with status {fhir.returncode}"
    raise DemoError(f"the test FHIR server did not start: {reason} (log: {log_path})")


def proxy_command() -> str:
    """The proxy's command as this shell can run it: the console script beside this
    Python (the venv's), else ``python -m proxy``."""
    script = Path(sys.executable).parent / "fhir-audit-proxy"
    return str(script) if script.exists() else f"{sys.executable} -m proxy"


def banner(args: argparse.Namespace, upstream: str, data: Path, fresh: bool) -> str:
    admin = f"http://{HOST}:{args.admin_port}"
    stored = "emptied at this start; --keep keeps it" if fresh else "kept from earlier demos"
    return "\n".join(
        [
            "fhir-audit-proxy demo is running:",
            f"  proxy (use this as your FHIR base):  http://{HOST}:{args.port}/fhir",
            f"  audit trail viewer (open in a browser): {admin}/ui",
            f"  test FHIR server (in memory):        {upstream}",
            f"  audit events, FHIR search:           {admin}/fhir/AuditEvent?_sort=-date&_count=20",
            f"  audit log (Smile CDR style):         {admin}/audit-log",
            f"data: {data}/ ({stored})",
            "  audit.db                 the proxy's store (the durable queue)",
            "  audit-repository.ndjson  the events shipped to the repository",
            "  fhir-server.log          the test FHIR server's log",
            "events the repository refused (dead letters), from another terminal:",
            f"  FHIR_AUDIT_STORE__PATH={data / 'audit.db'} {proxy_command()} dlq list",
            "The FHIR server keeps its resources in memory: they are gone when the demo stops.",
            "try: curl -X POST -H 'content-type: application/fhir+json' "
            f'-d \'{{"resourceType":"Patient"}}\' http://{HOST}:{args.port}/fhir/Patient',
            "Ctrl-C stops both.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    try:
        for port, option in (
            (args.port, "--port"),
            (args.fhir_port, "--fhir-port"),
            (args.admin_port, "--admin-port"),
        ):
            check_port_free(port, option)
        overrides: dict[str, Any] = {
            "listen": {"host": HOST, "port": args.port},
            "upstream": {"url": f"http://{HOST}:{args.fhir_port}/fhir"},
            "store": {"path": data / "audit.db"},
            "admin": {"host": HOST, "port": args.admin_port},
            "repository": {"url": str(data / "audit-repository.ndjson"), "mode": "file"},
        }
        settings = load_settings(args.config, **overrides)
        if settings.workers > 1:
            # The demo serves in this process; `run` is what starts workers.
            print(
                f"{PROG}: the demo runs one worker (the configuration's workers:"
                f" {settings.workers} is for `python -m proxy -c FILE run`)",
                file=sys.stderr,
            )
            settings = load_settings(args.config, **overrides, workers=1)
        if not args.keep:
            reset(data)
        fhir, upstream = start_fhir_server(args.fhir_port, data / "fhir-server.log")
    except (DemoError, ConfigError) as exc:
        for line in str(exc).splitlines():
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    configure_logging(settings)
    try:
        serve(settings, banner=banner(args, upstream, data, fresh=not args.keep))
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        fhir.terminate()
        fhir.wait(timeout=10)
        if fhir.stdout is not None:
            fhir.stdout.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
