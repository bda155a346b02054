"""The command as an operator meets it, run as a subprocess with this venv's Python: one
line per configuration or start-up error (exit 2 for configuration, 1 at run time) and
no traceback unless asked; options before or after the command; help for everything;
secrets masked in every output; store-reading commands never create a store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy import __version__
from proxy.cli import RETRY_CHUNK, SecretMask, build_parser
from proxy.store import schema
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery
from tests.factories import (
    NodeFhirServer,
    ProxyProcess,
    RecordingRepository,
    audit_event,
    free_port,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Outcome:
    """What the operator saw."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("fhir-audit-proxy: error:")]


def cli(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Outcome:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment | (env or {}),
        timeout=60,
        check=False,
    )
    return Outcome(result.returncode, result.stdout, result.stderr)


def assert_one_line_error(outcome: Outcome, status: int, *expected: str) -> None:
    output = outcome.stdout + outcome.stderr
    assert outcome.returncode == status, output
    assert "Traceback" not in output, output
    assert len(outcome.errors) == 1, output
    for text in expected:
        assert text in outcome.errors[0], output


def _config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return config


# --- configuration errors: exit 2, one line, no traceback -----------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen:\n  port: 8080\n  host: [oops\n", ["config.yaml:4:1: not valid YAML"]),
        ("upstrem:\n  url: http://x/fhir\n", ["config.yaml:1: upstrem: unknown", "'upstream'?"]),
        ("repository:\n  mode: bulk\n", ["config.yaml:2: repository.mode:", "'file'", "'bulk'"]),
        ('upstream:\n  url: "not a url"\n', ["config.yaml:2: upstream.url: must be an absolute"]),
        ("upstream:\n  url: ftp://h/fhir\n", ["upstream.url: must be an absolute http://"]),
        ("listen:\n  port: 99999\n", ["config.yaml:2: listen.port: must be a TCP port"]),
        ("store:\n  path: blocker/audit.db\n", ["store.path: blocker/audit.db cannot be created"]),
        ("store:\n  path: blocker\n", ["store.path: blocker is not a store this proxy can use"]),
        ("admin:\n  port: 8080\n", ["config.yaml: listen.port and admin.port are both 8080"]),
    ],
)
def test_configuration_errors_are_one_line_with_exit_2(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    config = _config(tmp_path, text)
    for command in ("check-config", "run"):
        assert_one_line_error(cli(command, "-c", config, cwd=tmp_path), 2, *expected)


def test_missing_configuration_file(tmp_path: Path) -> None:
    outcome = cli("check-config", "-c", "nowhere.yaml", cwd=tmp_path)
    assert_one_line_error(outcome, 2, "configuration file nowhere.yaml does not exist")
    outcome = cli("check-config", cwd=tmp_path, env={"FHIR_AUDIT_CONFIG": "gone.yaml"})
    assert_one_line_error(outcome, 2, "gone.yaml does not exist", "$FHIR_AUDIT_CONFIG")


def test_unknown_key_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    outcome = cli("check-config", cwd=tmp_path, env={"FHIR_AUDIT_ADMIN__PROT": "9001"})
    assert_one_line_error(
        outcome, 2, "environment FHIR_AUDIT_ADMIN__PROT: admin.prot: unknown", "'port'?"
    )


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("FHIR_AUDIT_LISTN__PORT", "FHIR_AUDIT_LISTEN__PORT"),
        ("FHIR_AUDIT_LISTEN_PORT", "FHIR_AUDIT_LISTEN__PORT"),
        ("FHIR_AUDIT_WORKRS", "FHIR_AUDIT_WORKERS"),
    ],
)
def test_a_misspelt_environment_variable_is_warned_about_with_the_name_meant(
    tmp_path: Path, variable: str, meant: str
) -> None:
    """A variable under the prefix that names no setting would be ignored in silence: the
    proxy says so and which name was probably meant, and still starts."""
    outcome = cli("check-config", cwd=tmp_path, env={variable: "2", "FHIR_AUDIT_CONFIG": ""})
    assert outcome.returncode == 0, outcome.stderr
    assert (
        f"environment {variable}: no such setting, ignored; did you mean {meant}?" in outcome.stderr
    )
    assert "FHIR_AUDIT_CONFIG" not in outcome.stderr, "the configuration file's variable is known"


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    config = _config(tmp_path, "listen:\n  port: x\nupstream:\n  url: nope\n")
    outcome = cli("check-config", "-c", config, cwd=tmp_path)
    assert outcome.returncode == 2
    assert [e.split(": ")[2] for e in outcome.errors] == [f"{config}:2", f"{config}:4"]


def test_traceback_only_with_debug_or_log_level_debug(tmp_path: Path) -> None:
    config = _config(tmp_path, "upstrem: {}\n")
    assert "Traceback" in cli("--debug", "check-config", "-c", config, cwd=tmp_path).stderr
    assert "Traceback" in cli("check-config", "-c", config, "--debug", cwd=tmp_path).stderr
    env = {"FHIR_AUDIT_LOG_LEVEL": "debug"}
    assert "Traceback" in cli("check-config", "-c", config, cwd=tmp_path, env=env).stderr
    (tmp_path / "blocker").write_text("")
    config.write_text("log_level: DEBUG\nstore:\n  path: blocker/audit.db\n")
    outcome = cli("check-config", "-c", config, cwd=tmp_path)
    assert outcome.returncode == 2
    assert "Traceback" in outcome.stderr
    assert outcome.errors == [
        "fhir-audit-proxy: error: store.path: blocker/audit.db cannot be created because"
        " blocker is a file, not a directory; choose another path"
    ]


@contextlib.contextmanager
def _file_attribute(path: Path, attribute: str) -> Iterator[None]:
    """``chattr +{attribute}`` on ``path`` (``a``: append only, ``i``: immutable): a file
    even root cannot open for writing as the proxy does. Skips where chattr cannot."""
    done = subprocess.run(["chattr", f"+{attribute}", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +{attribute} is not possible here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", f"-{attribute}", str(path)], check=False)


START_UP_REFUSALS = {
    "exposed admin": (
        "admin:\n  host: 0.0.0.0\n",
        "admin.host: the admin listener on '0.0.0.0' is not loopback and has no authentication",
    ),
    "missing token file": (
        "admin:\n  token_files: [{dir}/absent.txt]\n",
        "admin.token_files: {dir}/absent.txt is not a readable file",
    ),
    "store not writable": (
        "store:\n  path: {dir}/locked/audit.db\n",
        "store.path: {dir}/locked/audit.db cannot be opened for writing by this user",
    ),
    "file repository not writable": (
        "repository:\n  url: {dir}/locked/events.ndjson\n  mode: file\n",
        "repository.url: {dir}/locked/events.ndjson cannot be opened for writing by this user",
    ),
}


@pytest.mark.parametrize("case", list(START_UP_REFUSALS))
def test_check_config_refuses_what_run_refuses_at_start_up(tmp_path: Path, case: str) -> None:
    """`check-config` runs the start-up checks of `run`: each problem one line, exit 2
    from both, and nothing started."""
    text, expected = (part.format(dir=tmp_path) for part in START_UP_REFUSALS[case])
    config = _config(tmp_path, f"store:\n  path: {tmp_path}/audit.db\n{text}")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "audit.db").touch()  # append only: SQLite cannot open it for writing
    (locked / "events.ndjson").touch()
    env = {"FHIR_AUDIT_LISTEN__PORT": "0", "FHIR_AUDIT_ADMIN__PORT": "0"}
    with (
        _file_attribute(locked / "audit.db", "a"),
        _file_attribute(locked / "events.ndjson", "i"),
    ):
        for command in ("check-config", "run"):
            outcome = cli(command, "-c", config, cwd=tmp_path, env=env)
            assert_one_line_error(outcome, 2, expected)
            assert outcome.stdout == ""


# --- start-up failures: exit 1, one line ---------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("listener", ["listen", "admin"])
def test_port_in_use_names_the_listener(tmp_path: Path, busy_port: int, listener: str) -> None:
    other = "admin" if listener == "listen" else "listen"
    env = {
        f"FHIR_AUDIT_{listener.upper()}__PORT": str(busy_port),
        f"FHIR_AUDIT_{listener.upper()}__HOST": "127.0.0.1",
        f"FHIR_AUDIT_{other.upper()}__PORT": "0",
        "FHIR_AUDIT_STORE__PATH": str(tmp_path / "audit.db"),
    }
    outcome = cli("run", cwd=tmp_path, env=env)
    assert_one_line_error(
        outcome,
        1,
        f"cannot listen on 127.0.0.1:{busy_port} ({listener}.host/{listener}.port)",
        "address already in use; stop the process that uses it or choose another port",
    )


def test_a_store_that_cannot_be_opened_is_one_line_with_exit_1(tmp_path: Path) -> None:
    store = tmp_path / "audit.db"
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute("CREATE TABLE events (x)")  # not the proxy's: its migration cannot run
    env = {
        "FHIR_AUDIT_STORE__PATH": str(store),
        "FHIR_AUDIT_LISTEN__PORT": "0",
        "FHIR_AUDIT_ADMIN__PORT": "0",
    }
    assert cli("check-config", cwd=tmp_path, env=env).returncode == 0
    assert_one_line_error(
        cli("run", cwd=tmp_path, env=env),
        1,
        f"cannot open the audit store at {store}: table events already exists;"
        " check store.path and the disk it is on",
    )


# --- store-reading commands ----------------------------------------------------------------


def test_dlq_refuses_to_create_a_store(tmp_path: Path) -> None:
    outcome = cli("dlq", "list", cwd=tmp_path)
    assert_one_line_error(outcome, 1, "no audit store at data/audit.db", "-c/--config")
    assert list(tmp_path.iterdir()) == [], "nothing created"
    config = _config(tmp_path, f"store:\n  path: {tmp_path / 'missing.db'}\n")
    outcome = cli("dlq", "retry", "-c", config, cwd=tmp_path)
    assert_one_line_error(outcome, 1, f"no audit store at {tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


async def _dead_store(path: Path, count: int) -> list[int]:
    queue = await AuditQueue.open(path, max_bytes=1 << 30)
    try:
        await queue.append([audit_event(n) for n in range(count)])
        seqs = [e.seq for e in await queue.claim(count, datetime.now(UTC))]
        await queue.dead_letter(seqs, "422 rejected by the repository")
        return seqs
    finally:
        await queue.close()


async def test_dlq_reads_the_configured_store_and_retry_shows_progress(tmp_path: Path) -> None:
    store = tmp_path / "store" / "audit.db"
    total = RETRY_CHUNK + RETRY_CHUNK // 2
    seqs = await _dead_store(store, total)
    config = _config(tmp_path, f"store:\n  path: {store}\n")

    listed = await asyncio.to_thread(cli, "dlq", "list", "-c", config, "--limit", "3")
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [r["seq"] for r in rows] == seqs[:3]
    assert rows[0]["error"] == "422 rejected by the repository"

    one = await asyncio.to_thread(cli, "-c", config, "dlq", "retry", "--seq", str(seqs[0]))
    assert one.stdout == "requeued 1 event(s)\n"

    retried = await asyncio.to_thread(cli, "dlq", "retry", "-c", config)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == f"requeued {total - 1} event(s)\n"
    assert retried.stderr.splitlines() == [
        f"requeued {RETRY_CHUNK} of {total - 1} event(s)",
        f"requeued {total - 1} of {total - 1} event(s)",
    ]
    empty = await asyncio.to_thread(cli, "dlq", "list", "-c", config)
    assert empty.stdout == ""
    assert f"no dead-lettered events in {store}" in empty.stderr


def test_a_hand_command_on_an_old_store_logs_the_migration_progress(tmp_path: Path) -> None:
    store = tmp_path / "audit.db"
    conn = sqlite3.connect(store, isolation_level=None)
    for script in schema.MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 2")
    conn.executemany(
        "INSERT INTO events (event_id, recorded, recorded_ts, patients, body)"
        " VALUES (?, '2024-01-01T00:00:00Z', 1704067200, '|Patient/p1|', '{}')",
        [(f"e{i}",) for i in range(5)],
    )
    conn.close()
    config = _config(tmp_path, f"store:\n  path: {store}\n")
    listed = cli("dlq", "list", "-c", config)
    assert listed.returncode == 0, listed.stderr
    assert "store migration 3: rewriting 5 events" in listed.stderr
    assert "store migration 3: 5 of 5 events (100%)" in listed.stderr
    conn = sqlite3.connect(store)
    assert conn.execute("SELECT COUNT(*) FROM event_terms").fetchone()[0] == 5
    conn.close()


# --- the command line itself ---------------------------------------------------------------


def test_options_go_before_or_after_the_command(tmp_path: Path) -> None:
    config = _config(tmp_path, "listen:\n  port: 8181\n")
    after = cli("check-config", "-c", config, cwd=tmp_path)
    before = cli("--config", config, "check-config", cwd=tmp_path)
    assert after.returncode == before.returncode == 0, after.stderr + before.stderr
    assert orjson.loads(after.stdout)["listen"]["port"] == 8181
    assert after.stdout == before.stdout


def test_version() -> None:
    outcome = cli("--version")
    assert outcome.stdout == f"fhir-audit-proxy {__version__}\n"


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_command_and_option_has_help() -> None:
    parsers = list(_parsers(build_parser()))
    assert {p.prog for p in parsers} >= {
        "fhir-audit-proxy run",
        "fhir-audit-proxy check-config",
        "fhir-audit-proxy dlq list",
        "fhir-audit-proxy dlq retry",
    }
    assert "fhir-audit-proxy demo" not in {p.prog for p in parsers}, "the demo is a dev script"
    for parser in parsers:
        assert parser.description and "``" not in parser.description, parser.prog
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}"
    assert "The ``fhir-audit-proxy`` command" not in cli("--help").stdout
    assert "print at most N events" in cli("dlq", "list", "--help").stdout


# --- secrets -------------------------------------------------------------------------------

SECRETS = {
    "up-pass-77",
    "repo-pass-77",
    "Basic cmVwbzpzZWNyZXQ3Nw==",
    "cmVwbzpzZWNyZXQ3Nw==",
    "proxy-auth-77",
    "cookie-77",
    "api-key-77",
    "custom-77",
    "idp-pass-77",
    "client-secret-77",
    "admin-token-77",
    "jwks-pass-77",
    "otlp-pass-77",
}


def _secret_config(tmp_path: Path, fhir_base: str, ports: tuple[int, int]) -> Path:
    """Half the secrets in the YAML file; the environment (_secret_env) has the rest."""
    dead = free_port()
    return _config(
        tmp_path,
        f"""
listen: {{host: 127.0.0.1, port: {ports[0]}}}
admin: {{host: 127.0.0.1, port: {ports[1]}, tokens: [admin-token-77]}}
upstream:
  url: {fhir_base.replace("http://", "http://up-user:up-pass-77@")}
store: {{path: {tmp_path / "store" / "audit.db"}}}
repository:
  url: http://repo-user:repo-pass-77@127.0.0.1:{dead}/fhir
  flush_interval_ms: 50
  max_flush_interval_ms: 100
  secret_headers: [X-Custom-Token]
  request_headers:
    Proxy-Authorization: Bearer proxy-auth-77
    X-Custom-Token: custom-77
    X-Tenant: ward-7
  auth:
    type: oauth2_client_credentials
    token_url: http://idp-user:idp-pass-77@127.0.0.1:{dead}/token
    client_id: proxy
audit:
  identity: {{jwks_url: "http://jwks-user:jwks-pass-77@127.0.0.1:{dead}/jwks"}}
telemetry: {{otlp_endpoint: "http://otlp-user:otlp-pass-77@127.0.0.1:{dead}"}}
log_level: DEBUG
""",
    )


def _secret_env() -> dict[str, str]:
    return {
        "FHIR_AUDIT_REPOSITORY__REQUEST_HEADERS": orjson.dumps(
            {
                "Authorization": "Basic cmVwbzpzZWNyZXQ3Nw==",
                "Cookie": "session=cookie-77",
                "x-api-key": "api-key-77",
                "Proxy-Authorization": "Bearer proxy-auth-77",
                "X-Custom-Token": "custom-77",
                "X-Tenant": "ward-7",
            }
        ).decode(),
        "FHIR_AUDIT_REPOSITORY__AUTH__CLIENT_SECRET": "client-secret-77",
    }


def _leaked(text: str) -> list[str]:
    return sorted(s for s in SECRETS if s in text)


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    config = _secret_config(tmp_path, "http://127.0.0.1:8081/fhir", (8080, 9000))
    outcome = cli("check-config", "-c", config, cwd=tmp_path, env=_secret_env())
    assert outcome.returncode == 0, outcome.stderr
    shown = orjson.loads(outcome.stdout)
    assert shown["repository"]["request_headers"]["Authorization"] == "**********"
    assert shown["repository"]["request_headers"]["X-Tenant"] == "ward-7"
    assert shown["repository"]["auth"]["client_secret"] == "**********"
    assert shown["upstream"]["url"] == "http://**********@127.0.0.1:8081/fhir"
    assert _leaked(outcome.stdout + outcome.stderr) == []

    bad = _config(tmp_path, "upstream:\n  url: ftp://u:up-pass-77@h/fhir\n")
    outcome = cli("check-config", "-c", bad, cwd=tmp_path)
    assert_one_line_error(outcome, 2, "ftp://**********@h/fhir")
    assert _leaked(outcome.stdout + outcome.stderr) == []


async def test_run_keeps_secrets_out_of_logs_and_store(
    tmp_path: Path, fhir_server: NodeFhirServer
) -> None:
    port, admin_port = free_port(), free_port()
    config = _secret_config(tmp_path, fhir_server.base_url, (port, admin_port))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "-c",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=environment | _secret_env(),
        cwd=tmp_path,
    )
    assert process.stderr is not None
    seen: list[str] = []
    wanted = ["JWKS could not be fetched", "repository unavailable"]
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{admin_port}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            async with http.post(
                f"http://127.0.0.1:{port}/fhir/Patient",
                json={"resourceType": "Patient"},
                headers={"Content-Type": "application/fhir+json"},
            ) as r:
                assert r.status == 201
        async with asyncio.timeout(30):
            while not all(any(w in line for line in seen) for w in wanted):
                line = (await process.stderr.readline()).decode()
                if not line:
                    break
                seen.append(line)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = await process.communicate()
    rest, stdout = err.decode(), out.decode()
    logs = "".join(seen) + rest + stdout
    for line in wanted:
        assert line in logs, "the code paths that print URLs and errors ran"
    assert "http://**********@127.0.0.1" in logs
    assert _leaked(logs) == []

    store = tmp_path / "store" / "audit.db"
    raw = b"".join(p.read_bytes() for p in store.parent.iterdir())
    assert [s for s in SECRETS if s.encode() in raw] == []
    queue = await AuditQueue.open(store, max_bytes=1 << 30, create=False)
    try:
        stored = [e.event for e in (await queue.search(EventQuery(limit=100)))[0]]
    finally:
        await queue.close()
    assert len(stored) == 1
    assert _leaked(orjson.dumps(stored).decode()) == []


def test_log_filter_masks_messages_arguments_and_tracebacks() -> None:
    record = logging.LogRecord("proxy", logging.ERROR, __file__, 1, "token %s", ("tok-1234",), None)
    try:
        raise RuntimeError("failed with tok-1234")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert SecretMask({"tok-1234"}).filter(record)
    formatted = logging.Formatter().format(record)
    assert "tok-1234" not in formatted
    assert "token **********" in formatted
    assert "failed with **********" in formatted


def test_a_reader_that_stops_early_is_not_an_error(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "check-config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=environment,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # as `| head -0` would, before the command writes
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141, err
    assert err == ""


async def test_json_logs_from_the_first_line_and_start_ready_and_stop_said_at_info(
    tmp_path: Path, fhir_server: NodeFhirServer, repository: RecordingRepository
) -> None:
    """With ``json_logs`` every line is JSON, the start-up line included; at INFO the log
    says what starts (listeners, upstream, repository, store, workers), when it is ready,
    and at stop how many events it leaves undelivered and where."""
    store = tmp_path / "store" / "audit.db"
    port, admin = free_port(), free_port()
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "upstream": {"url": fhir_server.base_url},
        "store": {"path": str(store)},
        "repository": {"url": repository.url, "flush_interval_ms": 600_000},
        "telemetry": {"json_logs": True},
        "log_level": "INFO",
    }
    repository.fail_next = [503] * 100  # down: what is stored stays undelivered
    proxy = ProxyProcess(config, tmp_path)
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:
            for n in range(2):
                async with http.get(f"{proxy.url}/metadata", headers={"X-Request-Id": f"j{n}"}):
                    pass
        finally:
            await proxy.stop()
        repository.fail_next.clear()
        await proxy.start(http)  # the repository is back: all goes out
        try:
            await repository.wait_for(2)
        finally:
            await proxy.stop()
    lines = proxy.log.read_text().splitlines()
    entries = [orjson.loads(line) for line in lines]  # every line, or this fails
    said = [e["message"] for e in entries if e["level"] == "INFO"]
    assert said[0] == (
        f"starting fhir-audit-proxy {__version__}: proxy on 127.0.0.1:{port} -> upstream"
        f" {fhir_server.base_url}; admin on 127.0.0.1:{admin}; repository {repository.url}"
        f" (bundle); store {store}; workers 1"
    )
    assert f"ready: serving on http://127.0.0.1:{port}; admin on http://127.0.0.1:{admin}" in said
    stops = [m for m in said if m.startswith("stopped: ")]
    assert stops == [
        f"stopped: 2 events left undelivered in {store}; they are delivered at the next start",
        "stopped: all events delivered",
    ]
