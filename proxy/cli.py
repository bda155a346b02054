"""The ``fhir-audit-proxy`` command.

- ``run``: serve the proxy (and its admin listener) with the given configuration.
- ``demo``: start the bundled test FHIR server and a proxy in front of it, print the URLs.
- ``check-config``: load and print the effective configuration (secrets masked).
- ``dlq list`` / ``dlq retry``: inspect and requeue events the repository rejected.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web

from proxy.app import build_proxy_app
from proxy.k8s.webhook import add_webhook_command
from proxy.settings import Settings, load_settings

log = logging.getLogger("proxy")

TESTSERVER = Path(__file__).resolve().parent.parent / "testserver" / "server.mjs"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiohttp's access log would print every URL; keep it at warning unless asked.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def serve(settings: Settings, *, banner: str | None = None) -> None:
    """Run the proxy until SIGINT/SIGTERM, then shut down gracefully."""
    app = build_proxy_app(settings)
    if banner:

        async def announce(_: web.Application) -> None:
            print(banner, flush=True)

        app.on_startup.append(announce)
    web.run_app(
        app,
        host=settings.listen.host,
        port=settings.listen.port,
        shutdown_timeout=settings.shutdown_grace_s,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    _configure_logging(settings.log_level)
    log.info(
        "proxy on %s:%d -> %s; admin on %s:%d; store %s; repository %s",
        settings.listen.host,
        settings.listen.port,
        settings.upstream.url,
        settings.admin.host,
        settings.admin.port,
        settings.store.path,
        settings.repository.url or "(none: local only)",
    )
    serve(settings)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The bundled test FHIR server on ``--fhir-port``, the proxy in front of it."""
    node = shutil.which("node")
    if node is None or not (TESTSERVER.parent / "node_modules").is_dir():
        print("the demo needs node and `npm ci` in testserver/ (scripts/demo does both)")
        return 2
    fhir = subprocess.Popen(
        [node, str(TESTSERVER), str(args.fhir_port), "127.0.0.1"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=TESTSERVER.parent,
    )
    assert fhir.stdout is not None
    line = fhir.stdout.readline()
    if not line.startswith("listening "):
        print(f"test FHIR server failed to start: {line}")
        fhir.kill()
        return 1
    upstream = line.split()[1]
    data = Path(args.data)
    overrides: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": args.port},
        "upstream": {"url": upstream},
        "store": {"path": data / "audit.db"},
        "admin": {"host": "127.0.0.1", "port": args.admin_port},
        "repository": {"url": str(data / "audit-repository.ndjson"), "mode": "file"},
    }
    settings = (
        load_settings(args.config, **overrides) if args.config else load_settings(None, **overrides)
    )
    _configure_logging(settings.log_level)
    banner = "\n".join(
        [
            "fhir-audit-proxy demo is running:",
            f"  FHIR server (Medplum engine, in memory): {upstream}",
            f"  proxy (use this as your FHIR base):      http://127.0.0.1:{args.port}/fhir",
            f"  audit events, FHIR search:               http://127.0.0.1:{args.admin_port}/fhir/AuditEvent?_sort=-date&_count=20",
            f"  audit log (Smile CDR style):             http://127.0.0.1:{args.admin_port}/audit-log",
            f"  local queue:                             {settings.store.path}",
            f"  repository (NDJSON file):                {settings.repository.url}",
            "try: curl -X POST -H 'content-type: application/fhir+json' "
            f'-d \'{{"resourceType":"Patient"}}\' http://127.0.0.1:{args.port}/fhir/Patient',
            "Ctrl-C stops both.",
        ]
    )
    try:
        serve(settings, banner=banner)
    finally:
        fhir.terminate()
        fhir.wait(timeout=10)
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    # model_dump keeps SecretStr masked as '**********'.
    sys.stdout.write(
        orjson.dumps(settings.model_dump(mode="json"), option=orjson.OPT_INDENT_2).decode()
    )
    sys.stdout.write("\n")
    return 0


async def _dlq(args: argparse.Namespace) -> int:
    from proxy.store.queue import AuditQueue

    settings = load_settings(args.config)
    queue = await AuditQueue.open(
        settings.store.path,
        max_bytes=settings.store.max_bytes,
        commit_batch_max=settings.store.commit_batch_max,
    )
    try:
        if args.dlq_command == "list":
            for item in await queue.list_dead(limit=args.limit):
                row = {
                    "seq": item.seq,
                    "id": item.event_id,
                    "recorded": item.recorded,
                    "attempts": item.attempts,
                    "error": item.last_error,
                }
                sys.stdout.write(orjson.dumps(row).decode() + "\n")
        else:
            seqs = args.seq or None
            count = await queue.requeue_dead(seqs)
            sys.stdout.write(f"requeued {count} event(s)\n")
    finally:
        await queue.close()
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    return uvloop.run(_dlq(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhir-audit-proxy", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("FHIR_AUDIT_CONFIG"),
        help="YAML configuration file (default: $FHIR_AUDIT_CONFIG); env FHIR_AUDIT_* overrides it",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="serve the proxy").set_defaults(func=_cmd_run)
    demo = sub.add_parser("demo", help="run the bundled test FHIR server with the proxy in front")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--fhir-port", type=int, default=8081)
    demo.add_argument("--admin-port", type=int, default=9000)
    demo.add_argument("--data", default="./data/demo")
    demo.set_defaults(func=_cmd_demo)
    sub.add_parser("check-config", help="print the effective configuration").set_defaults(
        func=_cmd_check_config
    )
    dlq = sub.add_parser("dlq", help="dead-lettered events")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="list dead-lettered events")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_retry = dlq_sub.add_parser("retry", help="requeue dead-lettered events for delivery")
    dlq_retry.add_argument(
        "--seq", type=int, action="append", help="only this queue seq (repeatable)"
    )
    dlq.set_defaults(func=_cmd_dlq)
    add_webhook_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
