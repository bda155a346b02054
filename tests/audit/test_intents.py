"""``OpenIntents`` (proxy/audit/intents.py): the intents one proxy keeps apart from the
orphans recovery records, against a real store: one still forwarded is left alone, one
whose events the store refused is recorded with why, the rest as the proxy stopping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.audit.balp import AuditContext
from proxy.audit.intents import STORE_FULL_OUTCOME_DESC, UNKNOWN_OUTCOME_DESC, OpenIntents
from proxy.store.queue import AuditQueue
from tests.factories import request_id_of


def _summary(request_id: str) -> dict[str, Any]:
    return {
        "method": "DELETE", "path": "Patient/p1", "query_string": "", "request_id": request_id,
        "client_address": "127.0.0.1", "base_url": "http://x/fhir",
        "started_at": datetime.now(UTC).isoformat(), "accept": None,
        "interaction": {"kind": "delete", "method": "DELETE", "resource_type": "Patient",
                        "resource_id": "p1"},
        "identity": {}, "patients": ["Patient/p1"],
    }  # fmt: skip


async def test_in_flight_intents_wait_and_abandoned_ones_are_recorded_with_their_reason(
    queue: AuditQueue,
) -> None:
    intents = OpenIntents()
    forwarding = await queue.record_intent(_summary("r-forwarding"))
    refused = await queue.record_intent(_summary("r-refused"))
    await queue.record_intent(_summary("r-stopped"))
    intents.forwarding(forwarding)
    intents.forwarding(refused)
    intents.abandon(refused, STORE_FULL_OUTCOME_DESC)
    intents.finished(refused)
    ctx, now = AuditContext.default(), datetime.now(UTC)
    later = now + timedelta(hours=1)  # every intent counts as old

    assert await intents.recover(queue, ctx, now, older_than=later) == 2
    events = {request_id_of(q.event): q.event for q in await queue.claim(10, now)}
    assert set(events) == {"r-refused", "r-stopped"}, "the one in flight is not an orphan"
    assert events["r-refused"]["outcomeDesc"] == STORE_FULL_OUTCOME_DESC
    assert events["r-stopped"]["outcomeDesc"] == UNKNOWN_OUTCOME_DESC

    intents.finished(forwarding)  # its request ended without completing it
    assert await intents.recover(queue, ctx, now, older_than=later) == 1
    assert await intents.recover(queue, ctx, now, older_than=later) == 0, "each once"
