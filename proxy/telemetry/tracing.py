"""Traces: the process's tracer provider, its span processors and sampler, which requests
are traced, and the child span of the durable audit write. The server and client spans of
the HTTP semantic conventions are :mod:`.http`'s; the builder records the request's
``traceparent`` on its AuditEvents (:func:`current_traceparent`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import SpanKind

from proxy import __version__
from proxy.telemetry.resource import process_resource

if TYPE_CHECKING:
    from proxy.http.listener import ClientRequest


class _Processors(SpanProcessor):
    """The process's span processors, which running :class:`Telemetry` objects (and tests)
    add and remove; the SDK's provider takes processors only for its whole life."""

    def __init__(self) -> None:
        self.processors: tuple[SpanProcessor, ...] = ()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for processor in self.processors:
            processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)


SPAN_PROCESSORS = _Processors()
_PROVIDER: list[TracerProvider] = []


class _RecordWhenExported(Sampler):
    """Record spans only when something exports them: a recorded SDK span costs about
    twice an unrecorded one, and the request path pays for three. Unrecorded spans still
    carry a trace id (propagated upstream and stored on the AuditEvent). A caller's
    sampled trace stays sampled, so the proxy never breaks a trace that someone exports.
    While something exports, the sampler ``OTEL_TRACES_SAMPLER`` names decides, as the
    SDK reads it (``parentbased_always_on`` when unset)."""

    def __init__(self) -> None:
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
        sampler = self._exporting if SPAN_PROCESSORS.processors else self._idle
        return sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "RecordWhenExported"


def tracer_provider(
    service_name: str = "fhir-audit-proxy", worker: int | None = None
) -> TracerProvider:
    """The process's SDK tracer provider, made and installed globally on first use (every
    request then has a trace id, exported or not), its resource from the first caller's
    ``service_name`` and ``worker`` (:func:`~proxy.telemetry.resource.process_resource`)."""
    if not _PROVIDER:
        provider = TracerProvider(
            resource=process_resource(service_name, worker), sampler=_RecordWhenExported()
        )
        provider.add_span_processor(SPAN_PROCESSORS)
        trace.set_tracer_provider(provider)
        _PROVIDER.append(provider)
    return _PROVIDER[0]


_TRACER: list[trace.Tracer] = []


def tracer() -> trace.Tracer:
    """The proxy's tracer."""
    # get_tracer is costly (it touches the warnings filters): once per process.
    if not _TRACER:
        _TRACER.append(tracer_provider().get_tracer("fhir-audit-proxy", __version__))
    return _TRACER[0]


def traces(request: ClientRequest) -> bool:
    """Whether a request is traced: something exports spans (a span processor is
    registered) or the caller sent a ``traceparent`` to continue. An untraced request
    makes no span and sends no ``traceparent`` upstream or onto its AuditEvents: spans
    nobody records cost about a sixth of an audited request's throughput."""
    return bool(SPAN_PROCESSORS.processors) or "traceparent" in request.headers


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None outside a trace."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None  # what inject would find, at a quarter of its cost (every request asks)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def record_audit_write(count: int, started_ns: int, ended_ns: int) -> None:
    """The durable write of a traced request's ``count`` events, as a child span of its
    server span (made after the fact, from the write's times: the write itself pays
    nothing for tracing)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return  # the request is not traced (see proxy.telemetry.http.serving)
    span = tracer().start_span(
        "audit write",
        kind=SpanKind.INTERNAL,
        attributes={"fhir_audit.events": count},
        start_time=started_ns,
    )
    span.end(end_time=ended_ns)
