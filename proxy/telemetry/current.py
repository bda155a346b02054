"""The request this task is handling, for the server span and the log lines it makes."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.exchange import Exchange

EXCHANGE: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar(
    "fhir_audit_exchange", default=None
)
"""The Exchange of the request being handled, once the handler has made it."""


def exchange_started(ex: Exchange) -> None:
    """Called by the handler once the Exchange exists: the server span and the logs of
    this request will carry its request id and interaction."""
    EXCHANGE.set(ex)
