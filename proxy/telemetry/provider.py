"""The OpenTelemetry SDK's side of the traces: the process's tracer provider, with a span
processor that hands every span to the processors registered at the time and a sampler
that records spans only while one is. Imported by :func:`~.tracing.tracer_provider` when
the first span is made, not with the package: a process that never traces need not hold
the SDK in memory."""

from __future__ import annotations

from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import SpanKind

from proxy.telemetry.resource import process_resource


class Registered(Protocol):
    """The span processors registered now (:data:`~.tracing.SPAN_PROCESSORS`)."""

    @property
    def processors(self) -> tuple[SpanProcessor, ...]: ...


class _Fanout(SpanProcessor):
    """Hands each span to the processors registered at the time: running
    :class:`~proxy.telemetry.Telemetry` objects (and tests) add and remove them, while the
    SDK's provider takes processors only for its whole life."""

    def __init__(self, registered: Registered) -> None:
        self._registered = registered

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for processor in self._registered.processors:
            processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self._registered.processors:
            processor.on_end(span)

    def shutdown(self) -> None:
        for processor in self._registered.processors:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self._registered.processors)


class _RecordWhenExported(Sampler):
    """Record spans only when something exports them: a recorded SDK span costs about
    twice an unrecorded one, and the request path pays for three. Unrecorded spans still
    carry a trace id (propagated upstream and stored on the AuditEvent). A caller's
    sampled trace stays sampled, so the proxy never breaks a trace that someone exports.
    While something exports, the sampler ``OTEL_TRACES_SAMPLER`` names decides, as the
    SDK reads it (``parentbased_always_on`` when unset)."""

    def __init__(self, registered: Registered) -> None:
        self._registered = registered
        # The SDK's reading of OTEL_TRACES_SAMPLER (and _ARG); parentbased_always_on unset.
        self._exporting = sampling._get_from_env_or_default()
        self._idle = ParentBased(ALWAYS_OFF)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        sampler = self._exporting if self._registered.processors else self._idle
        return sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "RecordWhenExported"


def sdk_tracer_provider(
    service_name: str, worker: int | None, registered: Registered
) -> TracerProvider:
    """A tracer provider whose resource is
    :func:`~proxy.telemetry.resource.process_resource` of ``service_name`` and ``worker``,
    whose spans go to the processors of ``registered``, recorded only while it has any."""
    provider = TracerProvider(
        resource=process_resource(service_name, worker),
        sampler=_RecordWhenExported(registered),
    )
    provider.add_span_processor(_Fanout(registered))
    return provider
