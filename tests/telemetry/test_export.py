"""What is exported over OTLP and where, from the configuration and the OpenTelemetry SDK's
environment variables (which win): a table, then what is refused, and the refusal as the
CLI reports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import TelemetrySettings
from proxy.telemetry.export import ExportPlan, SignalExport, export_plan
from tests.factories import ROOT

CONFIGURED = "http://collector.config:4318"

PLANS: list[tuple[str | None, dict[str, str], str | None, str | None, float]] = [
    # telemetry.otlp_endpoint, environment, traces endpoint, metrics endpoint, interval:
    # "-" for a signal not exported, "env" for the exporter reading it from the environment.
    (None, {}, "-", "-", 15.0),
    (CONFIGURED, {}, f"{CONFIGURED}/v1/traces", f"{CONFIGURED}/v1/metrics", 15.0),
    (f"{CONFIGURED}/", {}, f"{CONFIGURED}/v1/traces", f"{CONFIGURED}/v1/metrics", 15.0),
    (CONFIGURED, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"}, "env", "env", 15.0),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"}, "env", "env", 15.0),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env:4318/t"}, "env", "-", 15.0),
    (
        CONFIGURED,
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://env:4318/m"},
        f"{CONFIGURED}/v1/traces",
        "env",
        15.0,
    ),
    (None, {"OTEL_TRACES_EXPORTER": "otlp"}, "env", "-", 15.0),
    (CONFIGURED, {"OTEL_METRICS_EXPORTER": "none"}, f"{CONFIGURED}/v1/traces", "-", 15.0),
    (CONFIGURED, {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}, "-", "-", 15.0),
    (CONFIGURED, {"OTEL_SDK_DISABLED": "true"}, "-", "-", 15.0),
    (
        CONFIGURED,
        {"OTEL_SDK_DISABLED": "false"},
        f"{CONFIGURED}/v1/traces",
        f"{CONFIGURED}/v1/metrics",
        15.0,
    ),
    (
        CONFIGURED,
        {"OTEL_METRIC_EXPORT_INTERVAL": "2500", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        f"{CONFIGURED}/v1/traces",
        f"{CONFIGURED}/v1/metrics",
        2.5,
    ),
]


def _signal(expected: str | None) -> SignalExport | None:
    if expected == "-":
        return None
    return SignalExport(endpoint=None if expected == "env" else expected)


@pytest.mark.parametrize(("configured", "environ", "traces", "metrics", "interval"), PLANS)
def test_the_environment_overrides_the_configuration(
    configured: str | None,
    environ: dict[str, str],
    traces: str | None,
    metrics: str | None,
    interval: float,
) -> None:
    settings = TelemetrySettings(otlp_endpoint=configured)
    assert export_plan(settings, environ) == ExportPlan(
        traces=_signal(traces), metrics=_signal(metrics), metric_interval_s=interval
    )


REFUSED = [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL=grpc (traces)"),
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"}, "=http/json (metrics)"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER=console"),
    ({"OTEL_METRICS_EXPORTER": "prometheus"}, "OTEL_METRICS_EXPORTER=prometheus"),
    ({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL=soon"),
    ({"OTEL_METRIC_EXPORT_INTERVAL": "0"}, "OTEL_METRIC_EXPORT_INTERVAL=0"),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratoi"}, "did you mean parentbased_traceidratio"),
]


@pytest.mark.parametrize(("environ", "said"), REFUSED)
def test_what_cannot_be_honoured_is_refused(environ: dict[str, str], said: str) -> None:
    with pytest.raises(ValueError) as refused:
        export_plan(TelemetrySettings(otlp_endpoint=CONFIGURED), environ)
    assert said in str(refused.value)


def test_a_protocol_for_a_signal_not_exported_is_no_problem() -> None:
    plan = export_plan(
        TelemetrySettings(), {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_EXPORTER": "none"}
    )
    assert plan.traces is None and plan.metrics is None


def test_a_delta_temporality_is_warned_about() -> None:
    environ = {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"}
    plan = export_plan(TelemetrySettings(otlp_endpoint=CONFIGURED), environ)
    assert plan.warnings == (
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta: metrics are exported"
        " cumulative all the same",
    )


def test_check_config_refuses_an_otlp_protocol_it_cannot_speak(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"store: {{path: {tmp_path / 'audit.db'}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "-c", str(config), "check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        },
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc (traces): this proxy exports OTLP over HTTP" in (
        result.stderr
    )
