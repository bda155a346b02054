"""What a stream routes an event by: the patient it concerns (Kafka's key, a JetStream
subject token) and the site that recorded it, read from an R4 or R5 AuditEvent. Pure."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
PATIENT_ROLE = "1"
"""``object-role`` code 1 (Patient): the entity BALP names the patient with."""


def _codes(value: Any) -> list[str]:
    """The codes of a Coding (R4) or a CodeableConcept (R5)."""
    if not isinstance(value, dict):
        return []
    if "code" in value:
        return [str(value["code"])]
    return [str(c["code"]) for c in value.get("coding", ()) if isinstance(c, dict) and "code" in c]


def event_patient(event: Mapping[str, Any]) -> str | None:
    """The first patient the event names (``Patient/123``): R5's ``patient``, else the
    first entity in the patient role. None for an event about no patient."""
    r5 = event.get("patient")
    if isinstance(r5, dict) and r5.get("reference"):
        return str(r5["reference"])
    for entity in event.get("entity", ()):
        if isinstance(entity, dict) and PATIENT_ROLE in _codes(entity.get("role")):
            reference = (entity.get("what") or {}).get("reference")
            if reference:
                return str(reference).split("/_history/")[0]
    return None


def patient_hash(event: Mapping[str, Any]) -> str:
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
