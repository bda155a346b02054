"""Structured logs: one JSON object per line, with the request id and trace id of the
request being handled."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from opentelemetry import trace

from proxy.telemetry.current import EXCHANGE


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request id and
    trace id of the request being handled (when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ex = EXCHANGE.get()
        if ex is not None:
            entry["request_id"] = ex.request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


JsonLogFormatter.converter = time.gmtime


def use_json_logs() -> None:
    """Make the root logger's plain stream handlers (the CLI's) write JSON lines."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(JsonLogFormatter())
