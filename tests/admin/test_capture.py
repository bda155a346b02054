"""``audit.capture_bodies``: an exchange's bodies kept beside its events, size-limited,
credentials redacted, off by default, and returned as Smile CDR's audit-log endpoint
returns them (``GET /audit-log/event/{id}?includeBody=true``). Real proxy (the upstream's
answers from memory, ``FhirDouble``), real store, the admin API over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from proxy.audit.balp import AuditContext, build_events
from proxy.store.queue import AuditQueue
from proxy.store.records import Capture
from tests.factories import (
    NOW,
    FhirDouble,
    RunningProxy,
    StartProxy,
    exchange,
    request_id_of,
)

TOKEN = "capture-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _detail(http: aiohttp.ClientSession, proxy: RunningProxy, event_id: str) -> Any:
    url = f"{proxy.admin_url}/audit-log/event/{event_id}?includeBody=true"
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json(content_type=None)


async def _event_of(proxy: RunningProxy, request_id: str) -> dict[str, Any]:
    (event,) = [e for e in await proxy.stored_events() if request_id_of(e) == request_id]
    return event


async def test_a_create_is_returned_with_the_bodies_it_carried(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        fhir_double, audit={"capture_bodies": True}, admin={"tokens": [TOKEN]}
    )
    patient = {"resourceType": "Patient", "name": [{"family": "Captured"}]}
    async with http.post(
        f"{proxy.url}/Patient", json=patient, headers={"X-Request-Id": "cap-1"}
    ) as r:
        assert r.status == 201
        created = await r.json(content_type=None)
    detail = await _detail(http, proxy, (await _event_of(proxy, "cap-1"))["id"])
    assert detail["capturedBodies"]["request"] == patient
    assert detail["capturedBodies"]["response"]["id"] == created["id"]


async def test_a_search_form_is_captured_with_its_token_redacted_and_long_bodies_are_cut(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        fhir_double,
        audit={"capture_bodies": True, "capture_max_bytes": 40},
        admin={"tokens": [TOKEN]},
    )
    secret = "s3cret-token-in-a-form"
    async with http.post(
        f"{proxy.url}/Patient", json={"resourceType": "Patient", "name": [{"family": "Captured"}]}
    ) as r:
        assert r.status == 201
    async with http.post(
        f"{proxy.url}/Patient/_search",
        data=f"_count=5&access_token={secret}",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Request-Id": "cap-2",
        },
    ) as r:
        assert r.status == 200
        assert len(await r.read()) > 40
    detail = await _detail(http, proxy, (await _event_of(proxy, "cap-2"))["id"])
    captured = detail["capturedBodies"]
    assert captured["request"] == "_count=5&access_token=REDACTED"
    assert secret not in str(detail)
    assert isinstance(captured["response"], str)  # cut, so no longer JSON
    assert captured["response"].endswith("bytes, the first 40 kept]")
    store = Path(proxy.settings.store.path)
    for path in store.parent.iterdir():
        assert secret.encode() not in path.read_bytes()


async def test_nothing_is_captured_by_default(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double, admin={"tokens": [TOKEN]})
    async with http.post(
        f"{proxy.url}/Patient", json={"resourceType": "Patient"}, headers={"X-Request-Id": "c3"}
    ) as r:
        assert r.status == 201
    detail = await _detail(http, proxy, (await _event_of(proxy, "c3"))["id"])
    assert detail["capturedBodies"] is None
    assert "capture_bodies is off" in detail["capturedBodiesNote"]


async def test_a_capture_is_pruned_as_its_delivered_events_are(queue: AuditQueue) -> None:
    request_id = "cap-prune"
    ex = exchange("GET", "Patient/9", request_id=request_id, response={"resourceType": "Patient"})
    rows = [built.row for built in build_events(ex, AuditContext.default(), NOW)]
    bodies = Capture(request_id, b'{"resourceType":"Patient"}', b"plain text")
    await queue.append_rows(rows, capture=bodies)
    assert await queue.get_capture(request_id) == bodies
    now = datetime.now(UTC)
    later = now + timedelta(days=2)
    await queue.prune(later, timedelta(days=1))
    assert await queue.get_capture(request_id) == bodies  # its event is not delivered yet
    (claimed,) = await queue.claim(10, now)
    await queue.ack([claimed.seq], now)
    assert await queue.prune(later, timedelta(days=1)) == 1
    assert await queue.get_capture(request_id) is None
