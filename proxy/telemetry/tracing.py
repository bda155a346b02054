"""Traces: the process's tracer provider and sampler, a server span per proxied request, a
client span for each upstream call (which also sends W3C ``traceparent``), and a child
span for the durable audit write; the builder records the request's ``traceparent`` on
its AuditEvents. Span attributes name the FHIR interaction, the resource type, the status
and the request id; never a URL, a resource id, a query, a header value or a token: those
can identify a patient or grant access."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from proxy.telemetry.current import EXCHANGE
from proxy.telemetry.resource import process_resource

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.listener import ClientRequest


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


def _tracer() -> trace.Tracer:
    # get_tracer is costly (it touches the warnings filters): once per process.
    if not _TRACER:
        _TRACER.append(tracer_provider().get_tracer("fhir-audit-proxy"))
    return _TRACER[0]


def traces(request: ClientRequest) -> bool:
    """Whether a request is traced: something exports spans (a span processor is
    registered) or the caller sent a ``traceparent`` to continue. An untraced request
    makes no span and sends no ``traceparent`` upstream or onto its AuditEvents: spans
    nobody records cost about a sixth of an audited request's throughput."""
    return bool(SPAN_PROCESSORS.processors) or "traceparent" in request.headers


class _Untraced:
    """The context of an untraced request's server span: nothing to do, shared."""

    __slots__ = ()

    def __enter__(self) -> trace.Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_UNTRACED = _Untraced()


def server_span(request: ClientRequest) -> contextlib.AbstractContextManager[trace.Span]:
    """The server span of one proxied request, child of the caller's ``traceparent``.
    Named and described from the request's Exchange when the handler has made one.
    Made only when the request is traced (:func:`traces`); otherwise the context is
    a shared no-op that gives ``INVALID_SPAN``."""
    if not traces(request):
        return _UNTRACED
    return _server_span(request)


@contextlib.contextmanager
def _server_span(request: ClientRequest) -> Iterator[trace.Span]:
    token = EXCHANGE.set(None)
    try:
        parent = propagate.extract(request.headers)
        with _tracer().start_as_current_span(
            f"FHIR {request.method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            finally:
                ex = EXCHANGE.get()
                if ex is not None:
                    _describe(span, ex)
    finally:
        EXCHANGE.reset(token)


def _describe(span: trace.Span, ex: Exchange) -> None:
    span.set_attribute("fhir_audit.request_id", ex.request_id)
    if ex.interaction is not None:
        kind = ex.interaction.kind.value
        span.set_attribute("fhir.interaction", kind)
        resource_type = ex.interaction.resource_type
        if resource_type:
            span.set_attribute("fhir.resource_type", resource_type)
        span.update_name(f"FHIR {kind} {resource_type}" if resource_type else f"FHIR {kind}")
    if ex.error:
        span.set_attribute("error.type", ex.error)


def finish_server_span(span: trace.Span, status: int) -> None:
    """Record the status the client got; 5xx marks the span as an error."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


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
        return  # the request is not traced (see server_span)
    span = _tracer().start_span(
        "audit write",
        kind=SpanKind.INTERNAL,
        attributes={"fhir_audit.events": count},
        start_time=started_ns,
    )
    span.end(end_time=ended_ns)


class UpstreamSpan:
    """The client span of one upstream request of a traced exchange, named by method only
    (the URL can identify a patient), ended when the response head arrives
    (:meth:`answered`) or, as a context manager, when the request fails before that.
    Made by :func:`upstream_span`; an untraced request gets a shared one that does
    nothing."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span | None) -> None:
        self._span = span

    def __enter__(self) -> UpstreamSpan:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        span, self._span = self._span, None
        if span is None:
            return  # answered, or untraced
        if exc is not None:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
        span.end()  # never left open, even by a block that ends without an answer

    def answered(self, status: int) -> None:
        """The response head arrived with ``status``."""
        span, self._span = self._span, None
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


_UNTRACED_UPSTREAM = UpstreamSpan(None)


def upstream_span(method: str, port: int, headers: MutableMapping[str, str]) -> UpstreamSpan:
    """The client span of an upstream request, its W3C ``traceparent`` added to
    ``headers``, when the current request is traced; else the shared one that does
    nothing (an untraced request pays nothing for tracing)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return _UNTRACED_UPSTREAM
    span = _tracer().start_span(
        f"upstream {method}",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "server.port": port},
    )
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return UpstreamSpan(span)
