"""The proxy's HTTP traffic as the OpenTelemetry HTTP semantic conventions describe it: a
server span and the server metrics per proxied request (:func:`serving`), a client span
and the client metric per upstream call (:func:`upstream_span`).

Server span: named ``{method} {http.route}`` (the FHIR route template of the classified
interaction, :mod:`.routes`), or ``{method}`` for a request that is not a FHIR
interaction; attributes ``http.request.method``, ``url.scheme``, ``url.path`` (ids
scrubbed), ``http.route``, ``server.address``, ``server.port``, ``client.address``,
``network.protocol.version``, ``http.response.status_code``, ``error.type`` (the status
code of a 5xx answer, or the exception's type), and the FHIR specifics
``fhir.interaction``, ``fhir.resource_type``, ``fhir.operation`` and
``fhir_audit.request_id``. Client span: ``{method} {url.template}``, with
``http.request.method``, ``server.address``, ``server.port``, ``url.full`` (ids
scrubbed), ``url.template``, ``http.response.status_code``, ``error.type`` (a 4xx or 5xx
status code, or the exception's type). Never a query string, a resource id, a header
value or a token: those can identify a patient or grant access.

Nothing here runs for a request that is neither traced (:func:`~.tracing.traces`) nor
measured (an OpenTelemetry metric reader collecting): :func:`observed` says which.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.semconv.attributes.client_attributes import CLIENT_ADDRESS
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_METHOD_ORIGINAL,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.network_attributes import NETWORK_PROTOCOL_VERSION
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_FULL, URL_PATH, URL_SCHEME
from opentelemetry.trace import SpanKind, Status, StatusCode

from proxy.telemetry.cells import COLLECTING
from proxy.telemetry.current import EXCHANGE
from proxy.telemetry.metrics import HTTP_CLIENT_DURATION, HTTP_SERVER_ACTIVE, HTTP_SERVER_DURATION
from proxy.telemetry.routes import fhir_route, scrubbed_path
from proxy.telemetry.tracing import SPAN_PROCESSORS, tracer, traces

if TYPE_CHECKING:
    from yarl import URL

    from proxy.exchange import Exchange
    from proxy.http.listener import ClientRequest

URL_TEMPLATE = "url.template"
"""The client span's route template (a semantic convention still in development)."""

_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
"""The methods the conventions name; any other is ``_OTHER`` (its name kept in
``http.request.method_original`` on the span only)."""
_DEFAULT_PORTS = {"http": 80, "https": 443}


def observed(request: ClientRequest) -> bool:
    """Whether the request gets any of this module's work: it is traced (something
    exports spans, or the caller sent a ``traceparent``) or a metric reader collects."""
    return (
        bool(SPAN_PROCESSORS.processors)
        or COLLECTING.readers > 0
        or "traceparent" in request.headers
    )


def _method(method: str) -> str:
    return method if method in _METHODS else "_OTHER"


def _host_and_port(authority_url: str, scheme: str) -> tuple[str, int] | None:
    """``(host, port)`` of a URL's authority (the default port of ``scheme`` when it has
    none), or None when it has no usable host."""
    try:
        parts = urlsplit(authority_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host, port if port is not None else _DEFAULT_PORTS.get(scheme, 80)


_SERVED: contextvars.ContextVar[ServedRequest | None] = contextvars.ContextVar(
    "fhir_audit_served", default=None
)


class ServedRequest:
    """One request the proxy serves, observed: its server span while traced, the server
    metrics while a metric reader collects. Made by :func:`serving`."""

    __slots__ = ("_active", "_base_path", "_request", "_span", "_status", "method")

    def __init__(self, request: ClientRequest, base_path: str) -> None:
        self._request = request
        self._base_path = base_path
        self.method = _method(request.method)
        """``http.request.method``: the method, or ``_OTHER``."""
        self._span: trace.Span | None = None
        self._status: int | None = None
        self._active: Any = None
        if COLLECTING.readers:
            self._active = HTTP_SERVER_ACTIVE.cell(self.method, request.scheme)
            self._active.add(1)

    def answered(self, status: int) -> None:
        """The client gets ``status``."""
        self._status = status

    def route(self, ex: Exchange | None) -> str | None:
        """``http.route`` of this request, once ``ex`` is classified."""
        if ex is None:
            return None
        return fhir_route(self._base_path, ex.path, ex.interaction)

    def url_path(self, ex: Exchange | None) -> str:
        """``url.path``: the path the request addressed, ids scrubbed."""
        if ex is None:
            return scrubbed_path("", self._request.raw_path)
        return scrubbed_path(self._base_path, ex.path)

    def _finish(self, failure: BaseException | None) -> None:
        ex = EXCHANGE.get()
        route = self.route(ex)
        status = self._status
        if failure is not None:
            error = type(failure).__qualname__
        else:
            error = str(status) if status is not None and status >= 500 else ""
        if self._span is not None:
            self._describe(self._span, ex, route, error)
        if self._active is not None:
            self._active.add(-1)
            request = self._request
            HTTP_SERVER_DURATION.cell(
                self.method,
                request.scheme,
                route or "",
                "" if status is None else str(status),
                error,
                request.version,
            ).observe(time.perf_counter() - request.started)

    def _describe(
        self, span: trace.Span, ex: Exchange | None, route: str | None, error: str
    ) -> None:
        request = self._request
        method = self.method
        span.update_name(f"{method if method != '_OTHER' else 'HTTP'} {route or ''}".rstrip())
        attributes: dict[str, str | int] = {
            URL_PATH: self.url_path(ex),
            NETWORK_PROTOCOL_VERSION: request.version,
            CLIENT_ADDRESS: ex.client_address if ex is not None else request.remote or "",
        }
        server = None
        if ex is not None:
            server = _host_and_port(ex.base_url, request.scheme)
        server = server or _host_and_port(f"//{request.local_address}", request.scheme)
        if server is not None:
            attributes[SERVER_ADDRESS], attributes[SERVER_PORT] = server
        if route is not None:
            attributes[HTTP_ROUTE] = route
        if self._status is not None:
            attributes[HTTP_RESPONSE_STATUS_CODE] = self._status
        if error:
            attributes[ERROR_TYPE] = error
            span.set_status(Status(StatusCode.ERROR))
        if ex is not None:
            attributes["fhir_audit.request_id"] = ex.request_id
            interaction = ex.interaction
            if interaction is not None:
                attributes["fhir.interaction"] = interaction.kind.value
                if interaction.resource_type:
                    attributes["fhir.resource_type"] = interaction.resource_type
                if interaction.operation:
                    attributes["fhir.operation"] = interaction.operation
        span.set_attributes(attributes)

    def upstream(self, method: str, origin: URL, headers: MutableMapping[str, str]) -> UpstreamSpan:
        """The observation of one upstream call of this request (:func:`upstream_span`)."""
        span: trace.Span | None = None
        method = _method(method)
        host, port = origin.host or "", origin.port or 0
        if trace.get_current_span().get_span_context().is_valid:
            ex = EXCHANGE.get()
            template = self.route(ex)
            attributes: dict[str, str | int] = {
                HTTP_REQUEST_METHOD: method,
                SERVER_ADDRESS: host,
                SERVER_PORT: port,
                URL_FULL: str(origin).rstrip("/") + self.url_path(ex),
            }
            if template is not None:
                attributes[URL_TEMPLATE] = template
            name = method if method != "_OTHER" else "HTTP"
            span = tracer().start_span(
                f"{name} {template}" if template else name,
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
            propagate.inject(headers, context=trace.set_span_in_context(span))
        started = time.perf_counter() if self._active is not None else None
        return UpstreamSpan(span, started, (method, host, str(port)))


@contextlib.contextmanager
def serving(request: ClientRequest, base_path: str) -> Iterator[ServedRequest]:
    """Observe one proxied request (call only when :func:`observed`): while traced, a
    server span, child of the caller's ``traceparent``, current for the handler; while a
    metric reader collects, ``http.server.active_requests`` and, at the end,
    ``http.server.request.duration``. The span's name and most attributes come from the
    request's Exchange at the end (its route needs the classification); the handler says
    the status through :meth:`ServedRequest.answered`. ``base_path``: the FHIR base."""
    served = ServedRequest(request, base_path)
    exchange_token = EXCHANGE.set(None)
    served_token = _SERVED.set(served)
    try:
        if not traces(request):
            with _finishing(served):
                yield served
            return
        attributes: dict[str, str] = {
            HTTP_REQUEST_METHOD: served.method,
            URL_SCHEME: request.scheme,
        }
        if served.method == "_OTHER":
            attributes[HTTP_REQUEST_METHOD_ORIGINAL] = request.method
        with tracer().start_as_current_span(
            "HTTP" if served.method == "_OTHER" else served.method,
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            served._span = span
            with _finishing(served):
                yield served
    finally:
        _SERVED.reset(served_token)
        EXCHANGE.reset(exchange_token)


@contextlib.contextmanager
def _finishing(served: ServedRequest) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        served._finish(exc)
        raise
    served._finish(None)


class UpstreamSpan:
    """One upstream call of an observed request: its client span while the request is
    traced, its duration for ``http.client.request.duration`` while a metric reader
    collects. Ended when the response head arrives (:meth:`answered`) or, as a context
    manager, when the call fails before that. Made by :func:`upstream_span`; a request
    that is not observed gets a shared one that does nothing."""

    __slots__ = ("_labels", "_span", "_started")

    def __init__(
        self, span: trace.Span | None, started: float | None, labels: tuple[str, str, str]
    ) -> None:
        self._span = span
        self._started = started
        self._labels = labels

    def __enter__(self) -> UpstreamSpan:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        # Never left open, even by a block that ends without an answer.
        self._end(None, "" if exc is None else type(exc).__qualname__)

    def answered(self, status: int) -> None:
        """The response head arrived with ``status``."""
        self._end(status, str(status) if status >= 400 else "")

    def _end(self, status: int | None, error: str) -> None:
        span, self._span = self._span, None
        started, self._started = self._started, None
        if span is not None:
            if status is not None:
                span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
            if error:
                span.set_attribute(ERROR_TYPE, error)
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        if started is not None:
            HTTP_CLIENT_DURATION.cell(
                *self._labels, "" if status is None else str(status), error
            ).observe(time.perf_counter() - started)


_UNOBSERVED_UPSTREAM = UpstreamSpan(None, None, ("", "", ""))


def upstream_span(method: str, origin: URL, headers: MutableMapping[str, str]) -> UpstreamSpan:
    """The observation of an upstream call to ``origin`` (the upstream's
    ``scheme://host:port``) for the current request: its client span, its W3C
    ``traceparent`` added to ``headers``, when the request is traced; its duration when
    a metric reader collects; else the shared one that does nothing."""
    served = _SERVED.get()
    if served is None:
        return _UNOBSERVED_UPSTREAM
    return served.upstream(method, origin, headers)
