"""An AuditEvent in a privacy officer's words (proxy/admin/describe.py), for events the
builder makes in R4 and R5, and the CSV the reports write."""

from __future__ import annotations

import csv
import io
from zoneinfo import ZoneInfo

import pytest

from proxy.admin.describe import csv_rows, describe
from proxy.store.marks import Mark, marks_of_event
from tests.factories import context, events_of, exchange, unsigned_jwt

CLAIMS = {
    "sub": "dr.lee",
    "name": "Dr Lee",
    "client_id": "ehr-web",
    "roles": ["physician"],
    "purpose_of_use": ["ETREAT"],
}
HEADERS = {"Authorization": f"Bearer {unsigned_jwt(CLAIMS)}", "X-Request-Id": "rid-1"}
REFUSED = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "forbidden", "diagnostics": "not yours"}],
}


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_a_refused_read_in_words(version: str) -> None:
    ex = exchange(
        "GET", "Patient/p1", headers=HEADERS, status=403, response=REFUSED, request_id="rid-1"
    )
    (event,) = events_of(ex, context(fhir_version=version))
    d = describe(event, 1.5)
    assert (d.user, d.user_name, d.roles, d.client) == (
        "dr.lee",
        "Dr Lee",
        ("physician",),
        "ehr-web",
    )
    assert d.address == "2001:0db8:85a3:0000:0000:8a2e:0370:7334"
    assert (d.action, d.interaction, d.resource, d.patients) == (
        "R",
        "read",
        "Patient/p1",
        ("Patient/p1",),
    )
    assert (d.outcome, d.outcome_words, d.http_status) == ("8", "serious failure", 403)
    assert d.outcome_desc == "access denied (HTTP 403): not yours"
    assert d.purposes == ("ETREAT",) and d.request_id == "rid-1"
    assert d.profile == "" and not d.admin_access, "a failure claims no BALP profile"
    assert set(marks_of_event(event)) == {Mark.BREAK_GLASS, Mark.DENIED}


def test_a_search_and_a_request_that_is_no_interaction() -> None:
    (search,) = events_of(exchange("GET", "Observation", query="code=8867-4"))
    d = describe(search, 0.0)
    assert d.interaction == "search-type" and d.resource == "Observation?code=8867-4"
    assert d.user == "" and d.profile == "Query"
    (r5,) = events_of(
        exchange("GET", "Observation", query="code=8867-4"), context(fhir_version="R5")
    )
    assert describe(r5, 0.0).resource == "/fhir/Observation?code=8867-4", "R5: the request line"
    (odd,) = events_of(exchange("GET", "notAType/1", status=404, response=None))
    assert describe(odd, 0.0).interaction == "not a FHIR interaction"


def test_csv_cells_never_start_a_formula() -> None:
    """Names come from tokens: a name a spreadsheet would run is written as text."""
    claims = {**CLAIMS, "name": '=HYPERLINK("http://x","click")', "sub": "+1"}
    ex = exchange("GET", "Patient/p1", headers={"Authorization": f"Bearer {unsigned_jwt(claims)}"})
    (event,) = events_of(ex)
    text = csv_rows([(describe(event, 0.0), ["first-access"])], ZoneInfo("UTC"), header=True)
    (row,) = csv.DictReader(io.StringIO(text))
    assert row["user name"] == '\'=HYPERLINK("http://x","click")'
    assert row["user"] == "'+1"
    assert row["recorded"] == "1970-01-01T00:00:00.000+00:00"
    assert row["signals"] == "first-access" and row["outcome"] == "0 success"
