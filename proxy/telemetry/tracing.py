"""Traces: the process's tracer provider (made with the SDK by :mod:`.provider` when the
first span is), its span processors, which requests are traced, and the child span of the
durable audit write. The server and client spans of the HTTP semantic conventions are
:mod:`.http`'s; the builder records the request's ``traceparent`` on its AuditEvents
(:func:`current_traceparent`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from proxy import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from proxy.http.listener import ClientRequest


class _Processors:
    """The process's span processors, which running :class:`Telemetry` objects (and tests)
    add and remove; the tracer provider hands each span to those registered at the time."""

    __slots__ = ("processors",)

    def __init__(self) -> None:
        self.processors: tuple[SpanProcessor, ...] = ()


SPAN_PROCESSORS = _Processors()
_PROVIDER: list[TracerProvider] = []
_NAMED: list[tuple[str, int | None]] = []


def name_process(service_name: str, worker: int | None = None) -> None:
    """The ``service_name`` and ``worker`` of the tracer provider's resource, when it is
    made (the first caller's)."""
    if not _NAMED:
        _NAMED.append((service_name, worker))


def tracer_provider(service_name: str | None = None, worker: int | None = None) -> TracerProvider:
    """The process's SDK tracer provider, made and installed globally on first use (by the
    first span: every traced request then has a trace id, exported or not), its resource
    from the first :func:`name_process` (this call's ``service_name`` and ``worker`` when
    given; ``fhir-audit-proxy`` when none) through
    :func:`~proxy.telemetry.resource.process_resource`; spans are recorded only while a
    span processor is registered (:data:`SPAN_PROCESSORS`). The SDK is imported then,
    not with this module: a process that never traces need not hold it in memory."""
    if service_name is not None:
        name_process(service_name, worker)
    if not _PROVIDER:
        from proxy.telemetry.provider import sdk_tracer_provider

        name, index = _NAMED[0] if _NAMED else ("fhir-audit-proxy", None)
        provider = sdk_tracer_provider(name, index, SPAN_PROCESSORS)
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
