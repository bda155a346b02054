"""The audit pipeline: what is done to an exchange so that it is audited before it is
answered.

For every request forwarding (:mod:`proxy.http.forward`) hands over, in order:

1. :meth:`AuditPipeline.admit`: classify the request and read the caller's identity (never
   keeping the token);
2. :meth:`AuditPipeline.before_forward`: the hooks that must act before the upstream sees
   the request (reading a resource about to be deleted), then, for a request that can
   change server state, a durable intent;
3. (forwarding sends the request on and holds the answer);
4. :meth:`AuditPipeline.persist`: build the AuditEvents and commit them with fsync,
   completing the intent; only then may forwarding release the answer.

When 1, 2 or 4 fails, the pipeline returns an :class:`AuditFailure`: the request fails
closed, and the client gets its OperationOutcome instead of the upstream's answer. The
pipeline knows nothing of HTTP connections or answers.

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO, ClassVar, Protocol

from yarl import URL

from proxy import telemetry
from proxy.audit.balp import AuditContext, Built, build_events, store_entries, store_rows
from proxy.audit.identity import IdentityCache, JwksCache, load_token_key
from proxy.audit.intents import (
    STORE_ERROR_OUTCOME_DESC,
    STORE_FULL_OUTCOME_DESC,
    OpenIntents,
    intent_summary,
)
from proxy.exchange import Exchange
from proxy.fhir.compartment import PATIENT_PATHS
from proxy.fhir.interaction import (
    Interaction,
    InteractionKind,
    classify,
    credential_params,
    parse_json_object,
    redact_params,
)
from proxy.fhir.large_bundle import audit_view
from proxy.fhir.operation_outcome import FHIR_JSON
from proxy.fhir.patients import patients_in_resource
from proxy.settings import IdentitySettings, Settings
from proxy.store.faces import EventWriter, StoreError, StoreFull
from proxy.store.records import Capture

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that cannot change server state (RFC 9110 §9.2.1). Every other request gets a
durable intent before it is forwarded, whatever it was classified as."""

BUILD_IN_THREAD = 256 * 1024
"""Bodies (request and response together) above this size have their events built off
the event loop, one exchange at a time: parsing a large Bundle and finding its patients
is long enough to stall the loop (in a thread the loop gets the GIL back every switch
interval), and its parse takes several times the body's size in memory, so hundreds of
large answers at once must not each be read back and parsed at the same time."""

ReadResource = Callable[[Exchange, Mapping[str, str]], Awaitable[bytes | None]]
"""Reads, from the upstream, the resource an exchange addresses, with the headers its
request is forwarded with (the caller's own credentials); None when it cannot (not found,
forbidden, unreachable, too large)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuditFailure:
    """The audit of an exchange failed: the request fails closed, and the client is told
    so in an OperationOutcome."""

    status: int
    """500 (not classified, not built), 503 (the store failed), 507 (the store is full)."""
    code: str
    """The OperationOutcome's issue type."""
    diagnostics: str
    retry_after_s: int | None = None
    """When to try again (``Retry-After``), for a store that may recover."""


class HeldResponse(Protocol):
    """A response body too large to keep in memory, waiting for its audit
    (:class:`proxy.http.buffering.HeldBody`)."""

    @property
    def size(self) -> int: ...

    def reader(self) -> BinaryIO:
        """The body as a file positioned at its start."""
        ...

    def value(self) -> bytes:
        """The whole body."""
        ...

    def head(self, n: int) -> bytes:
        """Its first ``n`` bytes."""
        ...


class Hook:
    """A side concern of the pipeline. Subclasses override the callbacks they need."""

    name: ClassVar[str] = "hook"

    def exchange_started(self, ex: Exchange) -> None:
        """The exchange exists (before classification)."""

    async def before_forward(self, ex: Exchange, forwarded: Mapping[str, str]) -> None:
        """Classified, not yet forwarded, no intent yet (what is learnt here can reach the
        intent's outcome-unknown event). ``forwarded``: the headers the request is to be
        forwarded with."""

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

    async def before_forward(self, ex: Exchange, forwarded: Mapping[str, str]) -> None:
        assert ex.interaction is not None
        if not self.applies(ex.interaction):
            return
        body = await self._read(ex, forwarded)
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
    """Parameter names (lower case) whose values are never recorded."""
    token_key: bytes
    """The key opaque bearer tokens are hashed under."""
    base_path: str
    """The FHIR base path (``/fhir``); a path outside it is recorded as unknown."""
    capture_max_bytes: int | None = None
    """Bytes kept of each body with ``audit.capture_bodies``; None: bodies not captured."""

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditPolicy:
        """Reads (or, on first start, creates) the token key file beside the store."""
        configured_key = settings.audit.token_hash_key
        store = settings.store.path
        return cls(
            identity=settings.audit.identity,
            redact_params=credential_params(settings.audit.redact_params),
            token_key=load_token_key(
                configured_key.get_secret_value() if configured_key else None,
                store.with_name(store.name + ".token-key"),
            ),
            base_path=URL(settings.upstream.url).path.rstrip("/"),
            capture_max_bytes=(
                settings.audit.capture_max_bytes if settings.audit.capture_bodies else None
            ),
        )


class AuditPipeline:
    """Classify, intend, build and commit the audit of each exchange (see the module)."""

    def __init__(
        self,
        *,
        policy: AuditPolicy,
        ctx: AuditContext,
        queue: EventWriter,
        jwks: JwksCache | None,
        intents: OpenIntents,
        hooks: Sequence[Hook],
    ) -> None:
        self._policy = policy
        self._ctx = ctx
        self._queue = queue
        self._jwks = jwks
        self._identities = IdentityCache(policy.identity, token_key=policy.token_key)
        self._intents = intents
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

    def admit(self, ex: Exchange) -> AuditFailure | None:
        """Classify ``ex`` and identify its caller; the failure when that fails."""
        try:
            ex.interaction = self._classified(ex)
            keys = self._jwks.keys() if self._jwks is not None else None
            ex.identity = self._identities.identity(ex.request_headers, keys)
        except Exception:
            log.exception("classification failed for %s %s", ex.method, ex.path)
            self._failed(ex, "classify")
            return _NOT_CLASSIFIED
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

    async def before_forward(
        self, ex: Exchange, forwarded: Mapping[str, str]
    ) -> AuditFailure | None:
        """Run the before-forward hooks (``forwarded``: the headers the request is to be
        forwarded with), then commit an intent for a request that can change server
        state; the failure when the intent cannot be persisted."""
        for callback in self._before_forward:
            await callback(ex, forwarded)
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
        self._intents.forwarding(ex.intent_id)
        return None

    def finished(self, ex: Exchange) -> None:
        """The exchange is over (answered or abandoned): its intent is no longer in flight."""
        if ex.intent_id is not None:
            self._intents.finished(ex.intent_id)

    # --- 4. build and commit ---------------------------------------------------------------

    async def persist(
        self, ex: Exchange, *, held_response: HeldResponse | None = None
    ) -> AuditFailure | None:
        """Build and commit the events of ``ex`` (completing its intent); the failure
        when that fails. ``held_response`` is a large
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
            return _NOT_BUILT
        for on_built in self._on_built:
            on_built(ex, built)
        capture = ex.capture
        started_ns = time.time_ns()
        try:
            await self._queue.append_rows(
                store_rows(built),
                complete_intent=ex.intent_id,
                capture=capture,
                entries=store_entries(built),
            )
        except StoreError as exc:
            if ex.intent_id is not None:
                full = isinstance(exc, StoreFull)
                self._intents.abandon(
                    ex.intent_id, STORE_FULL_OUTCOME_DESC if full else STORE_ERROR_OUTCOME_DESC
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
        held: HeldResponse | None,
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

    def _capture(self, ex: Exchange, held: HeldResponse | None = None) -> None:
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

    def _fail_closed(self, ex: Exchange, exc: Exception, stage: str) -> AuditFailure:
        full = isinstance(exc, StoreFull)
        self._failed(ex, "store_full" if full else "store_error")
        log.error("audit %s could not be persisted (%s): failing the request closed", stage, exc)
        return _STORE_FULL if full else _STORE_FAILED


_NOT_CLASSIFIED = AuditFailure(
    status=500, code="exception", diagnostics="The request could not be classified for audit."
)
_NOT_BUILT = AuditFailure(
    status=500,
    code="exception",
    diagnostics="The audit record could not be built; the request was not completed.",
)
_STORE_FULL = AuditFailure(
    status=507,
    code="transient",
    diagnostics="The audit record could not be persisted (audit store full);"
    " the request was not completed.",
    retry_after_s=5,
)
_STORE_FAILED = AuditFailure(
    status=503,
    code="transient",
    diagnostics="The audit record could not be persisted; the request was not completed.",
    retry_after_s=5,
)
