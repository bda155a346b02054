"""The running part: one application's telemetry, started and stopped through its
``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from proxy.tasks import running
from proxy.telemetry.logs import use_json_logs
from proxy.telemetry.otel_metrics import OtelCells
from proxy.telemetry.queue import QueueDepth, set_queue_gauges
from proxy.telemetry.resource import process_resource
from proxy.telemetry.tracing import SPAN_PROCESSORS, tracer_provider

if TYPE_CHECKING:
    from proxy.settings import TelemetrySettings


class Telemetry:
    """One application's telemetry: its span processors on the process's tracer provider,
    a meter provider with its readers (OTLP when configured, plus any given), and a task
    that keeps the queue-depth gauge fresh for pushed metrics."""

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        span_processors: Sequence[SpanProcessor] = (),
        metric_readers: Sequence[MetricReader] = (),
        worker: int | None = None,
    ) -> None:
        """``worker``: this process's index when the proxy runs several workers."""
        self._settings = settings
        self._span_processors = list(span_processors)
        readers = list(metric_readers)
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            base = settings.otlp_endpoint.rstrip("/")
            self._span_processors.append(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
            )
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
                    export_interval_millis=settings.metric_export_interval_s * 1000,
                )
            )
        resource = process_resource(settings.service_name, worker)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        cells = OtelCells(resource)
        for reader in readers:
            cells.attach(reader)

    def start(self) -> None:
        tracer_provider(self._settings.service_name)
        SPAN_PROCESSORS.processors = (*SPAN_PROCESSORS.processors, *self._span_processors)

    def stop(self) -> None:
        """Detach, then flush and shut down the exporters (blocking: run in a thread)."""
        ours = set(map(id, self._span_processors))
        SPAN_PROCESSORS.processors = tuple(
            p for p in SPAN_PROCESSORS.processors if id(p) not in ours
        )
        for processor in self._span_processors:
            processor.shutdown()
        self.meter_provider.shutdown()


TELEMETRY = web.AppKey("telemetry", Telemetry)


async def telemetry_ctx(
    app: web.Application,
    settings: TelemetrySettings,
    queue_stats: Callable[[], Awaitable[QueueDepth]],
    worker: int | None = None,
) -> AsyncIterator[None]:
    """The body of the app's telemetry ``cleanup_ctx``: start (a :class:`Telemetry` already
    in ``app[TELEMETRY]`` is used as it is), keep the gauges fresh while exporting, then
    flush and stop. ``queue_stats`` reads this worker's store (it may fail while the store
    is not open yet: the gauges then wait for the next round); ``worker`` is this
    process's index when the proxy runs several."""
    telemetry = app.get(TELEMETRY) or Telemetry(settings, worker=worker)
    app[TELEMETRY] = telemetry
    telemetry.start()
    if settings.json_logs:
        use_json_logs()

    async def gauges() -> None:
        while True:
            await asyncio.sleep(settings.metric_export_interval_s / 2)
            with contextlib.suppress(Exception):
                set_queue_gauges(await queue_stats(), time.time())

    try:
        if settings.otlp_endpoint:
            async with running(gauges(), "telemetry-gauges"):
                yield
        else:
            yield
    finally:
        await asyncio.to_thread(telemetry.stop)
