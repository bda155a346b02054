"""The audit pipeline: what is done to an exchange so that it is audited before it is
answered.

For every request the HTTP layer (:mod:`proxy.http.forward`) hands over, in order:

1. :meth:`AuditPipeline.admit`: classify the request and read the caller's identity (never
   keeping the token);
2. :meth:`AuditPipeline.before_forward`: the hooks that must act before the upstream sees
   the request (reading a resource about to be deleted), then, for a request that can
   change server state, a durable intent;
3. (the HTTP layer forwards and holds the answer);
4. :meth:`AuditPipeline.persist`: build the AuditEvents and commit them with fsync,
   completing the intent; only then may the HTTP layer release the answer.

When 1, 2 or 4 fails, the pipeline gives the OperationOutcome the client gets instead.

Side concerns are :class:`Hook` objects, registered in one place,
:func:`standard_hooks`: metrics, tracing, sampled validation and the read before a
delete. A hook overrides only the callbacks it needs; the pipeline calls each callback
through a list made once, holding only the hooks that override it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiohttp import web

from proxy import telemetry
from proxy.audit.balp import AuditContext, Built, build_events, store_rows
from proxy.audit.identity import IdentityCache, JwksCache
from proxy.audit.intents import STORE_ERROR_OUTCOME_DESC, STORE_FULL_OUTCOME_DESC, intent_summary
from proxy.exchange import Exchange
from proxy.fhir.compartment import PATIENT_PATHS
from proxy.fhir.interaction import (
    Interaction,
    InteractionKind,
    classify,
    parse_json_object,
    redact_params,
)
from proxy.fhir.large_bundle import audit_view
from proxy.fhir.operation_outcome import FHIR_JSON, outcome_response
from proxy.fhir.patients import patients_in_resource
from proxy.http.buffering import HeldBody
from proxy.http.listener import ClientRequest
from proxy.settings import IdentitySettings
from proxy.store.faces import EventWriter, StoreError, StoreFull
from proxy.store.records import Capture

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that cannot change server state (RFC 9110 §9.2.1). Every other request gets a
durable intent before it is forwarded, whatever it was classified as."""

BUILD_IN_THREAD = 256 * 1024
"""Bodies (request and response together) above this size have their events built off
the event loop, one exchange at a time: parsing a large Bundle and finding its patients
takes tens of ms of Python (in a thread the loop gets the GIL back every switch
interval), and its parse takes several times the body's size in memory, so hundreds of
large answers at once must not each be read back and parsed at the same time."""

ReadResource = Callable[[ClientRequest, Exchange], Awaitable[bytes | None]]
"""Reads, from the upstream and with the caller's own headers, the resource an exchange
addresses; None when it cannot (not found, forbidden, unreachable, too large)."""


class Hook:
    """A side concern of the pipeline. Subclasses override the callbacks they need."""

    name: ClassVar[str] = "hook"

    def exchange_started(self, ex: Exchange) -> None:
        """The exchange exists (before classification)."""

    async def before_forward(self, ex: Exchange, request: ClientRequest) -> None:
        """Classified, not yet forwarded, no intent yet (what is learnt here can reach the
        intent's outcome-unknown event)."""

    def events_built(self, ex: Exchange, built: Sequence[Built]) -> None:
        """The events are built, not yet durable. Each item's ``event`` is a copy parsed
        from its row: what a hook does to it does not reach the store."""

    def events_stored(
        self, ex: Exchange, built: Sequence[Built], started_ns: int, ended_ns: int
    ) -> None:
        """The events are durable; the write ran from ``started_ns`` to ``ended_ns``
        (``time.time_ns()``)."""

    def audit_failed(self, ex: Exchange | None, reason: str) -> None:
        """The audit failed at ``reason`` (classify, build, store_full, store_error) and
        the request fails closed."""


def _overrides(hook: Hook, callback: str) -> bool:
    return getattr(type(hook), callback) is not getattr(Hook, callback)


class Metrics(Hook):
    """Requests, events and audit failures counted; the durable write timed."""

    name = "metrics"

    def events_stored(
        self, ex: Exchange, built: Sequence[Built], started_ns: int, ended_ns: int
    ) -> None:
        telemetry.AUDIT_WRITE_SECONDS.observe((ended_ns - started_ns) / 1e9)
        outcomes: dict[str, int] = {}  # one label lookup per outcome, not per event
        for item in built:
            outcome = item.outcome or "?"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        for outcome, count in outcomes.items():
            telemetry.EVENTS_BUILT.labels(outcome=outcome).inc(count)
        kind = ex.interaction.kind.value if ex.interaction is not None else "unknown"
        status_class = f"{(ex.status or 0) // 100}xx"
        telemetry.REQUESTS.labels(kind=kind, status_class=status_class).inc()

    def audit_failed(self, ex: Exchange | None, reason: str) -> None:
        telemetry.AUDIT_FAILURES.labels(reason=reason).inc()


class Tracing(Hook):
    """The exchange named on the request's server span and logs; the durable write as a
    child span. (The builder puts the traceparent on the events.)"""

    name = "tracing"

    def exchange_started(self, ex: Exchange) -> None:
        telemetry.exchange_started(ex)

    def events_stored(
        self, ex: Exchange, built: Sequence[Built], started_ns: int, ended_ns: int
    ) -> None:
        telemetry.record_audit_write(len(built), started_ns, ended_ns)


class SampledValidation(Hook):
    """A sample of the events (``audit.validate_sample_rate``) offered to a validator that
    runs off the request path; what it cannot take at once is skipped."""

    name = "validation"

    def __init__(self, rate: float, pending: asyncio.Queue[dict[str, Any]]) -> None:
        self._rate = rate
        self._pending = pending

    def events_built(self, ex: Exchange, built: Sequence[Built]) -> None:
        for item in built:
            if random.random() < self._rate:
                try:
                    self._pending.put_nowait(item.event)
                except asyncio.QueueFull:
                    return


class ReadBeforeDelete(Hook):
    """Before a DELETE of one resource that can belong to a patient, read it, so the
    events (and an outcome-unknown event after a crash) name its patients. A Patient's
    own delete names the patient in its URL; a conditional delete names no single
    resource. Any failure of the read leaves the delete as it was."""

    name = "read-before-delete"

    def __init__(self, read: ReadResource) -> None:
        self._read = read

    @staticmethod
    def applies(interaction: Interaction) -> bool:
        return (
            interaction.kind is InteractionKind.DELETE
            and not interaction.conditional
            and interaction.resource_id is not None
            and interaction.resource_type != "Patient"
            and interaction.resource_type in PATIENT_PATHS
        )

    async def before_forward(self, ex: Exchange, request: ClientRequest) -> None:
        assert ex.interaction is not None
        if not self.applies(ex.interaction):
            return
        body = await self._read(request, ex)
        resource = parse_json_object(body)
        if resource is None or resource.get("resourceType") != ex.interaction.resource_type:
            return
        ex.prior_patients = patients_in_resource(resource)


def _clipped(body: bytes | None, limit: int, *, size: int | None = None) -> bytes | None:
    """``body`` cut to ``limit`` bytes, saying so; ``size`` is the whole body's when
    ``body`` is only its head."""
    whole = len(body) if size is None and body is not None else size
    if body is None or whole is None or whole <= limit:
        return body
    return body[:limit] + f"\n[cut: {whole} bytes, the first {limit} kept]".encode()


def standard_hooks(
    *,
    read_before_delete: ReadResource | None,
    validation: tuple[float, asyncio.Queue[dict[str, Any]]] | None,
) -> list[Hook]:
    """The hooks of a running proxy, in the order they are called."""
    hooks: list[Hook] = [Tracing(), Metrics()]
    if read_before_delete is not None:
        hooks.append(ReadBeforeDelete(read_before_delete))
    if validation is not None and validation[0] > 0:
        hooks.append(SampledValidation(*validation))
    return hooks


@dataclasses.dataclass(frozen=True, slots=True)
class AuditPolicy:
    """What the pipeline needs from the settings."""

    identity: IdentitySettings
    redact_params: frozenset[str]
    token_key: bytes
    base_path: str
    capture_max_bytes: int | None = None
    """Bytes kept of each body with ``audit.capture_bodies``; None: bodies not captured."""


class AuditPipeline:
    """Classify, intend, build and commit the audit of each exchange (see the module)."""

    def __init__(
        self,
        *,
        policy: AuditPolicy,
        ctx: AuditContext,
        queue: EventWriter,
        jwks: JwksCache | None,
        intents_in_flight: set[int],
        abandoned_intents: dict[int, str],
        hooks: Sequence[Hook],
    ) -> None:
        self._policy = policy
        self._ctx = ctx
        self._queue = queue
        self._jwks = jwks
        self._identities = IdentityCache(policy.identity, token_key=policy.token_key)
        self._in_flight = intents_in_flight
        self._abandoned = abandoned_intents
        """Intents whose events the store refused, with the outcome description their
        recovery records (the proxy did not stop: the store failed)."""
        self._large_build = asyncio.Semaphore(1)
        """Held while a large body is read back, parsed and built (see BUILD_IN_THREAD)."""
        self.hooks = tuple(hooks)
        pick = [h for h in hooks if _overrides(h, "exchange_started")]
        self._on_started = tuple(h.exchange_started for h in pick)
        self._before_forward = tuple(
            h.before_forward for h in hooks if _overrides(h, "before_forward")
        )
        self._on_built = tuple(h.events_built for h in hooks if _overrides(h, "events_built"))
        self._on_stored = tuple(h.events_stored for h in hooks if _overrides(h, "events_stored"))
        self._on_failed = tuple(h.audit_failed for h in hooks if _overrides(h, "audit_failed"))

    # --- 1. admit ----------------------------------------------------------------------

    def started(self, ex: Exchange) -> None:
        for callback in self._on_started:
            callback(ex)

    def admit(self, ex: Exchange) -> web.Response | None:
        """Classify ``ex`` and identify its caller; the 500 to answer when that fails."""
        try:
            ex.interaction = self._classified(ex)
            keys = self._jwks.keys() if self._jwks is not None else None
            ex.identity = self._identities.identity(ex.request_headers, keys)
        except Exception:
            log.exception("classification failed for %s %s", ex.method, ex.path)
            self._failed(ex, "classify")
            return outcome_response(
                500, "exception", "The request could not be classified for audit."
            )
        return None

    def _classified(self, ex: Exchange) -> Interaction:
        if ex.path.startswith("/"):
            return Interaction(
                kind=InteractionKind.UNKNOWN,
                method=ex.method,
                detail=f"path outside the FHIR base {self._policy.base_path or '/'}",
            )
        interaction = classify(
            ex.method,
            ex.path,
            ex.query_string,
            ex.request_headers,
            ex.request_body,
            parsed_body=ex.request_json,
        )
        if interaction.search:
            interaction = dataclasses.replace(
                interaction, search=redact_params(interaction.search, self._policy.redact_params)
            )
        return interaction

    def refused(self, ex: Exchange, diagnostics: str) -> None:
        """``ex`` is answered by the proxy without forwarding (a malformed request)."""
        if ex.interaction is None:
            ex.interaction = Interaction(
                kind=InteractionKind.UNKNOWN, method=ex.method, detail=diagnostics
            )

    # --- 2. before forwarding --------------------------------------------------------------

    async def before_forward(self, ex: Exchange, request: ClientRequest) -> web.Response | None:
        """Run the before-forward hooks, then commit an intent for a request that can change
        server state; the OperationOutcome to answer when the intent cannot be persisted."""
        for callback in self._before_forward:
            await callback(ex, request)
        assert ex.interaction is not None
        if ex.method in SAFE_METHODS and not ex.interaction.is_write:
            return None
        try:
            ex.intent_id = await self._queue.record_intent(
                intent_summary(ex, max_query_bytes=self._ctx.max_query_bytes)
            )
        except StoreError as exc:
            refused = self._fail_closed(ex, exc, "intent")
            # The write is refused unforwarded; that is recorded too. The store that
            # refused the intent may refuse this event as well: the answer is the same.
            ex.status = refused.status
            ex.error = f"not forwarded: the audit intent could not be persisted ({exc})"
            ex.response_headers = {"content-type": FHIR_JSON}
            await self.persist(ex)
            return refused
        self._in_flight.add(ex.intent_id)
        return None

    def finished(self, ex: Exchange) -> None:
        """The exchange is over (answered or abandoned): its intent is no longer in flight."""
        if ex.intent_id is not None:
            self._in_flight.discard(ex.intent_id)

    # --- 4. build and commit ---------------------------------------------------------------

    async def persist(
        self, ex: Exchange, *, held_response: HeldBody | None = None
    ) -> web.Response | None:
        """Build and commit the events of ``ex`` (completing its intent); the
        OperationOutcome to answer instead when that fails. ``held_response`` is a large
        response body waiting in its file: read for the build only (a Bundle entry by
        entry), and let go of, with its parse, before the commit."""
        ex.finished_at = now = datetime.now(UTC)
        traceparent = telemetry.current_traceparent()
        try:
            large = held_response is not None or (
                len(ex.request_body or b"") + len(ex.response_body or b"") > BUILD_IN_THREAD
            )
            if large:
                async with self._large_build:
                    built = await asyncio.to_thread(
                        self._build_large, ex, now, traceparent, held_response
                    )
            else:
                built = build_events(ex, self._ctx, now, traceparent=traceparent)
                self._capture(ex)
                ex.drop_parsed()
        except Exception:
            log.exception("AuditEvent could not be built for %s %s", ex.method, ex.path)
            self._failed(ex, "build")
            return outcome_response(
                500,
                "exception",
                "The audit record could not be built; the request was not completed.",
            )
        for on_built in self._on_built:
            on_built(ex, built)
        capture = ex.capture
        started_ns = time.time_ns()
        try:
            await self._queue.append_rows(
                store_rows(built), complete_intent=ex.intent_id, capture=capture
            )
        except StoreError as exc:
            if ex.intent_id is not None:
                self._abandoned[ex.intent_id] = (
                    STORE_FULL_OUTCOME_DESC
                    if isinstance(exc, StoreFull)
                    else STORE_ERROR_OUTCOME_DESC
                )
            return self._fail_closed(ex, exc, "event")
        ended_ns = time.time_ns()
        for on_stored in self._on_stored:
            on_stored(ex, built, started_ns, ended_ns)
        return None

    def _build_large(
        self,
        ex: Exchange,
        now: datetime,
        traceparent: str | None,
        held: HeldBody | None,
    ) -> list[Built]:
        """In a worker thread: read a held body (a Bundle entry by entry, cut to what the
        audit reads; anything else whole), build, and let go of the body and its parse
        (they need not wait for the commit)."""
        try:
            if held is not None:
                view = audit_view(held.reader(), ex.response_headers.get("content-type", ""))
                if view is None:
                    ex.response_body = held.value()
                else:
                    ex.use_response_json(view)
            built = build_events(ex, self._ctx, now, traceparent=traceparent)
            self._capture(ex, held)
            return built
        finally:
            ex.drop_parsed()

    def _capture(self, ex: Exchange, held: HeldBody | None = None) -> None:
        """With ``audit.capture_bodies``: keep the bodies, cut to the limit, on ``ex``
        before they are let go. The request body is the recorded one (a form's
        credentials redacted)."""
        limit = self._policy.capture_max_bytes
        if limit is None:
            return
        response = ex.response_body
        if response is None and held is not None:
            response = _clipped(held.head(limit + 1), limit, size=held.size)
        else:
            response = _clipped(response, limit)
        if ex.request_body is None and response is None:
            return
        ex.capture = Capture(ex.request_id, _clipped(ex.request_body, limit), response)

    def _failed(self, ex: Exchange | None, reason: str) -> None:
        for on_failed in self._on_failed:
            on_failed(ex, reason)

    def _fail_closed(self, ex: Exchange, exc: Exception, stage: str) -> web.Response:
        full = isinstance(exc, StoreFull)
        self._failed(ex, "store_full" if full else "store_error")
        log.error("audit %s could not be persisted (%s): failing the request closed", stage, exc)
        return outcome_response(
            507 if full else 503,
            "transient",
            "The audit record could not be persisted"
            + (" (audit store full)" if full else "")
            + "; the request was not completed.",
            headers={"Retry-After": "5"},
        )
