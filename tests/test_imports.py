"""The package's import graph, read from the source (every import, including those made
inside functions and for type checking only): no cycle, telemetry below the store (it
takes callables; it does not import the store), the audit below HTTP. And what the proxy
holds in memory at rest: not the libraries only some configurations or requests use."""

from __future__ import annotations

import ast
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.factories import free_port

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

ON_FIRST_USE = ("lxml", "rnc2rng", "opentelemetry.sdk", "multiprocessing", "jwt", "cryptography")
"""Imported when first needed, never at start: lxml (and the rnc2rng it loads) by the first
FHIR XML body, the OpenTelemetry SDK by an export or the first span, multiprocessing by the
first large admin ingestion, PyJWT and cryptography by the first bearer token, JWKS or
transparency-log key. Together they are about half the proxy's own memory at rest."""


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of ``proxy`` and the modules of ``proxy`` it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parents, base] if base else parents)
                # ``from proxy import telemetry`` imports the module proxy.telemetry
                submodules = [f"{base}.{alias.name}" for alias in node.names]
                wanted = [m for m in submodules if m in modules] or [base]
            else:
                continue
            for target in wanted:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_every_module() -> None:
    graph = import_graph()
    assert "proxy.store.queue" in graph["proxy.app"]
    assert "proxy.telemetry" in graph["proxy.app"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(import_graph()) == []


def test_telemetry_imports_nothing_of_the_store() -> None:
    """Telemetry is below the store: the store's commit engine reports its timings through
    a callback and the gauges read the store through a callable, both wired in app.py."""
    graph = import_graph()
    telemetry = {name for name in graph if name.startswith("proxy.telemetry")}
    assert not {t for name in telemetry for t in graph[name] if t.startswith("proxy.store")}
    assert not any("proxy.telemetry" in graph[name] for name in graph if "proxy.store" in name)


def test_the_audit_knows_nothing_of_http() -> None:
    """The audit pipeline and builder take an exchange and give events or a failure:
    forwarding (proxy.http) calls them, never the other way round."""
    graph = import_graph()
    audit = {name for name in graph if name.startswith("proxy.audit")}
    assert {t for name in audit for t in graph[name] if t.startswith("proxy.http")} == set()


def test_start_up_imports_nothing_loaded_on_first_use() -> None:
    """What ``fhir-audit-proxy run`` imports before reading its configuration."""
    script = (
        "import sys, proxy.cli, proxy.app\n"
        f"print(sorted(m for m in {ON_FIRST_USE!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout


SHARED_OBJECTS = {
    "lxml": "/lxml/etree.",
    "cryptography": "/cryptography/hazmat/bindings/_rust.",
    "multiprocessing": "/_multiprocessing.",
}
"""The compiled part of some of :data:`ON_FIRST_USE`, as the process maps it."""


def _wait_listening(port: int, process: subprocess.Popen[bytes], within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the proxy exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port} within {within_s} s")


def test_a_running_proxy_at_rest_maps_none_of_them(tmp_path: Path) -> None:
    """The real command, started with a minimal configuration and left idle: its memory
    map (``/proc/PID/maps``) holds none of the compiled libraries it has not used."""
    port, admin, upstream = free_port(), free_port(), free_port()
    config = tmp_path / "proxy.json"
    config.write_bytes(
        orjson.dumps(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "admin": {"host": "127.0.0.1", "port": admin},
                "upstream": {"url": f"http://127.0.0.1:{upstream}/fhir"},
                "store": {"path": str(tmp_path / "store" / "audit.db")},
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "-c", str(config), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        _wait_listening(port, process)
        _wait_listening(admin, process)
        maps = Path(f"/proc/{process.pid}/maps").read_text()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert "/orjson/orjson." in maps  # the map was read, with what is loaded at start
    assert {name for name, part in SHARED_OBJECTS.items() if part in maps} == set()
