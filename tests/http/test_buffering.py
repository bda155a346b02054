"""Answers wait for their audit within a memory budget: small ones in memory while the
budget shared by all requests has room, the rest in temporary files; large ones are
read back and parsed for the audit one at a time. Through a real proxy, a real upstream
and the real store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.app import HANDLER
from proxy.audit import pipeline as pipeline_module
from proxy.audit.balp import build_events
from proxy.http.buffering import SPILL_AT
from tests.factories import StartProxy, patient_refs, refuse_inserts, serving


def _searchset(n: int, patients: int) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Observation",
                        "id": f"o{i}",
                        "status": "final",
                        "code": {"text": "x" * 200},
                        "subject": {"reference": f"Patient/p{i % patients}"},
                    }
                }
                for i in range(n)
            ],
        }
    )


SMALL = _searchset(120, 2)  # ~40 KB: under SPILL_AT
LARGE = _searchset(1500, 3)  # ~500 KB: spills, and is built in a thread
assert len(SMALL) < SPILL_AT < len(LARGE)


def _deleted_files() -> int:
    """Open descriptors of this process on unlinked files (temporary files)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
    return count


async def _fetch_concurrently(http: aiohttp.ClientSession, url: str, n: int) -> list[bytes]:
    """``n`` GETs of ``url`` at once; each must succeed."""

    async def fetch() -> bytes:
        async with http.get(url) as r:
            assert r.status == 200
            return await r.read()

    return list(await asyncio.gather(*(fetch() for _ in range(n))))


async def _upstream_answering(body: bytes) -> Any:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/fhir+json")

    return serving(("GET", "/fhir/Observation", answer))


async def test_small_answers_past_the_memory_budget_wait_in_files_and_arrive_whole(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    async with await _upstream_answering(SMALL) as upstream:
        proxy = await start_proxy(
            str(upstream.make_url("/fhir")), audit={"buffer_memory_bytes": 2 * len(SMALL)}
        )
        budget = proxy.app[HANDLER].budget
        open_before = _deleted_files()
        answers = await _fetch_concurrently(http, f"{proxy.url}/Observation?code=x", 12)
    assert all(a == SMALL for a in answers)
    assert 0 < budget.peak <= 2 * len(SMALL)
    assert budget.used == 0
    assert _deleted_files() == open_before
    events = await proxy.stored_events()
    assert len(events) == 12 * 2  # one event per patient per search
    assert {p for e in events for p in patient_refs(e)} == {"Patient/p0", "Patient/p1"}


async def test_large_answers_are_parsed_for_their_audit_one_at_a_time(
    start_proxy: StartProxy, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    building = 0
    most = 0
    lock = threading.Lock()
    build = build_events

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal building, most
        with lock:
            building += 1
            most = max(most, building)
        try:
            time.sleep(0.05)  # long enough that builds allowed to overlap do
            return build(*args, **kwargs)
        finally:
            with lock:
                building -= 1

    monkeypatch.setattr(pipeline_module, "build_events", counted)
    async with await _upstream_answering(LARGE) as upstream:
        proxy = await start_proxy(str(upstream.make_url("/fhir")))
        open_before = _deleted_files()
        answers = await _fetch_concurrently(http, f"{proxy.url}/Observation?code=x", 6)
    assert all(a == LARGE for a in answers)
    assert most == 1
    budget = proxy.app[HANDLER].budget
    # At most a head each, until the body spills; then it waits wholly in its file.
    assert budget.peak <= 6 * SPILL_AT
    assert budget.used == 0
    assert _deleted_files() == open_before
    events = await proxy.stored_events()
    assert len(events) == 6 * 3
    assert {p for e in events for p in patient_refs(e)} == {f"Patient/p{i}" for i in range(3)}


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["in memory", "in a file"])
async def test_an_answer_whose_audit_fails_is_not_released_and_leaves_nothing_held(
    body: bytes, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    async with await _upstream_answering(body) as upstream:
        proxy = await start_proxy(str(upstream.make_url("/fhir")))
        refuse_inserts(proxy.settings.store.path, "events")
        open_before = _deleted_files()
        async with http.get(f"{proxy.url}/Observation?code=x") as r:
            assert r.status == 503
            answer = await r.read()
    assert b"p0" not in answer
    assert orjson.loads(answer)["resourceType"] == "OperationOutcome"
    assert proxy.app[HANDLER].budget.used == 0
    assert _deleted_files() == open_before
