"""The audit pipeline: each body parsed once per exchange, and hooks called only for the
callbacks they override."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.audit.balp import AuditContext, Built
from proxy.audit.intents import OpenIntents
from proxy.audit.pipeline import (
    AuditPipeline,
    AuditPolicy,
    Hook,
    ReadBeforeDelete,
    SampledValidation,
    standard_hooks,
)
from proxy.exchange import Exchange
from proxy.fhir.interaction import CREDENTIAL_PARAMS
from proxy.settings import IdentitySettings
from proxy.store.queue import AuditQueue
from tests.factories import FhirDouble, StartProxy, exchange, patient_refs


async def test_a_transaction_body_and_its_answer_are_each_parsed_once(
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Classifying a POST to the base needs the Bundle's type, the intent and the events
    need its entries: all from one parse. The answer is parsed once as well."""
    proxy = await start_proxy(fhir_double)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                "resource": {"resourceType": "Patient", "name": [{"family": "Once"}]},
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    body = orjson.dumps(bundle)
    parsed: list[bytes] = []
    loads = orjson.loads

    def counting(data: Any) -> Any:
        parsed.append(bytes(data) if isinstance(data, bytes | bytearray | memoryview) else b"")
        return loads(data)

    monkeypatch.setattr(orjson, "loads", counting)
    async with http.post(
        f"{proxy.url}/", data=body, headers={"Content-Type": "application/fhir+json"}
    ) as r:
        assert r.status == 200
        answer = await r.read()
    monkeypatch.setattr(orjson, "loads", loads)
    assert parsed.count(body) == 1
    assert parsed.count(answer) == 1
    events = await proxy.stored_events()
    created = [e for e in events if patient_refs(e)]
    assert created, "the transaction's Patient is audited from the parsed bodies"


class _Recording(Hook):
    name = "recording"

    def __init__(self) -> None:
        self.stored: list[tuple[str, int]] = []

    def events_stored(
        self, ex: Exchange, built: Sequence[Built], started_ns: int, ended_ns: int
    ) -> None:
        assert ended_ns >= started_ns
        self.stored.append((ex.request_id, len(built)))


def _pipeline(queue: AuditQueue, hooks: Sequence[Hook]) -> AuditPipeline:
    return AuditPipeline(
        policy=AuditPolicy(
            identity=IdentitySettings(),
            redact_params=CREDENTIAL_PARAMS,
            token_key=b"k" * 32,
            base_path="/fhir",
        ),
        ctx=AuditContext.default(),
        queue=queue,
        jwks=None,
        intents=OpenIntents(),
        hooks=hooks,
    )


async def test_a_hook_is_called_for_what_it_overrides_once_the_events_are_durable(
    queue: AuditQueue,
) -> None:
    hook = _Recording()
    pipeline = _pipeline(queue, [hook])
    ex = exchange("GET", "Patient/7", response={"resourceType": "Patient", "id": "7"})
    assert pipeline.admit(ex) is None
    assert await pipeline.persist(ex) is None
    assert hook.stored == [(ex.request_id, 1)]
    (stored,) = [q.event for q in await queue.claim(10, ex.started_at)]
    assert patient_refs(stored) == ["Patient/7"]
    # Bound once, by the callbacks the hook overrides: it has no before-forward callback.
    assert pipeline._before_forward == ()
    assert len(pipeline._on_stored) == 1


def test_the_standard_hooks_are_those_the_settings_ask_for() -> None:
    async def read(ex: Exchange, forwarded: Mapping[str, str]) -> bytes | None:
        return None

    pending: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    plain = [h.name for h in standard_hooks(read_before_delete=None, validation=(0.0, pending))]
    assert plain == ["tracing", "metrics"]
    full = standard_hooks(read_before_delete=read, validation=(0.5, pending))
    assert [h.name for h in full] == ["tracing", "metrics", "read-before-delete", "validation"]
    assert isinstance(full[2], ReadBeforeDelete)
    assert isinstance(full[3], SampledValidation)


def test_the_metrics_hook_counts_every_event_by_its_outcome() -> None:
    """A search answer naming three patients is three events counted, each under its
    outcome (counted once per outcome, not once per event)."""
    from proxy import telemetry
    from proxy.audit.balp import build_events
    from proxy.audit.pipeline import Metrics
    from tests.factories import NOW

    entries = [
        {
            "resource": {
                "resourceType": "Observation",
                "id": f"o{n}",
                "subject": {"reference": f"Patient/{n}"},
            }
        }
        for n in range(3)
    ]
    ex = exchange(
        "GET",
        "Observation",
        query="code=x",
        response={"resourceType": "Bundle", "type": "searchset", "entry": entries},
    )
    built = build_events(ex, AuditContext.default(), NOW)
    assert len(built) == 3
    cell = telemetry.EVENTS_BUILT.labels(outcome="0")
    before = cell.value
    Metrics().events_stored(ex, built, 0, 1)
    assert cell.value - before == 3
