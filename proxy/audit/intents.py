"""Write intents: what is committed before a state-changing request is forwarded, and how
an intent that was never completed (the proxy stopped, or the store refused the write's
events) is recorded as an outcome-unknown AuditEvent."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from proxy.audit.balp import (
    QUERY_LIMIT,
    AuditContext,
    AuditedInteraction,
    BuildOptions,
    interaction_events,
    merged_patients,
)
from proxy.audit.identity import Identity
from proxy.audit.rows import Built, store_entries, store_rows
from proxy.exchange import Exchange
from proxy.fhir.interaction import Interaction, InteractionKind
from proxy.fhir.patients import patients_of_exchange
from proxy.store.faces import EventWriter, StoreError

log = logging.getLogger(__name__)

UNKNOWN_OUTCOME_DESC = (
    "outcome unknown: the proxy stopped before the FHIR server's answer was recorded"
)
STORE_FULL_OUTCOME_DESC = (
    "outcome unknown: the audit store was full when the FHIR server answered, so the"
    " answer was not recorded (the client was told the request failed)"
)
STORE_ERROR_OUTCOME_DESC = (
    "outcome unknown: the audit store failed when the FHIR server answered, so the"
    " answer was not recorded (the client was told the request failed)"
)

_SUMMARY_SEARCH_PARAMS = 200


def intent_summary(exchange: Exchange, *, max_query_bytes: int = QUERY_LIMIT) -> dict[str, Any]:
    """What is committed before a write is forwarded: enough to record the write if the
    proxy stops before its answer is audited. Holds no credential: the exchange's query
    and form body are already redacted, and an opaque token is only its keyed hash. For
    ``orjson.dumps``: the interaction and identity are their dataclasses, written as
    objects."""
    interaction = exchange.interaction
    assert interaction is not None
    identity = exchange.identity or Identity()
    return {
        "method": exchange.method,
        "path": exchange.path,
        "query_string": exchange.query_string[:max_query_bytes],
        "request_id": exchange.request_id,
        "client_address": exchange.client_address,
        "base_url": exchange.base_url,
        "started_at": exchange.started_at.isoformat(),
        "accept": exchange.request_headers.get("accept"),
        # The dataclasses themselves: orjson writes them (enums as values, tuples as
        # arrays) as dataclasses.asdict would, without asdict's deep copy. The
        # search as far as an event's description shows it, not a 10,000-parameter form.
        "interaction": (
            dataclasses.replace(interaction, search=interaction.search[:_SUMMARY_SEARCH_PARAMS])
            if len(interaction.search) > _SUMMARY_SEARCH_PARAMS
            else interaction
        ),
        "identity": identity,
        "patients": list(
            merged_patients(
                exchange.prior_patients,
                patients_of_exchange(interaction, exchange.request_json(), None, {}),
            )
        ),
    }


def _interaction_from(data: Mapping[str, Any]) -> Interaction:
    fields = dict(data)
    fields["kind"] = InteractionKind(fields["kind"])
    fields["search"] = tuple(tuple(p) for p in fields.get("search") or ())
    if fields.get("compartment"):
        fields["compartment"] = tuple(fields["compartment"])
    return Interaction(**fields)


def _identity_from(data: Mapping[str, Any]) -> Identity:
    fields = dict(data)
    fields.pop("token_tail", None)  # intents written before tokens were hashed: forget it
    for name in ("purpose_of_use", "roles", "scopes"):
        fields[name] = tuple(fields.get(name) or ())
    return Identity(**fields)


def build_unknown_outcome_events(
    summary: Mapping[str, Any],
    ctx: AuditContext,
    now: datetime,
    description: str = UNKNOWN_OUTCOME_DESC,
) -> list[Built]:
    """Events (with their rows) for a write whose intent was never completed: outcome 8,
    and a description saying why the outcome is unknown (by default: the proxy stopped)."""
    interaction = _interaction_from(summary["interaction"])
    exchange = Exchange(
        request_id=summary["request_id"],
        method=summary["method"],
        path=summary["path"],
        query_string=summary["query_string"],
        request_headers={"accept": summary["accept"]} if summary.get("accept") else {},
        client_address=summary["client_address"],
        started_at=datetime.fromisoformat(summary["started_at"]),
        base_url=summary["base_url"],
        interaction=interaction,
        identity=_identity_from(summary["identity"]),
        error=description,
    )
    audited = AuditedInteraction(
        interaction=interaction,
        status=None,
        error=description,
        request_resource=None,
        response_resource=None,
        location=None,
        patients=tuple(summary.get("patients") or ()),
    )
    return interaction_events(
        exchange, audited, ctx, now, outcome=("8", description), options=BuildOptions.of(ctx)
    )


async def recover_intents(
    queue: EventWriter,
    ctx: AuditContext,
    now: datetime,
    *,
    older_than: datetime | None = None,
    in_flight: set[int] | frozenset[int] = frozenset(),
    reasons: dict[int, str] | None = None,
    left_at_start: int = 0,
) -> int:
    """Turn intents that never completed into outcome-unknown AuditEvents.
    At start-up every intent is an orphan; later, only old ones no request still owns.
    ``reasons`` gives the description of intents abandoned because the store refused
    their events (noted in the store's intents table first, and taken out once recorded;
    a reason noted there by an earlier process counts too); any other's says the proxy
    stopped. Intents with ids up to ``left_at_start`` were orphans before this process
    started (start-up could not record them): they are recovered whatever their age."""
    recovered = 0
    reasons = reasons if reasons is not None else {}
    if reasons:  # noted in the store first: a restart before recovery must not forget them
        with contextlib.suppress(StoreError):  # a store that refuses this refuses recovery too
            await queue.note_intent_reasons(dict(reasons))
    for intent in await queue.orphan_intents():
        young = older_than is not None and intent.created_at > older_than
        if intent.id in in_flight or (young and intent.id > left_at_start):
            continue
        why = reasons.get(intent.id) or intent.reason
        if why is None:
            built = build_unknown_outcome_events(intent.summary, ctx, now)
        else:
            built = build_unknown_outcome_events(intent.summary, ctx, now, why)
        await queue.append_rows(
            store_rows(built), complete_intent=intent.id, entries=store_entries(built)
        )
        reasons.pop(intent.id, None)
        recovered += 1
    if recovered:
        log.warning("recorded %d interaction(s) whose outcome is unknown", recovered)
    return recovered


class OpenIntents:
    """The intents of one proxy that recovery must tell apart from orphans: those whose
    request is still in flight (their answer is coming), and those whose request was
    failed closed because the store refused its events (each with the outcome
    description its recovery records). The audit pipeline opens, closes and abandons
    them; maintenance recovers through :meth:`recover`."""

    __slots__ = ("_abandoned", "_in_flight")

    def __init__(self) -> None:
        self._in_flight: set[int] = set()
        self._abandoned: dict[int, str] = {}

    def forwarding(self, intent_id: int) -> None:
        """Its request is being forwarded."""
        self._in_flight.add(intent_id)

    def finished(self, intent_id: int) -> None:
        """Its request is over (its intent is completed, or abandoned)."""
        self._in_flight.discard(intent_id)

    def abandon(self, intent_id: int, description: str) -> None:
        """The store refused its events: recovery records it with ``description``."""
        self._abandoned[intent_id] = description

    async def recover(
        self,
        queue: EventWriter,
        ctx: AuditContext,
        now: datetime,
        *,
        older_than: datetime,
        left_at_start: int = 0,
    ) -> int:
        """:func:`recover_intents` for the orphans older than ``older_than`` that no
        request still owns (see there)."""
        return await recover_intents(
            queue,
            ctx,
            now,
            older_than=older_than,
            in_flight=self._in_flight,
            reasons=self._abandoned,
            left_at_start=left_at_start,
        )
