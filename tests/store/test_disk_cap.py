"""``store.max_bytes`` bounds the files on disk (database, WAL, shared-memory index), on a
real tiny volume: the proxy starts on a full disk, fails closed (507, not ready) and
recovers when room returns."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.audit.balp import AuditContext
from proxy.audit.intents import STORE_FULL_OUTCOME_DESC, UNKNOWN_OUTCOME_DESC, recover_intents
from proxy.store.faces import StoreFull
from proxy.store.queue import AuditQueue
from tests.factories import FhirDouble, OpenStore, StartProxy, request_id_of


def _event(n: int, pad: str) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "id": f"00000000-0000-7000-8000-{n:012d}",
        "type": {"code": "rest"},
        "action": "R",
        "recorded": datetime.now(UTC).isoformat(),
        "outcome": "0",
        "outcomeDesc": pad,
        "agent": [{"who": {"display": "t"}, "requestor": True}],
        "source": {"observer": {"display": "p"}},
    }


def _on_disk(path: Path) -> int:
    return sum(
        p.stat().st_size
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
        if p.exists()
    )


async def test_database_wal_and_shm_together_stay_under_max_bytes(
    tmp_path: Path, open_store: OpenStore
) -> None:
    path = tmp_path / "audit.db"
    queue = await open_store(path, max_bytes=1_500_000)
    pads = [secrets.token_urlsafe(2000) for _ in range(2000)]
    peak = 0
    with pytest.raises(StoreFull):
        for i in range(2000):
            await queue.append([_event(i, pads[i])])
            peak = max(peak, _on_disk(path))
    await queue.close()
    assert 0 < peak <= 1_500_000, f"{peak} bytes on disk"


async def test_the_proxy_starts_on_a_full_disk_fails_closed_and_recovers(
    tiny_volume: Path,
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    open_store: OpenStore,
) -> None:
    store = tiny_volume / "audit.db"
    # An intent left by a crash, then the rest of the volume filled by something else.
    queue = await open_store(store, max_bytes=1 << 30)
    await queue.record_intent(
        {
            "method": "POST", "path": "Patient", "query_string": "", "request_id": "crashed",
            "client_address": "127.0.0.1", "base_url": "http://x/fhir",
            "started_at": datetime.now(UTC).isoformat(), "accept": None,
            "interaction": {"kind": "create", "method": "POST", "resource_type": "Patient"},
            "identity": {}, "patients": [],
        }
    )  # fmt: skip
    await queue.close()
    filler = tiny_volume / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    # Leave room to open the store (its shared-memory index), not to write to it.
    with filler.open("r+b") as out:
        out.truncate(filler.stat().st_size - 40 * 1024)

    proxy = await start_proxy(fhir_double, store={"path": store})  # does not crash
    async with http.post(
        f"{proxy.url}/Patient", json={"resourceType": "Patient"}, headers={"X-Request-Id": "w1"}
    ) as r:
        assert r.status == 507
    async with http.get(f"{proxy.admin_url}/readyz") as r:
        ready = await r.json()
        assert r.status == 503, ready
        assert ready["checks"]["store"]["failing_closed"] == "store full"

    filler.unlink()  # room returns
    async with http.post(
        f"{proxy.url}/Patient", json={"resourceType": "Patient"}, headers={"X-Request-Id": "w2"}
    ) as r:
        assert r.status == 201
    async with http.get(f"{proxy.admin_url}/readyz") as r:
        assert r.status == 200
    # The crash's intent, which start-up could not record, is recorded once there is room.
    for _ in range(100):
        crashed = [e for e in await proxy.stored_events() if request_id_of(e) == "crashed"]
        if crashed:
            break
        await asyncio.sleep(0.1)
    (event,) = crashed
    assert event["outcome"] == "8"
    assert event["outcomeDesc"] == UNKNOWN_OUTCOME_DESC
    shutil.rmtree(tiny_volume, ignore_errors=True)


async def test_an_intent_abandoned_because_the_store_refused_its_events_says_so(
    queue: AuditQueue,
) -> None:
    summary = {
        "method": "DELETE", "path": "Patient/p1", "query_string": "", "request_id": "r-full",
        "client_address": "127.0.0.1", "base_url": "http://x/fhir",
        "started_at": datetime.now(UTC).isoformat(), "accept": None,
        "interaction": {"kind": "delete", "method": "DELETE", "resource_type": "Patient",
                        "resource_id": "p1"},
        "identity": {}, "patients": ["Patient/p1"],
    }  # fmt: skip
    full = await queue.record_intent(summary)
    stopped = await queue.record_intent({**summary, "request_id": "r-stopped"})
    reasons = {full: STORE_FULL_OUTCOME_DESC}
    ctx = AuditContext.default()
    assert await recover_intents(queue, ctx, datetime.now(UTC), reasons=reasons) == 2
    assert reasons == {}, "a recorded reason is forgotten"
    events = {request_id_of(q.event): q.event for q in await queue.claim(10, datetime.now(UTC))}
    assert events["r-full"]["outcomeDesc"] == STORE_FULL_OUTCOME_DESC
    assert events["r-stopped"]["outcomeDesc"] == UNKNOWN_OUTCOME_DESC
    assert stopped != full


async def test_the_store_full_reason_of_an_abandoned_intent_survives_a_restart(
    tmp_path: Path,
    open_store: OpenStore,
) -> None:
    path = tmp_path / "audit.db"
    summary = {
        "method": "DELETE", "path": "Patient/p1", "query_string": "", "request_id": "r-full",
        "client_address": "127.0.0.1", "base_url": "http://x/fhir",
        "started_at": datetime.now(UTC).isoformat(), "accept": None,
        "interaction": {"kind": "delete", "method": "DELETE", "resource_type": "Patient",
                        "resource_id": "p1"},
        "identity": {}, "patients": ["Patient/p1"],
    }  # fmt: skip
    queue = await open_store(path, max_bytes=1 << 30)
    full = await queue.record_intent(summary)
    await queue.record_intent({**summary, "request_id": "r-stopped"})
    ctx = AuditContext.default()
    # maintenance runs while the intent is still young: it is noted, not yet recovered
    reasons = {full: STORE_FULL_OUTCOME_DESC}
    young = datetime.now(UTC) - timedelta(hours=1)
    assert (
        await recover_intents(queue, ctx, datetime.now(UTC), older_than=young, reasons=reasons) == 0
    )
    await queue.close()  # the process stops; its in-memory reasons are gone

    queue = await open_store(path, max_bytes=1 << 30)
    assert await recover_intents(queue, ctx, datetime.now(UTC)) == 2
    events = {request_id_of(q.event): q.event for q in await queue.claim(10, datetime.now(UTC))}
    await queue.close()
    assert events["r-full"]["outcomeDesc"] == STORE_FULL_OUTCOME_DESC
    assert events["r-stopped"]["outcomeDesc"] == UNKNOWN_OUTCOME_DESC
