"""One stored AuditEvent (R4 BALP or R5) in the words a privacy officer reads: who, what,
when, where from, the outcome and why. Pure: the reports, the CSV exports and their
tests read events through it; the viewer's own reading (``static/viewer.js``) says the
same things in the browser."""

from __future__ import annotations

import base64
import binascii
import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from proxy.store.index import (
    codes_of,
    outcome_code_of,
    patients_of,
    requestor_id,
    subtype_codes,
    who_of,
)
from proxy.store.marks import (
    http_status_of,
    is_admin_access_tag,
    outcome_text_of,
    purposes_of,
)

OUTCOME_WORDS = {
    "0": "success",
    "4": "minor failure",
    "8": "serious failure",
    "12": "major failure",
}
"""audit-event-outcome codes in words."""


def _request_target(query: str) -> str | None:
    """The request target of a base64 ``entity.query`` (``GET /fhir/Obs?x=1 HTTP/1.1``)."""
    try:
        line = base64.b64decode(query, validate=True).split(b"\r\n", 1)[0].decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    parts = line.split(" ")
    return parts[1] if len(parts) >= 2 else None


@dataclass(frozen=True, slots=True)
class Described:
    """An event as the reports and exports list it."""

    id: str
    recorded: str
    """``AuditEvent.recorded`` as stored."""
    ts: float
    """``recorded`` as a POSIX timestamp."""
    action: str
    interaction: str
    """The BALP subtype codes (``read``, ``search-type``), comma-separated; for a request
    the proxy could not classify, ``not a FHIR interaction``."""
    resource: str
    """What was accessed: the resource's reference, or the search as sent."""
    patients: tuple[str, ...]
    user: str
    """The requestor's id (``EventRow.user_id``), empty when anonymous."""
    user_name: str
    roles: tuple[str, ...]
    client: str
    """The OAuth client id."""
    address: str
    """The network address the request came from."""
    outcome: str
    """The outcome code."""
    outcome_words: str
    outcome_desc: str
    http_status: int | None
    """As ``outcomeDesc`` names it (the proxy writes it for every failure)."""
    purposes: tuple[str, ...]
    """The requestor's purposes of use."""
    request_id: str
    profile: str
    """The BALP profile claimed (``PatientRead``), if any."""
    admin_access: bool

    def as_json(self, signals: Iterable[str] = ()) -> dict[str, Any]:
        """The JSON form the report endpoints answer with."""
        return {
            "id": self.id,
            "recorded": self.recorded,
            "action": self.action,
            "interaction": self.interaction,
            "resource": self.resource,
            "patients": list(self.patients),
            "user": self.user,
            "userName": self.user_name,
            "roles": list(self.roles),
            "client": self.client,
            "address": self.address,
            "outcome": self.outcome,
            "outcomeWords": self.outcome_words,
            "outcomeDesc": self.outcome_desc,
            "httpStatus": self.http_status,
            "purposeOfUse": list(self.purposes),
            "requestId": self.request_id,
            "profile": self.profile,
            "adminAccess": self.admin_access,
            "signals": sorted(signals),
        }


def interaction_words(codes: Sequence[str]) -> str:
    """``Described.interaction`` of an event whose subtype codes (``EventRow.subtypes``)
    are ``codes``. An R5 event with no interaction has the event type ``rest`` as its
    code."""
    if list(codes) == ["rest"]:
        return NO_INTERACTION
    return ", ".join(codes) or NO_INTERACTION


NO_INTERACTION = "not a FHIR interaction"


def describe(event: dict[str, Any], ts: float) -> Described:
    """``event`` (stored R4 or R5) in words; ``ts`` its recorded time as stored."""
    agents = [a for a in event.get("agent", ()) if isinstance(a, dict)]
    requestor = next((a for a in agents if a.get("requestor")), {})
    who = who_of(agents)
    outcome = outcome_code_of(event) or ""
    resource = ""
    request_id = ""
    for entity in event.get("entity", ()):
        what = entity.get("what") or {}
        role = codes_of(entity.get("role"))
        if (
            "XrequestId" in codes_of(entity.get("type"))
            or (entity.get("role") or {}).get("text") == "X-Request-Id"
        ):
            request_id = str((what.get("identifier") or {}).get("value", ""))
        elif "1" not in role and not resource:
            resource = (
                what.get("reference")
                or entity.get("description")
                or (_request_target(entity["query"]) if entity.get("query") else None)
                or ""
            )
    patients = tuple(patients_of(event))
    if not resource and patients:
        resource = patients[0]
    outcome_desc = outcome_text_of(event) or ""
    profile = next(iter((event.get("meta") or {}).get("profile") or ()), "")
    return Described(
        id=str(event.get("id", "")),
        recorded=str(event.get("recorded", "")),
        ts=ts,
        action=str(event.get("action") or ""),
        interaction=interaction_words(subtype_codes(event)),
        resource=str(resource),
        patients=patients,
        user=requestor_id(requestor) or "" if requestor else "",
        user_name=who.name,
        roles=who.roles,
        client=who.client,
        address=who.address,
        outcome=outcome,
        outcome_words=OUTCOME_WORDS.get(outcome, outcome),
        outcome_desc=outcome_desc,
        http_status=http_status_of(outcome_desc),
        purposes=tuple(purposes_of(requestor)),
        request_id=request_id,
        profile=profile.rsplit("/", 1)[-1].removeprefix("IHE.BasicAudit."),
        admin_access=any(
            is_admin_access_tag(t)
            for t in (event.get("meta") or {}).get("tag", ())
            if isinstance(t, dict)
        ),
    )


CSV_COLUMNS = (
    "recorded",
    "user",
    "user name",
    "roles",
    "client",
    "patients",
    "action",
    "interaction",
    "resource",
    "outcome",
    "outcome description",
    "HTTP status",
    "purpose of use",
    "signals",
    "source address",
    "request id",
    "event id",
    "admin access",
)


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: a value starting with ``= + - @`` (or a
    tab or return) would be run as a formula, and values come from tokens and requests."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def local_time(ts: float, zone: tzinfo) -> str:
    """POSIX time ``ts`` in ``zone``, to the millisecond, with its offset."""
    return datetime.fromtimestamp(ts, zone).isoformat(timespec="milliseconds")


def csv_rows(
    events: Sequence[tuple[Described, Iterable[str]]], zone: tzinfo, *, header: bool
) -> str:
    """CSV lines (RFC 4180, CRLF) for events with their signals, times in ``zone``."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(CSV_COLUMNS)
    for d, signals in events:
        writer.writerow(
            [
                _cell(v)
                for v in (
                    local_time(d.ts, zone),
                    d.user,
                    d.user_name,
                    " ".join(d.roles),
                    d.client,
                    " ".join(d.patients),
                    d.action,
                    d.interaction,
                    d.resource,
                    f"{d.outcome} {d.outcome_words}".strip(),
                    d.outcome_desc,
                    str(d.http_status or ""),
                    " ".join(d.purposes),
                    " ".join(sorted(signals)),
                    d.address,
                    d.request_id,
                    d.id,
                    "yes" if d.admin_access else "",
                )
            ]
        )
    return out.getvalue()
