"""scripts/demo.py, the quick start: it serves, says where its data lives, starts fresh
unless --keep, refuses in one line while another demo holds its ports, and Ctrl-C stops
both the proxy and the test FHIR server."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import sys
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest

from tests.factories import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.py"


class Demo:
    """One demo process on its own ports."""

    def __init__(self, data: Path, ports: tuple[int, int, int], *extra: str) -> None:
        self.data = data
        self.port, self.fhir_port, self.admin_port = ports
        self.args = [
            "--port",
            str(self.port),
            "--fhir-port",
            str(self.fhir_port),
            "--admin-port",
            str(self.admin_port),
            "--data",
            str(data),
            *extra,
        ]
        self.banner: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    async def run_to_end(self) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(DEMO), *self.args, stdout=-1, stderr=-1, env=_env(), cwd=ROOT
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def __aenter__(self) -> Demo:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(DEMO), *self.args, stdout=-1, stderr=-1, env=_env(), cwd=ROOT
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(60):
            while not self.banner or self.banner[-1] != "Ctrl-C stops both.":
                line = await self.process.stdout.readline()
                if not line:
                    assert self.process.stderr is not None
                    pytest.fail(f"the demo exited: {(await self.process.stderr.read()).decode()}")
                self.banner.append(line.decode().rstrip("\n"))
        return self

    async def stop(self) -> tuple[int, str]:
        """Ctrl-C, as in a terminal; the exit status and stderr."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        _, err = await self.process.communicate()
        assert self.process.returncode is not None
        return self.process.returncode, err.decode()

    async def __aexit__(self, *_: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def audit_event_count(self, http: aiohttp.ClientSession) -> int:
        """Events of proxied creates (the admin API records its own reads of the trail)."""
        url = f"http://127.0.0.1:{self.admin_port}/fhir/AuditEvent?_count=1&subtype=create"
        async with http.get(url) as r:
            total: int = (await r.json())["total"]
            return total


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AUDIT_")}


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


@pytest.mark.slow
async def test_demo_serves_starts_fresh_and_refuses_a_second_one(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    ports = (free_port(), free_port(), free_port())
    async with aiohttp.ClientSession() as http:
        async with Demo(data, ports) as demo:
            assert f"  proxy (use this as your FHIR base):  http://127.0.0.1:{ports[0]}/fhir" in (
                demo.banner
            )
            assert f"data: {data}/ (emptied at this start; --keep keeps it)" in demo.banner
            assert any("in memory" in line for line in demo.banner)
            async with http.post(
                f"http://127.0.0.1:{ports[0]}/fhir/Patient",
                json={"resourceType": "Patient"},
                headers={"Content-Type": "application/fhir+json"},
            ) as r:
                assert r.status == 201
            assert await demo.audit_event_count(http) == 1

            for second_ports, option in [
                (ports, "--port"),
                ((free_port(), ports[1], free_port()), "--fhir-port"),
            ]:
                code, out, err = await Demo(tmp_path / "other", second_ports).run_to_end()
                assert code == 1
                assert "Traceback" not in err and "node:" not in err and out == ""
                assert err.splitlines() == [
                    f"scripts/demo: error: port {second_ports[1 if option != '--port' else 0]}"
                    " on 127.0.0.1 is in use (Address already in use): is another demo"
                    f" running? stop it with Ctrl-C in its terminal, or pass {option} N"
                ]
            code, err = await demo.stop()
            assert code == 0, err
        assert await _refused(ports[0]) and await _refused(ports[1]), "Ctrl-C stopped both"
        assert {p.name for p in data.iterdir()} >= {
            "audit-repository.ndjson",
            "audit.db",
            "fhir-server.log",
        }

        async with Demo(data, ports, "--keep") as kept:
            assert f"data: {data}/ (kept from earlier demos)" in kept.banner
            assert await kept.audit_event_count(http) == 1
            await kept.stop()
        async with Demo(data, ports) as fresh:
            assert await fresh.audit_event_count(http) == 0
            await fresh.stop()


@pytest.mark.slow
async def test_a_configuration_with_workers_runs_one_in_the_demo(tmp_path: Path) -> None:
    """The demo serves in its own process: a ``workers: 2`` configuration is run as one
    worker on the demo's one store (not as worker 0 of two, on half a sharded store)."""
    config = tmp_path / "workers.yaml"
    config.write_text("workers: 2\n")
    data = tmp_path / "demo"
    ports = (free_port(), free_port(), free_port())
    async with aiohttp.ClientSession() as http, Demo(data, ports, "-c", str(config)) as demo:
        async with http.get(f"http://127.0.0.1:{ports[0]}/fhir/metadata") as r:
            assert r.status == 200
        code, err = await demo.stop()
    assert code == 0, err
    assert "scripts/demo: the demo runs one worker (the configuration's workers: 2" in err
    assert (data / "audit.db").exists() and not (data / "audit-0.db").exists()


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_script", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fhir_server_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    demo = _demo_module()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        log = tmp_path / "fhir-server.log"
        with pytest.raises(demo.DemoError) as caught:
            demo.start_fhir_server(port, log)
    message = str(caught.value)
    assert message.startswith("the test FHIR server did not start: Error: listen EADDRINUSE")
    assert f"127.0.0.1:{port}" in message and f"(log: {log})" in message
    assert "\n" not in message


@pytest.mark.slow
async def test_the_banner_gives_the_dlq_command_for_the_demo_s_store(tmp_path: Path) -> None:
    """`dlq list` alone looks for data/audit.db; the banner prints the command that reads
    the demo's store, and it does, from any directory."""
    data = tmp_path / "demo"
    async with Demo(data, (free_port(), free_port(), free_port())) as demo:
        (command,) = [line.strip() for line in demo.banner if line.endswith(" dlq list")]
        assert command.startswith(f"FHIR_AUDIT_STORE__PATH={data / 'audit.db'} ")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        listing = await asyncio.create_subprocess_shell(
            command, stdout=-1, stderr=-1, env=_env(), cwd=elsewhere
        )
        out, err = await listing.communicate()
        await demo.stop()
    assert listing.returncode == 0, err.decode()
    assert err.decode() == f"no dead-lettered events in {data / 'audit.db'}\n"
    assert out == b""
