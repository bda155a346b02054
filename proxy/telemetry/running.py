"""The running part: one application's telemetry, started and stopped through its
``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.tasks import running
from proxy.telemetry.cells import COLLECTING
from proxy.telemetry.export import export_plan
from proxy.telemetry.logs import use_json_logs
from proxy.telemetry.queue import QueueDepth, set_queue_gauges
from proxy.telemetry.tracing import SPAN_PROCESSORS, name_process

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import SpanProcessor

    from proxy.settings import TelemetrySettings

log = logging.getLogger(__name__)


class Telemetry:
    """One application's telemetry: its span processors on the process's tracer provider,
    a meter provider with its readers (OTLP as the configuration and the environment ask,
    :mod:`.export`; plus any given), and a task that keeps the queue-depth gauge fresh for
    pushed metrics.

    The OpenTelemetry SDK is imported only for what is exported or given (and the tracer
    provider by the first span, :func:`~.tracing.tracer_provider`): a proxy that exports
    nothing need not hold it in memory."""

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        span_processors: Sequence[SpanProcessor] = (),
        metric_readers: Sequence[MetricReader] = (),
        worker: int | None = None,
    ) -> None:
        """``worker``: this process's index when the proxy runs several workers. Raises
        ValueError for an OpenTelemetry environment variable that cannot be honoured."""
        self._settings = settings
        self._worker = worker
        self.plan = export_plan(settings, os.environ)
        """What this process exports over OTLP."""
        self._span_processors = list(span_processors)
        readers = list(metric_readers)
        if self.plan.traces is not None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            exporter = OTLPSpanExporter(endpoint=self.plan.traces.endpoint)
            self._span_processors.append(BatchSpanProcessor(exporter))
        if self.plan.metrics is not None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=self.plan.metrics.endpoint),
                    export_interval_millis=self.plan.metric_interval_s * 1000,
                )
            )
        self._collects = bool(readers)
        self._started = False
        self.meter_provider: MeterProvider | None = None
        """The meter provider of the readers; None when there are none."""
        if readers:
            from opentelemetry.sdk.metrics import MeterProvider

            from proxy.telemetry.otel_metrics import OtelCells
            from proxy.telemetry.resource import process_resource

            resource = process_resource(settings.service_name, worker)
            self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
            cells = OtelCells(resource)
            for reader in readers:
                cells.attach(reader)

    def start(self) -> None:
        for warning in self.plan.warnings:
            log.warning("%s", warning)
        name_process(self._settings.service_name, self._worker)
        SPAN_PROCESSORS.processors = (*SPAN_PROCESSORS.processors, *self._span_processors)
        if self._collects and not self._started:
            COLLECTING.readers += 1
        self._started = True

    def stop(self) -> None:
        """Detach, then flush and shut down the exporters (blocking: run in a thread)."""
        if self._collects and self._started:
            COLLECTING.readers -= 1
        self._started = False
        ours = set(map(id, self._span_processors))
        SPAN_PROCESSORS.processors = tuple(
            p for p in SPAN_PROCESSORS.processors if id(p) not in ours
        )
        for processor in self._span_processors:
            processor.shutdown()
        if self.meter_provider is not None:
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
            await asyncio.sleep(telemetry.plan.metric_interval_s / 2)
            with contextlib.suppress(Exception):
                set_queue_gauges(await queue_stats(), time.time())

    try:
        if telemetry.plan.metrics is not None:
            async with running(gauges(), "telemetry-gauges"):
                yield
        else:
            yield
    finally:
        await asyncio.to_thread(telemetry.stop)
