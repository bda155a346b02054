"""Marks: the few facts about an event that the viewer filters on and the indexed columns
do not hold, kept as ``k:`` terms in the ``event_terms`` index (``EventRow.terms``).

An event carries a mark's term only when the mark applies, so the common event pays
nothing for them; a marked event costs one index entry per mark. A filter on a mark walks
its term's range (``EventQuery.marked``) or checks each candidate row by primary key
(``EventQuery.unmarked``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any


class Mark(StrEnum):
    """What a ``k:`` term says about its event."""

    ADMIN_ACCESS = "admin-access"
    """The event records a read of the audit trail through the admin API
    (:data:`ADMIN_ACCESS_TAG` in ``meta.tag``)."""
    BREAK_GLASS = "break-glass"
    """The requestor's token carried an emergency purpose of use
    (:data:`BREAK_GLASS_PURPOSES`)."""
    DENIED = "denied"
    """The server refused the request: HTTP 401 or 403."""

    @property
    def term(self) -> str:
        """The index term: ``k:`` and the mark's name."""
        return f"k:{self.value}"


ADMIN_ACCESS_TAG = {
    "system": "urn:fhir-audit-proxy:tag",
    "code": "admin-access",
    "display": "access to the audit trail through the admin API",
}
"""The ``meta.tag`` of the events recording admin reads of the trail."""

BREAK_GLASS_PURPOSES = frozenset({"ETREAT", "BTG"})
"""Purposes of use (v3 ActReason) that claim an emergency: emergency treatment and
break-the-glass."""

DENIED_STATUSES = frozenset({401, 403})

_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")


def is_admin_access_tag(tag: Mapping[str, Any]) -> bool:
    return bool(
        tag.get("system") == ADMIN_ACCESS_TAG["system"]
        and tag.get("code") == ADMIN_ACCESS_TAG["code"]
    )


def http_status_of(outcome_desc: object) -> int | None:
    """The HTTP status an ``outcomeDesc`` names (``HTTP 403: …``, ``access denied (HTTP
    401): …``), as the proxy writes it for every answer of 400 and above; None when it
    names none (a success, or an event made elsewhere)."""
    if not isinstance(outcome_desc, str):
        return None
    found = _HTTP_STATUS.search(outcome_desc)
    return int(found.group(1)) if found else None


def purposes_of(agent: Mapping[str, Any]) -> list[str]:
    """The purpose-of-use codes of an agent: ``purposeOfUse`` (R4) or ``authorization``
    (R5), each a CodeableConcept."""
    concepts = agent.get("purposeOfUse") or agent.get("authorization") or ()
    return [
        str(c["code"])
        for concept in concepts
        if isinstance(concept, Mapping)
        for c in concept.get("coding", ())
        if isinstance(c, Mapping) and "code" in c
    ]


def marks_for(
    *, tags: Iterable[Mapping[str, Any]], purposes: Iterable[str], status: int | None
) -> list[Mark]:
    """The marks of an event with these tags, requestor purposes of use and HTTP status."""
    marks = []
    if any(is_admin_access_tag(t) for t in tags):
        marks.append(Mark.ADMIN_ACCESS)
    if not BREAK_GLASS_PURPOSES.isdisjoint(purposes):
        marks.append(Mark.BREAK_GLASS)
    if status in DENIED_STATUSES:
        marks.append(Mark.DENIED)
    return marks


def outcome_text_of(event: Mapping[str, Any]) -> str | None:
    """``outcomeDesc`` (R4), or the first ``outcome.detail`` text (R5)."""
    outcome = event.get("outcome")
    if isinstance(outcome, Mapping):
        details = outcome.get("detail") or ()
        text = next((d.get("text") for d in details if isinstance(d, Mapping)), None)
        return text if isinstance(text, str) else None
    desc = event.get("outcomeDesc")
    return desc if isinstance(desc, str) else None


def marks_of_event(event: Mapping[str, Any]) -> list[Mark]:
    """The marks of an R4 or R5 AuditEvent, read from its JSON."""
    agents = [a for a in event.get("agent", ()) if isinstance(a, Mapping)]
    return marks_for(
        tags=[t for t in (event.get("meta") or {}).get("tag", ()) if isinstance(t, Mapping)],
        purposes=[p for a in agents if a.get("requestor") for p in purposes_of(a)],
        status=http_status_of(outcome_text_of(event)),
    )
