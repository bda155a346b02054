"""Invariant 7: an event that fails fhir.resources validation is still stored and forwarded,
with a warning and a metric. The upstream here is a small real HTTP server that answers
with a resource whose security label is not valid FHIR (a code with two spaces), which the
data entity copies into the event."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.audit.validate import validate_event
from tests.factories import RecordingRepository, StartProxy, serving

BAD_LABEL = {"system": "http://example.org/labels", "code": "not  a  code"}


@pytest.fixture
async def labelling_upstream() -> AsyncIterator[str]:
    async def read(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "resourceType": "Observation",
                "id": request.match_info["id"],
                "meta": {"security": [BAD_LABEL]},
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": "Patient/p1"},
            },
            content_type="application/fhir+json",
        )

    async with serving(("GET", "/fhir/Observation/{id}", read)) as server:
        yield str(server.make_url("/fhir"))


def _invalid_count(metrics: str) -> float:
    match = re.search(r"^fhir_audit_events_invalid_total (\S+)$", metrics, re.M)
    assert match, "the invalid-events counter is exported"
    return float(match.group(1))


@pytest.mark.invalid_events("the upstream's security label is not a valid FHIR code, on purpose")
async def test_invalid_event_is_stored_forwarded_warned_and_counted(
    labelling_upstream: str,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_proxy(
        labelling_upstream,
        audit={"validate_sample_rate": 1.0},
        repository={"url": repository.url, "flush_interval_ms": 50},
    )
    async with http.get(f"{proxy.admin_url}/metrics") as resp:
        before = _invalid_count(await resp.text())
    caplog.set_level(logging.WARNING, logger="proxy")
    async with http.get(f"{proxy.url}/Observation/o1") as resp:
        assert resp.status == 200, "validation never blocks the client"
        await resp.read()

    (stored,) = await proxy.stored_events()
    assert stored["entity"][1]["securityLabel"] == [BAD_LABEL]
    assert validate_event(stored, "R4") is not None, "the event really is invalid"
    (delivered,) = await repository.wait_for(1)
    assert delivered["id"] == stored["id"]

    for _ in range(100):
        async with http.get(f"{proxy.admin_url}/metrics") as resp:
            after = _invalid_count(await resp.text())
        if after > before:
            break
        await asyncio.sleep(0.02)
    assert after == before + 1
    assert any(
        "not valid FHIR R4" in r.getMessage() and stored["id"] in r.getMessage()
        for r in caplog.records
    )
