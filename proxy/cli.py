"""The ``fhir-audit-proxy`` command.

Every command takes ``-c/--config`` and ``--debug`` before or after its name. A
configuration or start-up failure prints one line per problem on stderr and exits 2 (the
configuration is wrong) or 1 (the configuration is right but something failed at run
time); the traceback follows only with ``--debug`` or ``log_level: DEBUG``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from proxy import __version__
from proxy.settings import (
    CONFIG_ENV,
    ENV_PREFIX,
    MASK,
    ConfigError,
    Settings,
    check_startup,
    load_settings,
    redact_url,
    unknown_environment,
)
from proxy.supervisor import (
    STOP_SIGNALS,
    announce_serving,
    bind_listeners,
    end_with_supervisor,
    inherited_listener,
    supervise,
)

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.store.faces import AdminStore

# aiohttp, uvloop and the store are imported where they are used: `--help`, `--version` and
# `check-config` answer in a third of the time without them.

log = logging.getLogger("proxy")

PROG = "fhir-audit-proxy"
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
RETRY_CHUNK = 1000
"""Dead-lettered events requeued per transaction by ``dlq retry`` (one progress line each)."""

DESCRIPTION = """\
A sidecar reverse proxy that writes an IHE BALP AuditEvent for every FHIR interaction
that passes through it, commits it durably to a local store before releasing the response,
and ships the events to an audit repository.

Configuration comes from a YAML file (-c FILE or $FHIR_AUDIT_CONFIG; start from
`fhir-audit-proxy config example > config.yaml`) and FHIR_AUDIT_* environment variables,
which win (FHIR_AUDIT_REPOSITORY__URL=... sets repository.url)."""

EPILOG = """\
examples:
  fhir-audit-proxy config example > config.yaml
  fhir-audit-proxy check-config -c config.yaml
  fhir-audit-proxy run -c config.yaml
  fhir-audit-proxy dlq list -c config.yaml

exit status: 0 ok, 1 runtime failure, 2 configuration error."""


class StartupError(Exception):
    """The configuration is valid but the proxy could not start (a port in use, a store
    that cannot be opened). One line, saying what to do."""


# --- logging ---------------------------------------------------------------------------


class SecretMask(logging.Filter):
    """Replaces configured secrets in every record (message, arguments and traceback)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted(set(secrets), key=len, reverse=True)

    def mask(self, text: str) -> str:
        """``text`` with every secret replaced by the mask."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        return True


def configure_logging(settings: Settings, warnings: Iterable[str] = ()) -> None:
    """Log to stderr at ``log_level`` (JSON lines from the first with
    ``telemetry.json_logs``), with every configured secret masked; then log ``warnings``
    (about the configuration)."""
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    mask = SecretMask(settings.secret_values())
    for handler in logging.getLogger().handlers:
        handler.addFilter(mask)
    if settings.telemetry.json_logs:
        from proxy.telemetry import use_json_logs

        use_json_logs()
    # aiohttp's access log would print every URL; keep it at warning unless asked.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for warning in warnings:
        log.warning("%s", warning)


# --- loading and serving -------------------------------------------------------------------


def load(args: argparse.Namespace) -> Settings:
    """The settings named by ``-c`` (or ``$FHIR_AUDIT_CONFIG``), with what ``run`` checks
    at start-up checked (:func:`~proxy.settings.check_startup`). Sets ``args.debug`` when
    the configuration asks for DEBUG logging."""
    settings = load_settings(args.config)
    args.secrets = settings.secret_values()
    args.debug = args.debug or settings.log_level == "DEBUG"
    check_startup(settings)
    args.warnings = unknown_environment(os.environ)
    if any(name.startswith("OTEL_") for name in os.environ):
        # The OpenTelemetry SDK's variables that the proxy cannot follow are refused before
        # it starts (only those can be: telemetry is not imported without them).
        from proxy.telemetry.export import export_plan

        try:
            export_plan(settings.telemetry, os.environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return settings


_BIND_FAILURE = re.compile(r"bind on address \('?([^',]*)'?, (\d+)[^)]*\): (.*)$")


def _bind_failure(exc: OSError, settings: Settings) -> StartupError | None:
    """A one-line error for a listener that could not bind, naming its setting."""
    found = _BIND_FAILURE.search(str(exc))
    if found is None:
        return None
    host, port, reason = found.group(1), int(found.group(2)), found.group(3)
    setting = {
        settings.listen.port: "listen",
        settings.admin.port: "admin",
        settings.status.port: "status",
    }.get(port, "listen")
    return _listen_failure(host, port, setting, reason, exc.errno)


def _listen_failure(
    host: str, port: int, setting: str, reason: str, code: int | None
) -> StartupError:
    advice = {
        errno.EADDRINUSE: "stop the process that uses it or choose another port",
        errno.EACCES: "ports below 1024 need privileges; choose a higher port",
        errno.EADDRNOTAVAIL: "the host is not an address of this machine; use 0.0.0.0 or one",
    }.get(code or 0, "choose another host or port")
    return StartupError(
        f"cannot listen on {host}:{port} ({setting}.host/{setting}.port): {reason}; {advice}"
    )


def serve(
    settings: Settings,
    *,
    banner: str | None = None,
    worker: int = 0,
    listener: socket.socket | None = None,
) -> None:
    """Run the proxy until SIGINT/SIGTERM, then shut down gracefully; print ``banner`` once
    it accepts connections. ``worker`` is this process's index when ``settings.workers``
    processes share the port, each on the ``listener`` its supervisor bound (without one,
    the proxy binds ``listen.host:listen.port`` itself). A port that cannot be bound or a
    store that cannot be opened raises :class:`StartupError`."""
    import uvloop

    from proxy.app import proxy_listener
    from proxy.delivery.sink import SinkUnusable
    from proxy.http.server import listen_hosts, run
    from proxy.store.faces import StoreError

    def announce(running: str) -> None:
        # Called once every listener accepts connections (on_startup would be too
        # early: the proxy's own port is bound after it), with their URLs.
        from proxy.app import ADMIN_URL

        urls = ", ".join(re.findall(r"https?://[^\s,)]+", running)) or "its port"
        admin = f"; admin on {app[ADMIN_URL]}" if ADMIN_URL in app else ""
        who = f"worker {worker} " if settings.workers > 1 else ""
        log.info("ready: %sserving on %s%s", who, urls, admin)
        announce_serving()
        if banner:
            print(banner, flush=True)

    app = _build_app(settings, worker)
    where: dict[str, Any] = (
        {"sock": listener}
        if listener is not None
        else {"host": listen_hosts(settings.listen.host), "port": settings.listen.port}
    )
    try:
        run(
            app,
            proxy_listener,
            **where,
            shutdown_timeout=settings.shutdown_grace_s,
            announce=announce,
            loop=uvloop.new_event_loop(),
        )
    except StoreError as exc:
        raise StartupError(f"{exc}; check store.path and the disk it is on") from exc
    except SinkUnusable as exc:
        raise StartupError(str(exc)) from exc
    except OSError as exc:
        failure = _bind_failure(exc, settings)
        if failure is None:
            raise
        raise failure from exc


def _build_app(settings: Settings, worker: int = 0) -> web.Application:
    """The proxy application (imported late: ``--help`` and ``check-config`` stay fast)."""
    from proxy.app import build_proxy_app

    return build_proxy_app(settings, worker=worker)


# --- commands ------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load(args)
    configure_logging(settings, args.warnings if args.worker is None else ())
    if args.worker is not None:
        # The supervisor's mask is inherited: the stop signals, and SIGCHLD (the worker's
        # event loop learns from it that its store's writer process exited).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*STOP_SIGNALS, signal.SIGCHLD})
        if not end_with_supervisor():
            raise StartupError("the `run` process that started this worker is gone")
        if not 0 <= args.worker < settings.workers:
            raise StartupError(f"--worker {args.worker}: workers is {settings.workers}")
        listener = inherited_listener()
        if listener is None:
            raise StartupError("--worker is for the workers `run` starts, not to be run by hand")
        log.info("worker %d: store %s", args.worker, settings.store_shards()[args.worker])
        serve(settings, worker=args.worker, listener=listener)
        return 0
    repo = settings.repository
    log.info(
        "starting %s %s: proxy on %s:%d -> upstream %s; admin on %s:%d; repository %s;"
        " store %s; workers %d",
        PROG,
        __version__,
        settings.listen.host,
        settings.listen.port,
        redact_url(settings.upstream.url),
        settings.admin.host,
        settings.admin.port,
        f"{repo.target()} ({repo.mode})" if repo.url else "none (events stay local)",
        settings.store.path,
        settings.workers,
    )
    if settings.workers > 1:
        log.info("%d workers share the port, one store shard each", settings.workers)
        return _supervise(args, settings)
    serve(settings)
    return 0


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    """Bind the port for the workers (this instance's alone), then run them."""
    host, port = settings.listen.host, settings.listen.port
    try:
        listeners = bind_listeners(host, port, settings.workers)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise _listen_failure(host, port, "listen", reason, exc.errno) from exc
    try:
        if settings.audit.token_hash_key is None:
            # Workers hash opaque tokens under one key: create it once, before they race to.
            from proxy.audit.identity import load_token_key

            store = settings.store.path
            load_token_key(None, store.with_name(store.name + ".token-key"))
        command = [sys.executable, "-m", "proxy", "run"]
        command += ["-c", args.config] if args.config else []
        command += ["--debug"] if args.debug else []
        return 0 if supervise(command, settings, listeners) else EXIT_RUNTIME
    finally:
        for listener in listeners:
            listener.close()


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = load(args)
    configure_logging(settings, args.warnings)
    # The serializers mask secrets: SecretStr, credential headers, URL userinfo.
    sys.stdout.write(
        orjson.dumps(settings.model_dump(mode="json"), option=orjson.OPT_INDENT_2).decode()
    )
    sys.stdout.write("\n")
    source = args.config or os.environ.get(CONFIG_ENV) or "defaults only, no file"
    print(f"{PROG}: the configuration is valid ({source})", file=sys.stderr)
    return 0


@contextlib.asynccontextmanager
async def _dlq_store(settings: Settings) -> AsyncIterator[AdminStore]:
    """The store the ``dlq`` commands read, open while in use: ``store.path``, or with
    several workers every shard that exists, as one store (seqs are then global: see
    proxy/store/shards.py)."""
    from proxy.store.faces import StoreError
    from proxy.store.shards import ShardedStore, existing_shard_opener

    open_shard = existing_shard_opener(settings.store)
    shards = settings.store_shards()
    if len(shards) == 1:
        queue = await open_shard(shards[0])
        try:
            yield queue
        finally:
            await queue.close()
        return
    if not any(path.is_file() for path in shards):
        raise StoreError(
            f"no audit store shard at {', '.join(map(str, shards))}: check store.path and"
            " workers in the configuration given with -c/--config (or $FHIR_AUDIT_CONFIG)"
        )
    store = ShardedStore(shards, opened={}, open_shard=open_shard)
    try:
        yield store
    finally:
        await store.close()


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    async with _dlq_store(settings) as queue:
        if args.dlq_command == "list":
            items = await queue.list_dead(limit=args.limit)
            for item in items:
                row = {
                    "seq": item.seq,
                    "id": item.event_id,
                    "recorded": item.recorded,
                    "attempts": item.attempts,
                    "error": item.last_error,
                }
                sys.stdout.write(orjson.dumps(row).decode() + "\n")
            if not items:
                where = ", ".join(str(path) for path in settings.store_shards())
                print(f"no dead-lettered events in {where}", file=sys.stderr)
        elif args.seq:
            count = await queue.requeue_dead(args.seq)
            sys.stdout.write(f"requeued {count} event(s)\n")
        else:
            total = (await queue.stats()).dead
            count = 0
            while True:
                chunk = [item.seq for item in await queue.list_dead(limit=RETRY_CHUNK)]
                done = await queue.requeue_dead(chunk) if chunk else 0
                if not done:
                    break
                count += done
                print(f"requeued {count} of {total} event(s)", file=sys.stderr, flush=True)
            sys.stdout.write(f"requeued {count} event(s)\n")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from importlib.resources import files

    sys.stdout.write(files("proxy").joinpath("config.example.yaml").read_text(encoding="utf-8"))
    return 0


def _cmd_relay(args: argparse.Namespace) -> int:
    from proxy.delivery.sink import SinkUnusable
    from proxy.relay import run_relay

    settings = load(args)
    configure_logging(settings)
    try:
        run_relay(settings)
    except SinkUnusable as exc:
        raise StartupError(str(exc)) from exc
    return 0


def _cmd_log_keygen(args: argparse.Namespace) -> int:
    from proxy.log.note import NoteError, Signer

    try:
        signer = Signer.generate(args.name)
    except NoteError as exc:
        raise StartupError(str(exc)) from exc
    key_path = args.out
    try:
        # The signing key is a secret: owner only, and never over an existing file.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot create {key_path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as out:
        out.write(signer.text() + "\n")
    sys.stdout.write(signer.verifier.text() + "\n")
    print(
        f"signing key written to {key_path} (set log.key_file to it); the line above is the"
        " verifier key auditors check checkpoints with",
        file=sys.stderr,
    )
    return 0


def _cmd_log_vkey(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.log.note import NoteError, Signer

    settings = load(args)
    key_file = args.key or settings.log.key_file
    if key_file is None:
        raise ConfigError("log.key_file is not set: name the signing key with --key FILE")
    try:
        signer = Signer.parse(Path(key_file).read_text())
    except (OSError, NoteError) as exc:
        raise StartupError(f"{key_file}: {exc}") from exc
    sys.stdout.write(signer.verifier.text() + "\n")
    return 0


def _cmd_log_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.log.note import NoteError, Verifier
    from proxy.log.verify import read_resources, verify_resources, verify_store

    vkey = args.vkey
    if vkey.startswith("@"):
        vkey = Path(vkey[1:]).read_text()
    try:
        verifier = Verifier.parse(vkey)
    except NoteError as exc:
        raise ConfigError(f"--vkey: {exc}") from exc
    notes: list[tuple[str, str]] = []
    try:
        for extra in args.checkpoints or ():
            from proxy.log.fhir import notes_in

            path = Path(extra)
            text = path.read_text()
            found = notes_in(read_resources(path)) if text.lstrip()[:1] == "{" else [text]
            notes += [(note, str(path)) for note in found]
        if args.files:
            reports = []
            for name in args.files:
                resources = read_resources(Path(name))
                reports += verify_resources(resources, verifier, name, notes)
        else:
            settings = load(args)
            shards = [path for path in settings.store_shards() if path.is_file()]
            if not shards:
                raise StartupError(f"no audit store at {settings.store.path}")
            reports = [verify_store(path, verifier, notes) for path in shards]
    except (OSError, ValueError) as exc:
        raise StartupError(str(exc)) from exc
    for report in reports:
        print(report)
    if not reports:
        print("nothing to verify: no event with a log position and no checkpoint")
        return EXIT_RUNTIME
    return 0 if all(r.ok for r in reports) else EXIT_RUNTIME


def _cmd_webhook(args: argparse.Namespace) -> int:
    from proxy.k8s.webhook import run_webhook_command

    return run_webhook_command(args)


def _cmd_inject(args: argparse.Namespace) -> int:
    from proxy.k8s.inject import run_inject_command

    try:
        return run_inject_command(args)
    except OSError as exc:
        raise ConfigError(f"{args.filename}: {exc.strerror or exc}") from exc


def _cmd_dlq(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.store.faces import StoreError

    settings = load(args)
    configure_logging(settings, args.warnings)  # a store migration run on open logs progress
    try:
        return uvloop.run(_dlq(args, settings))
    except StoreError as exc:
        raise StartupError(str(exc)) from exc


# --- the parser ----------------------------------------------------------------------------


def _common_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    """``-c`` and ``--debug``, accepted before and after the command's name. Only the top
    level sets defaults: a subcommand's default would overwrite a value given before it."""
    common = argparse.ArgumentParser(add_help=False)
    default = None if with_defaults else argparse.SUPPRESS
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=default,
        help=f"YAML configuration file (default: ${CONFIG_ENV}, else built-in defaults);"
        f" {ENV_PREFIX}* environment variables override it",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=False if with_defaults else argparse.SUPPRESS,
        help="print the traceback of a failure (as does log_level: DEBUG)",
    )
    return common


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
    func: Callable[[argparse.Namespace], int] | None = None,
) -> argparse.ArgumentParser:
    """Add a command that takes the common options; ``func(args)`` returns the exit status
    and may raise :class:`ConfigError` or :class:`StartupError`."""
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        parents=[_common_options(with_defaults=False)],
    )
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. A new command is one :func:`add_command` call here."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(with_defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help: more)"
    )
    run = add_command(
        commands,
        "run",
        help="serve the proxy and its admin listener until Ctrl-C or SIGTERM",
        description="Serve the proxy on listen.host:listen.port in front of upstream.url, and"
        " the admin API (audit search, viewer, health, metrics) on admin.host:admin.port."
        " SIGTERM or Ctrl-C finishes in-flight requests and flushes for shutdown_grace_s.",
        func=_cmd_run,
    )
    # A worker of `workers: N` (started by `run` itself): its index, which names its shard.
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    add_command(
        commands,
        "check-config",
        help="validate the configuration and print it, secrets masked",
        description="Load the configuration exactly as `run` would (file, environment,"
        " defaults), check every value and path, and print the effective settings as JSON"
        " with secrets masked. Exit 0 if `run` would accept it, 2 if not.",
        func=_cmd_check_config,
    )
    config = add_command(
        commands,
        "config",
        help="print an example configuration",
        description="Configuration helpers.",
        func=_cmd_config,
    )
    config_commands = config.add_subparsers(
        dest="config_command", required=True, metavar="ACTION", help="example"
    )
    add_command(
        config_commands,
        "example",
        help="print an example configuration file: every setting, its default, what it does",
        description="Print config.example.yaml (shipped with the proxy): every setting with its"
        " default and a comment. Start a configuration with"
        " `fhir-audit-proxy config example > config.yaml`.",
    )
    dlq = add_command(
        commands,
        "dlq",
        help="list or requeue events the audit repository rejected",
        description="Dead-lettered events: those the repository refused with a 4xx. They"
        " stay in the store (store.path of the configuration) until requeued. The store must"
        " exist; these commands never create one.",
        func=_cmd_dlq,
    )
    dlq_commands = dlq.add_subparsers(
        dest="dlq_command", required=True, metavar="ACTION", help="list or retry"
    )
    dlq_list = add_command(
        dlq_commands,
        "list",
        help="print dead-lettered events, oldest first, one JSON object a line",
        description="Print dead-lettered events (seq, id, recorded, attempts, the"
        " repository's error), oldest first, one JSON object a line.",
    )
    dlq_list.add_argument(
        "--limit", type=int, default=100, metavar="N", help="print at most N events (default 100)"
    )
    dlq_retry = add_command(
        dlq_commands,
        "retry",
        help="requeue dead-lettered events for delivery",
        description="Put dead-lettered events back in the delivery queue; a running proxy"
        " sends them on its next flush. Without --seq, all of them, with progress on stderr.",
    )
    dlq_retry.add_argument(
        "--seq",
        type=int,
        action="append",
        metavar="N",
        help="only the event with this queue seq (from `dlq list`); repeatable",
    )
    add_command(
        commands,
        "relay",
        help="deliver events from a JetStream stream or a Kafka topic to the repository",
        description="Consume relay.source (the JetStream stream or, with a kafka:// URL, the"
        " Kafka topic the sidecars publish to) as the durable consumer (Kafka: the consumer"
        " group) relay.consumer, and deliver to repository with the sidecars' batching,"
        " backoff, bisection and dead letters; a message is acknowledged to the stream (Kafka:"
        " its offset committed) only after the repository took it. Relays with the same"
        " consumer share the work. SIGTERM or Ctrl-C stops it.",
        func=_cmd_relay,
    )
    log_cmd = add_command(
        commands,
        "log",
        help="the Merkle log: make a signing key, print its verifier key, verify a trail",
        description="The audit trail's Merkle log (C2SP signed-note, tlog-checkpoint,"
        " tlog-tiles): keys for its checkpoints and the check of a store or of a"
        " repository's copy against them.",
    )
    log_commands = log_cmd.add_subparsers(
        dest="log_command", required=True, metavar="ACTION", help="keygen, vkey or verify"
    )
    keygen = add_command(
        log_commands,
        "keygen",
        help="make a checkpoint signing key (Ed25519) and print its verifier key",
        description="Write a new Ed25519 signing key in the signed-note format"
        " (PRIVATE+KEY+<name>+<id>+<key>, as Go's sumdb/note writes it) to --out, owner-only,"
        " and print its verifier key <name>+<id>+<key> on stdout.",
        func=_cmd_log_keygen,
    )
    keygen.add_argument(
        "--name",
        required=True,
        help="the key's name, a schema-less URL such as audit.example.org/ward3",
    )
    keygen.add_argument("--out", required=True, metavar="FILE", help="where to write the key")
    vkey = add_command(
        log_commands,
        "vkey",
        help="print the verifier key of the signing key",
        description="Print the verifier key (<name>+<id>+<key>) of log.key_file or --key.",
        func=_cmd_log_vkey,
    )
    vkey.add_argument("--key", metavar="FILE", help="the signing key (default: log.key_file)")
    verify = add_command(
        log_commands,
        "verify",
        help="check a store, or a repository's export, against the signed checkpoints",
        description="Without FILE: check every shard of store.path (read-only) against its"
        " checkpoints. With FILE (NDJSON, or a JSON Bundle, of AuditEvents and checkpoint"
        " DocumentReferences, as a repository exports them): check those events against the"
        " checkpoints among them. Names the first problem; exit 0 when none, 1 otherwise.",
        func=_cmd_log_verify,
    )
    verify.add_argument(
        "--vkey",
        required=True,
        help="the verifier key <name>+<id>+<key>, or @FILE holding it",
    )
    verify.add_argument(
        "--checkpoints",
        action="append",
        metavar="FILE",
        help="more signed checkpoints: a note, or NDJSON/Bundle with checkpoint"
        " DocumentReferences (the repository's copy); repeatable",
    )
    verify.add_argument("files", nargs="*", metavar="FILE", help="a repository's export")
    webhook = add_command(
        commands,
        "webhook",
        help="serve the sidecar-injection admission webhook (HTTPS)",
        description="Serve the Kubernetes mutating admission webhook that injects the proxy"
        " as a sidecar. Defaults for the injected proxy come from FHIR_AUDIT_WEBHOOK_*"
        " variables.",
        func=_cmd_webhook,
    )
    webhook.add_argument(
        "--cert", required=True, metavar="FILE", help="PEM certificate chain (reloaded on change)"
    )
    webhook.add_argument(
        "--key", required=True, metavar="FILE", help="PEM private key (reloaded on change)"
    )
    webhook.add_argument(
        "--host", default="::", help="address to listen on (default ::, IPv4 and IPv6)"
    )
    webhook.add_argument("--port", type=int, default=8443, help="port to listen on (default 8443)")
    webhook.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    inject = add_command(
        commands,
        "inject",
        help="print manifests with the sidecar injected, as the webhook would (offline)",
        description="Read Kubernetes manifests (Pods, and the pod templates of Deployments,"
        " StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs) and print them with the"
        " proxy injected exactly as the webhook would inject them, for review or to commit"
        " (as istioctl kube-inject -f does). The webhook's defaults come from"
        " FHIR_AUDIT_WEBHOOK_* variables; why each pod was or was not injected goes to"
        " stderr. Exit 1, printing nothing, when a pod would be denied.",
        func=_cmd_inject,
    )
    inject.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="the manifests (- for stdin)"
    )
    inject.add_argument(
        "-n",
        "--namespace",
        default="default",
        help="namespace of documents that name none (default: default)",
    )
    inject.add_argument(
        "--injection",
        choices=["enabled", "required", "opt-in"],
        default="enabled",
        help="the namespace's fhir-audit-proxy/injection label: enabled (default), required,"
        " or opt-in for a namespace without it",
    )
    inject.add_argument(
        "--pod-security",
        action="store_true",
        help="the namespace enforces Pod Security baseline or restricted",
    )
    return parser


def _fail(args: argparse.Namespace, message: str, status: int, *, hint: bool = False) -> int:
    debug = args.debug or os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "").upper() == "DEBUG"
    mask = SecretMask(getattr(args, "secrets", ()))
    if debug:
        print(mask.mask(traceback.format_exc()), file=sys.stderr, end="")
    for line in message.splitlines():
        print(f"{PROG}: error: {mask.mask(line)}", file=sys.stderr)
    if hint and not debug:
        print(f"{PROG}: run with --debug for the traceback", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = args.config or None
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        return _fail(args, str(exc), EXIT_CONFIG)
    except StartupError as exc:
        return _fail(args, str(exc), EXIT_RUNTIME)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader stopped reading (`check-config | head`): not an error worth a word.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports SIGPIPE
    except Exception as exc:
        return _fail(args, f"unexpected {type(exc).__name__}: {exc}", EXIT_RUNTIME, hint=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
