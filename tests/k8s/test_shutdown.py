"""A pod deleted with events pending: the sidecar, run with the environment the injector
gives it, gets SIGTERM (as the kubelet sends it once the app has stopped) with events not
yet delivered. With a repository that answers, every event reaches it before the proxy
exits; with one that never answers, the proxy still exits within the time the injector
added to the pod's ``terminationGracePeriodSeconds`` (so the kubelet never has to kill it
mid-write), the events stay in its store, and its last log line says how many and where."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml

from proxy.k8s.patch import DEFAULT_GRACE_S, SIDECAR, Selection, decide
from proxy.settings import WebhookSettings
from proxy.store.queue import AuditQueue
from tests.factories import (
    NodeFhirServer,
    RecordingRepository,
    ScriptedRepository,
    free_port,
    never_answer,
)

ROOT = Path(__file__).resolve().parents[2]
ADMISSION = Path(__file__).parent / "admission"
DRAIN_S = 3
EVENTS = 12


def injected_pod(repository_url: str) -> dict[str, Any]:
    request = yaml.safe_load((ADMISSION / "deployment-hapi.yaml").read_text())["request"]
    settings = WebhookSettings(drain_s=DRAIN_S, repository_url=repository_url)
    decision = decide(request["object"], "fhir", settings, Selection.NAMESPACE)
    pod: dict[str, Any] = jsonpatch.apply_patch(request["object"], decision.patch)
    return pod


def sidecar_env(pod: dict[str, Any]) -> dict[str, str]:
    (sidecar,) = (c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR)
    return {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}


class Sidecar:
    """The proxy as the injected sidecar runs, on loopback ports of this machine."""

    def __init__(self, env: dict[str, str], fhir_url: str, store: Path) -> None:
        self.admin = free_port()
        self.port = free_port()
        self.store = store / "audit.db"
        self.log = store / "proxy.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FHIR_AUDIT_", "OTEL_"))},
            **env,
            # Where the pod's addresses and volume are, here.
            "FHIR_AUDIT_LISTEN__HOST": "127.0.0.1",
            "FHIR_AUDIT_LISTEN__PORT": str(self.port),
            "FHIR_AUDIT_ADMIN__PORT": str(self.admin),
            "FHIR_AUDIT_STATUS__PORT": str(free_port()),
            "FHIR_AUDIT_STATUS__HOST": "127.0.0.1",
            "FHIR_AUDIT_UPSTREAM__URL": fhir_url,
            "FHIR_AUDIT_STORE__PATH": str(self.store),
            # Nothing is delivered before SIGTERM: the periodic flush waits ten minutes.
            "FHIR_AUDIT_REPOSITORY__FLUSH_INTERVAL_MS": "600000",
            "FHIR_AUDIT_REPOSITORY__MAX_FLUSH_INTERVAL_MS": "600000",
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self.log.open("wb") as sink:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "run", env=self.env, cwd=ROOT,
                stdout=sink, stderr=sink,
            )  # fmt: skip
        for _ in range(300):
            try:
                async with http.get(f"http://127.0.0.1:{self.admin}/healthz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"sidecar did not start: {self.log.read_text()}")

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM, as the kubelet sends it; the exit status and the seconds it took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.process.wait(), 60)
        return status, time.monotonic() - started

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def pending(self) -> int:
        """Events left undelivered in the store (read once the proxy has exited)."""
        queue = await AuditQueue.open(self.store, max_bytes=1 << 30)
        try:
            return (await queue.stats()).pending
        finally:
            await queue.close()


@pytest.fixture
async def make_sidecar(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Sidecar] = []

    def make(env: dict[str, str], fhir_url: str) -> Sidecar:
        sidecar = Sidecar(env, fhir_url, tmp_path)
        made.append(sidecar)
        return sidecar

    yield make
    for sidecar in made:
        await sidecar.kill()


async def create_patients(http: aiohttp.ClientSession, base: str) -> None:
    for n in range(EVENTS):
        async with http.post(
            f"{base}/Patient",
            json={"resourceType": "Patient", "name": [{"family": f"Grace{n}"}]},
            headers={"Content-Type": "application/fhir+json"},
        ) as answer:
            assert answer.status == 201


async def test_a_repository_that_answers_gets_every_pending_event_before_the_proxy_exits(
    fhir_server: NodeFhirServer,
    repository: RecordingRepository,
    make_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    pod = injected_pod(repository.url)
    sidecar = make_sidecar(sidecar_env(pod), fhir_server.base_url)
    await sidecar.start(http)
    await create_patients(http, f"http://127.0.0.1:{sidecar.port}/fhir")
    assert repository.events() == []  # all pending when the pod is deleted
    status, took = await sidecar.terminate()
    assert status == 0, sidecar.log.read_text()
    assert len(repository.events()) == EVENTS
    assert await sidecar.pending() == 0
    assert "stopped: all events delivered" in sidecar.log.read_text()
    added = pod["spec"]["terminationGracePeriodSeconds"] - DEFAULT_GRACE_S
    assert took < added


async def test_a_repository_that_never_answers_cannot_hold_the_pod_past_its_grace(
    fhir_server: NodeFhirServer,
    scripted_repository: ScriptedRepository,
    make_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    scripted_repository.behaviour = never_answer
    pod = injected_pod(scripted_repository.url)
    sidecar = make_sidecar(sidecar_env(pod), fhir_server.base_url)
    await sidecar.start(http)
    await create_patients(http, f"http://127.0.0.1:{sidecar.port}/fhir")
    status, took = await sidecar.terminate()
    # The drain gives up after drain_s: well inside what the injector added to the grace
    # period (the app's own 30 s come first; then 2 x drain_s + 5 for the sidecar).
    added = pod["spec"]["terminationGracePeriodSeconds"] - DEFAULT_GRACE_S
    assert added == 2 * DRAIN_S + 5
    assert DRAIN_S - 1 < took < added, sidecar.log.read_text()
    assert status == 0, sidecar.log.read_text()
    # Nothing was delivered, and nothing is lost while the volume lasts (a PVC); the last
    # line the sidecar logs says how many events it leaves and where.
    assert scripted_repository.delivered_ids() == []
    assert await sidecar.pending() == EVENTS
    said = f"stopped: {EVENTS} events left undelivered in {sidecar.store}"
    assert said in sidecar.log.read_text()
