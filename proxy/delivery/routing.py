"""What a stream routes an event by: the patient it concerns (Kafka's key, a JetStream
subject token) and the site that recorded it, read from an R4 or R5 AuditEvent. Pure."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from proxy.store.index import patients_of

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def event_patient(event: dict[str, Any]) -> str | None:
    """The first patient the event names (``Patient/123``): R5's ``patient``, else the
    first entity in the patient role. None for an event about no patient."""
    patients = patients_of(event)
    return patients[0] if patients else None


def patient_hash(event: dict[str, Any]) -> str:
    """A subject token for the event's patient that does not show who it is: 16 hex
    digits of the reference's SHA-256, or ``none``."""
    patient = event_patient(event)
    if patient is None:
        return "none"
    return hashlib.sha256(patient.encode()).hexdigest()[:16]


def event_site(event: Mapping[str, Any]) -> str:
    """``source.site`` as a subject token (letters, digits, ``-`` and ``_``), or ``none``."""
    source = event.get("source") or {}
    site = source.get("site")
    if isinstance(site, dict):  # R5: a Reference
        site = site.get("display") or site.get("reference")
    return subject_token(str(site)) if site else "none"


def subject_token(value: str) -> str:
    """``value`` made a single NATS subject token (no dots, spaces or wildcards)."""
    return _TOKEN_UNSAFE.sub("_", value) or "_"
