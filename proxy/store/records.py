"""What the queue holds: events with their own delivery state, and write intents."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class EventStatus(StrEnum):
    """Where an event is in its life."""

    PENDING = "pending"
    """Waiting for (re)delivery."""
    DELIVERED = "delivered"
    """Acknowledged by the repository with a 2xx; kept for ``retention_days``."""
    DEAD = "dead"
    """Rejected by the repository (4xx after bisection); waits for ``dlq retry``."""


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """One AuditEvent in the queue, with its delivery bookkeeping."""

    seq: int
    """Queue order: delivery follows it."""
    event_id: str
    """``AuditEvent.id``, set when the event was built; stable across redeliveries."""
    event: dict[str, Any]
    """The AuditEvent resource as stored (R4 or R5)."""
    status: EventStatus
    attempts: int
    """Failed delivery attempts so far."""
    next_attempt_at: datetime | None
    """Not to be sent before this (backoff)."""
    last_error: str | None
    """The last delivery failure, or the repository's rejection for dead events."""
    recorded: str
    """``AuditEvent.recorded``."""


@dataclass(frozen=True, slots=True)
class Intent:
    """A state-changing request committed before it was forwarded."""

    id: int
    created_at: datetime
    summary: dict[str, Any]
    """What ``proxy.audit.balp.intent_summary`` recorded (no secrets); opaque to the store."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    pending: int
    delivered: int
    dead: int
    intents: int
    size_bytes: int
    """Bytes in use by the database (free pages excluded)."""


@dataclass(frozen=True, slots=True)
class EventQuery:
    """A search over stored events (the admin API)."""

    patient: str | None = None
    """``Patient/1``: events with that patient entity."""
    user: str | None = None
    """The requestor agent's id."""
    action: str | None = None
    outcome: str | None = None
    subtype: str | None = None
    date_from: datetime | None = None
    """Inclusive lower bound on ``recorded``."""
    date_to: datetime | None = None
    """Exclusive upper bound on ``recorded``."""
    newest_first: bool = True
    limit: int = 50
    offset: int = 0
