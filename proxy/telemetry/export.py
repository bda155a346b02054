"""What is exported over OTLP, and where: the configuration's ``telemetry`` section gives
defaults, the OpenTelemetry SDK's environment variables override them.

- A signal (traces, metrics) is exported when an endpoint is known for it
  (``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
  ``telemetry.otlp_endpoint``) or ``OTEL_{TRACES,METRICS}_EXPORTER=otlp`` asks for it
  (the SDK's default endpoint, ``http://localhost:4318``, then applies); not when
  ``OTEL_{TRACES,METRICS}_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``. Unlike the SDK's
  own default, nothing is exported unless asked: spans and metric points nobody collects
  cost the request path.
- The endpoint: a per-signal variable is the signal's URL as it is; otherwise the SDK
  appends ``/v1/traces`` or ``/v1/metrics`` to ``OTEL_EXPORTER_OTLP_ENDPOINT``, and this
  module to ``telemetry.otlp_endpoint``.
- The interval of metric exports: ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds), else
  ``telemetry.metric_export_interval_s``.
- Everything else is the SDK's alone and read by it: headers, timeout, compression,
  certificates (``OTEL_EXPORTER_OTLP_*`` and their per-signal variants), the batch span
  processor (``OTEL_BSP_*``), the sampler (``OTEL_TRACES_SAMPLER``, ``_ARG``), the
  propagators (``OTEL_PROPAGATORS``), the resource (:mod:`.resource`).

What the SDK would accept but this proxy cannot honour is refused before it starts
(:func:`export_plan` raises): a protocol other than ``http/protobuf`` (this build exports
OTLP over HTTP only), an exporter other than ``otlp`` or ``none``, an unknown sampler.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.settings import TelemetrySettings

SIGNALS = ("traces", "metrics")

SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)
"""The values of ``OTEL_TRACES_SAMPLER`` the SDK knows."""


@dataclass(frozen=True, slots=True)
class SignalExport:
    """How one signal is exported over OTLP/HTTP."""

    endpoint: str | None
    """The URL the exporter is given; None: the exporter finds it in the environment
    itself (``OTEL_EXPORTER_OTLP_{SIGNAL}_ENDPOINT``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, or
    its default)."""


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What one process exports over OTLP."""

    traces: SignalExport | None
    """None: no spans are exported."""
    metrics: SignalExport | None
    """None: no metrics are exported."""
    metric_interval_s: float
    """How often metrics are pushed."""
    warnings: tuple[str, ...] = ()
    """What is set but not followed, to log once at start."""


def _setting(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def export_plan(settings: TelemetrySettings, environ: Mapping[str, str]) -> ExportPlan:
    """The exports ``settings`` and ``environ`` ask for (see the module's docstring).
    Raises ValueError, one line per problem, for what cannot be honoured."""
    problems: list[str] = []
    warnings: list[str] = []
    disabled = _setting(environ, "OTEL_SDK_DISABLED").lower() == "true"
    chosen: dict[str, SignalExport | None] = {}
    for signal in SIGNALS:
        upper = signal.upper()
        exporters = {
            name.strip().lower()
            for name in _setting(environ, f"OTEL_{upper}_EXPORTER").split(",")
            if name.strip()
        }
        for unknown in sorted(exporters - {"otlp", "none"}):
            problems.append(
                f"OTEL_{upper}_EXPORTER={unknown}: this proxy exports {signal} with otlp or"
                " none only"
            )
        own = _setting(environ, f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")
        shared = _setting(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
        configured = settings.otlp_endpoint
        wanted = bool(own or shared or configured) or "otlp" in exporters
        if disabled or "none" in exporters or not wanted:
            chosen[signal] = None
            continue
        protocol = _setting(environ, f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL") or _setting(
            environ, "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        if protocol and protocol != "http/protobuf":
            problems.append(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} ({signal}): this proxy exports OTLP"
                " over HTTP only; set http/protobuf and the collector's OTLP/HTTP port (4318)"
            )
        from_config = None if own or shared or not configured else configured
        endpoint = f"{from_config.rstrip('/')}/v1/{signal}" if from_config else None
        chosen[signal] = SignalExport(endpoint=endpoint)

    interval_s = settings.metric_export_interval_s
    interval = _setting(environ, "OTEL_METRIC_EXPORT_INTERVAL")
    if interval:
        try:
            interval_s = float(interval) / 1000
            if not interval_s > 0:
                raise ValueError(interval)
        except ValueError:
            problems.append(
                f"OTEL_METRIC_EXPORT_INTERVAL={interval}: give a positive number of milliseconds"
            )
    sampler = _setting(environ, "OTEL_TRACES_SAMPLER").lower()
    if sampler and sampler not in SAMPLERS:
        close = difflib.get_close_matches(sampler, sorted(SAMPLERS), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; one of {', '.join(sorted(SAMPLERS))}"
        problems.append(f"OTEL_TRACES_SAMPLER={sampler}: no such sampler{hint}")
    temporality = _setting(environ, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE").lower()
    if chosen["metrics"] is not None and temporality not in ("", "cumulative"):
        warnings.append(
            f"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE={temporality}: metrics are"
            " exported cumulative all the same"
        )
    if problems:
        raise ValueError("\n".join(problems))
    return ExportPlan(
        traces=chosen["traces"],
        metrics=chosen["metrics"],
        metric_interval_s=interval_s,
        warnings=tuple(warnings),
    )
