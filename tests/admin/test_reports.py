"""The privacy reports, signals, activity counts and CSV exports against a store filled by
real traffic through the proxy (``ward_traffic``; the upstream's answers from memory,
``FhirDouble``), every expectation counted by hand from what that traffic did."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.admin import reports
from proxy.admin.app import build_admin_app
from proxy.admin.reports import GROUP_PAGE, REPORT_LISTED, LocalSlots
from proxy.settings import AdminSettings
from proxy.store.queue import AuditQueue
from proxy.store.search import SLOT_S
from tests.factories import (
    BusyRecord,
    FhirDouble,
    RunningProxy,
    StartProxy,
    Ward,
    busy_record,
    ward_traffic,
)

ALL_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
SIGNALS = {
    # One patient an hour is already many: dr.lee's and the registrar's second patient
    # stand out. Round the clock every day: nothing is after hours.
    "patients_per_hour": 1,
    "working_hours": {"days": ALL_DAYS, "start": "00:00", "end": "00:00"},
}
HIDE_ADMIN = "_tag:not=" + quote("urn:fhir-audit-proxy:tag|admin-access")
ONLY_ADMIN = "_tag=" + quote("urn:fhir-audit-proxy:tag|admin-access")


@dataclass
class Trail:
    proxy: RunningProxy
    ward: Ward


@pytest.fixture
async def trail(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> AsyncIterator[Trail]:
    proxy = await start_proxy(fhir_double, admin={"signals": SIGNALS})
    yield Trail(proxy, await ward_traffic(http, proxy.url))


async def get(http: aiohttp.ClientSession, url: str, status: int = 200) -> Any:
    async with http.get(url) as r:
        assert r.status == status, await r.text()
        if r.content_type == "text/csv":
            return await r.text()
        return await r.json(content_type=None)


def by(groups: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {g[key]: g for g in groups}


async def test_patient_access_report_lists_who_saw_the_record(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    admin, ana = trail.proxy.admin_url, trail.ward.ana
    report = await get(http, f"{admin}/api/reports/patient-access?patient={ana}")
    assert report["patient"] == ana and report["events"] == 7 and report["users"] == 4
    assert [g["user"] for g in report["groups"]] == ["mallory", "nurse.kim", "dr.lee", "registrar"]
    groups = by(report["groups"], "user")
    lee = groups["dr.lee"]
    assert lee["events"] == 3 and lee["names"] == ["Dr Lee"] and lee["roles"] == ["physician"]
    assert lee["clients"] == ["ehr-web"] and lee["addresses"] == ["127.0.0.1"]
    assert lee["interactions"] == {"read": 3} and lee["outcomes"] == {"success": 3}
    assert lee["signals"] == {"first-access": 1}, "only the first of the three reads"
    assert [i["signals"] for i in lee["items"]] == [[], [], ["first-access"]], "newest first"
    assert lee["first"] == min(i["recorded"] for i in lee["items"])
    assert lee["last"] == max(i["recorded"] for i in lee["items"])
    kim = groups["nurse.kim"]
    assert kim["events"] == 1 and kim["signals"] == {"first-access": 1, "break-glass": 1}
    assert kim["items"][0]["purposeOfUse"] == ["ETREAT"]
    mallory = groups["mallory"]
    assert mallory["events"] == 2 and mallory["outcomes"] == {"serious failure": 2}
    assert mallory["signals"] == {"denied": 2, "first-access": 1}
    assert {i["httpStatus"] for i in mallory["items"]} == {403}
    registrar = groups["registrar"]
    assert registrar["interactions"] == {"create": 1}
    assert registrar["signals"] == {"first-access": 1}
    assert report["signals"] == {"first-access": 4, "denied": 2, "break-glass": 1}
    assert all(i["patients"] == [ana] for g in report["groups"] for i in g["items"])

    # Ben's record: the registrar and dr.lee each touched two patients within the hour.
    ben = await get(http, f"{admin}/api/reports/patient-access?patient={trail.ward.ben}")
    assert ben["events"] == 2
    assert {g["user"]: g["signals"] for g in ben["groups"]} == {
        "dr.lee": {"first-access": 1, "many-patients": 1},
        "registrar": {"first-access": 1, "many-patients": 1},
    }


async def test_reports_are_audited_and_leave_admin_reads_out(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    admin, ana = trail.proxy.admin_url, trail.ward.ana
    url = f"{admin}/api/reports/patient-access?patient={ana}"
    for _ in range(3):
        assert (await get(http, url))["events"] == 7, "the report's own record stays out"
    # Each report is a search of the trail about Ana: recorded, and marked.
    found = await get(http, f"{admin}/fhir/AuditEvent?patient={ana}&{ONLY_ADMIN}")
    assert found["total"] == 3
    assert {e["resource"]["subtype"][0]["code"] for e in found["entry"]} == {"search-type"}
    assert (await get(http, f"{url}&admin-access=include"))["events"] == 7 + 3


async def test_user_activity_report_lists_the_patients_a_user_touched(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    admin, ward = trail.proxy.admin_url, trail.ward
    report = await get(http, f"{admin}/api/reports/user-activity?user=dr.lee")
    assert report["user"] == "dr.lee" and report["names"] == ["Dr Lee"]
    assert report["events"] == 5 and report["patients"] == 3
    assert [g["patient"] for g in report["groups"]] == [ward.nobody, ward.ben, ward.ana]
    groups = by(report["groups"], "patient")
    assert groups[ward.ana]["events"] == 3
    assert groups[ward.nobody]["outcomes"] == {"minor failure": 1}
    assert groups[ward.nobody]["signals"] == {
        "failed": 1,
        "first-access": 1,
        "many-patients": 1,
    }
    assert groups[ward.ben]["signals"] == {"first-access": 1, "many-patients": 1}
    assert report["signals"] == {"first-access": 3, "many-patients": 2, "failed": 1}
    assert sum(d["events"] for d in report["days"]) == 5
    assert max(d["patients"] for d in report["days"]) <= 3
    csv_text = await get(http, f"{admin}/api/reports/user-activity?user=dr.lee&format=csv")
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert len(rows) == 5 and {r["user"] for r in rows} == {"dr.lee"}


async def test_a_report_as_csv_has_a_row_per_access_in_the_zone_asked_for(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    admin, ana = trail.proxy.admin_url, trail.ward.ana
    async with http.get(
        f"{admin}/api/reports/patient-access?patient={ana}&format=csv&tz=Asia/Kolkata"
    ) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        assert "attachment" in r.headers["Content-Disposition"]
        text = await r.text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 7
    assert all(row["recorded"].endswith("+05:30") for row in rows)
    assert sorted(row["user"] for row in rows) == [
        "dr.lee",
        "dr.lee",
        "dr.lee",
        "mallory",
        "mallory",
        "nurse.kim",
        "registrar",
    ]
    denied = [row for row in rows if row["user"] == "mallory"]
    assert {row["HTTP status"] for row in denied} == {"403"}
    assert {row["outcome"] for row in denied} == {"8 serious failure"}
    assert all("denied" in row["signals"].split() for row in denied)


async def test_signals_filter_a_search_and_mark_its_entries(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    base = f"{trail.proxy.admin_url}/fhir/AuditEvent?{HIDE_ADMIN}&"

    async def users(query: str) -> list[str]:
        bundle = await get(http, base + query)
        return sorted(
            next(a for a in e["resource"]["agent"] if a.get("requestor"))["who"]["identifier"][
                "value"
            ]
            for e in bundle["entry"]
            if e["search"]["mode"] == "match"
        )

    # Indexed: denied and break-glass are marks, counted as any search.
    denied = await get(http, base + "signal=denied")
    assert denied["total"] == 2
    assert await users("signal=break-glass") == ["nurse.kim"]
    # Examined: the others are computed for each match.
    assert await users("signal=first-access") == [
        "dr.lee",
        "dr.lee",
        "dr.lee",
        "mallory",
        "nurse.kim",
        "registrar",
        "registrar",
    ]
    assert await users("signal=many-patients") == ["dr.lee", "dr.lee", "registrar"]
    assert await users("signal=failed") == ["dr.lee"]
    assert await users("signal=after-hours") == []
    assert await users("signal=failed,denied") == ["dr.lee", "mallory", "mallory"]
    await get(http, base + "signal=curious", 400)

    # A signal-filtered search pages with its links, both ways.
    url: str | None = base + "signal=first-access&_count=3"
    pages = []
    last: dict[str, Any] = {}
    while url:
        last = await get(http, url)
        pages.append([e["resource"]["id"] for e in last["entry"]])
        url = next((lk["url"] for lk in last["link"] if lk["relation"] == "next"), None)
    assert [len(p) for p in pages] == [3, 3, 1]
    back = []
    prev = next((lk["url"] for lk in last["link"] if lk["relation"] == "previous"), None)
    while prev:
        body = await get(http, prev)
        back.append([e["resource"]["id"] for e in body["entry"]])
        prev = next((lk["url"] for lk in body["link"] if lk["relation"] == "previous"), None)
    assert back == pages[-2::-1]

    # Asked for, every entry says its signals.
    marked = await get(http, base + f"patient={trail.ward.ana}&with-signals=true")
    flagged = [
        sorted(x["valueCode"] for x in e["search"].get("extension", ())) for e in marked["entry"]
    ]
    assert flagged.count(["denied"]) == 1 and flagged.count(["denied", "first-access"]) == 1
    assert flagged.count(["break-glass", "first-access"]) == 1


async def test_activity_counts_a_search_by_action_and_outcome(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    admin, ana = trail.proxy.admin_url, trail.ward.ana

    async def totals(query: str) -> tuple[int, dict[str, int], dict[str, int]]:
        chart = await get(http, f"{admin}/api/activity?{HIDE_ADMIN}&{query}")
        actions: dict[str, int] = {}
        outcomes: dict[str, int] = {}
        for bucket in chart["buckets"]:
            for key, n in bucket["byAction"].items():
                actions[key] = actions.get(key, 0) + n
            for key, n in bucket["byOutcome"].items():
                outcomes[key] = outcomes.get(key, 0) + n
        return chart["events"], actions, outcomes

    # The whole store: read from the quarter-hour counts (and the ragged ends).
    assert await totals("") == (10, {"C": 2, "R": 8}, {"0": 7, "4": 1, "8": 2})
    assert await totals("date=ge2020-01-01") == (10, {"C": 2, "R": 8}, {"0": 7, "4": 1, "8": 2})
    # One patient: walked through the index.
    assert await totals(f"patient={ana}") == (7, {"C": 1, "R": 6}, {"0": 5, "8": 2})
    assert await totals("outcome=8") == (2, {"R": 2}, {"8": 2})
    assert (await get(http, f"{admin}/api/activity"))["bucket"] == "hour", "a short range"
    assert (await get(http, f"{admin}/api/activity?date=ge2020"))["bucket"] == "day"
    chart = await get(http, f"{admin}/api/activity?tz=America/New_York&bucket=day")
    assert chart["bucket"] == "day" and chart["buckets"][0]["start"].endswith("-05:00")
    assert chart["buckets"][0]["start"][11:19] == "00:00:00", "local midnight"
    await get(http, f"{admin}/api/activity?tz=Mars/Olympus", 400)


async def test_any_filtered_view_exports_as_csv(trail: Trail, http: aiohttp.ClientSession) -> None:
    admin = trail.proxy.admin_url
    text = await get(http, f"{admin}/api/export.csv?{HIDE_ADMIN}&action=R&tz=UTC")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 8 and {r["action"] for r in rows} == {"R"}
    assert all(r["recorded"].endswith("+00:00") for r in rows)
    text = await get(http, f"{admin}/api/export.csv?{HIDE_ADMIN}&signal=many-patients")
    assert len(list(csv.DictReader(io.StringIO(text)))) == 3
    empty = await get(http, f"{admin}/api/export.csv?agent=nobody-at-all")
    assert empty.splitlines() == [empty.splitlines()[0]] and empty.startswith("recorded,")


async def test_admin_reads_are_marked_and_a_search_that_hides_them_keeps_its_count(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    """Three identical searches used to count 8, 9, 10: each records itself."""
    admin = trail.proxy.admin_url
    hidden = [(await get(http, f"{admin}/fhir/AuditEvent?{HIDE_ADMIN}"))["total"] for _ in range(3)]
    assert hidden == [10, 10, 10]
    shown = (await get(http, f"{admin}/fhir/AuditEvent"))["total"]
    assert shown == 10 + 3
    await get(http, f"{admin}/fhir/AuditEvent?_tag=urn:other|x", 400)


async def test_reports_refuse_what_they_cannot_answer(
    trail: Trail, http: aiohttp.ClientSession
) -> None:
    admin = trail.proxy.admin_url
    for query, status in (
        ("patient-access", 400),
        ("patient-access?patient=Patient/1&from=yesterday", 400),
        ("patient-access?patient=Patient/1&from=2026-02-01&to=2026-01-01", 400),
        ("patient-access?patient=Patient/1&format=pdf", 400),
        ("patient-access?patient=Patient/1&colour=blue", 400),
        ("user-activity", 400),
        ("user-activity?user=dr.lee&tz=Nowhere/Else", 400),
    ):
        outcome = await get(http, f"{admin}/api/reports/{query}", status)
        assert outcome["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "zone", ["Europe/Berlin", "Australia/Lord_Howe", "America/St_Johns", "Asia/Kolkata", "UTC"]
)
@pytest.mark.parametrize("step_s", [3600, 86_400])
def test_local_hours_and_days_of_quarter_hours_across_daylight_saving(
    zone: str, step_s: int
) -> None:
    """Each quarter hour of 2026 falls in the local hour or day zoneinfo puts it in,
    through every change of offset (Lord Howe changes by half an hour, on a half hour)."""
    tz = ZoneInfo(zone)
    local = LocalSlots(tz, step_s)
    first = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) // SLOT_S
    for slot in range(first, first + 365 * 96):
        wall = datetime.fromtimestamp(slot * SLOT_S, tz).replace(tzinfo=None)
        expected = wall.replace(minute=0) if step_s == 3600 else wall.replace(hour=0, minute=0)
        assert local.start(local.bucket(slot)).replace(tzinfo=None) == expected, slot


@dataclass
class Busy:
    admin: str
    record: BusyRecord


@pytest.fixture
async def busy(queue: AuditQueue) -> AsyncIterator[Busy]:
    record = await busy_record(queue, datetime.now(UTC))
    app = build_admin_app(queue, AdminSettings(), writer=queue)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Busy(str(server.make_url("")).rstrip("/"), record)
    finally:
        await server.close()


async def following(http: aiohttp.ClientSession, url: str | None) -> list[list[dict[str, Any]]]:
    """The pages of events from ``url`` on, each page's ``next`` followed."""
    pages = []
    while url:
        page = await get(http, url)
        assert set(page) == {"items", "next"}
        pages.append(page["items"])
        url = page["next"]
    return pages


def newest_first(items: list[dict[str, Any]]) -> bool:
    return [i["recorded"] for i in items] == sorted((i["recorded"] for i in items), reverse=True)


async def test_a_busy_record_lists_a_page_of_each_group_links_to_the_rest_and_exports_all(
    busy: Busy, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, record = busy.admin, busy.record
    report = await get(http, f"{admin}/api/reports/patient-access?patient={record.patient}")
    assert report["events"] == record.events and report["users"] == record.users
    assert report["groups"][0]["user"] == record.busy, "the most recent reads"
    groups = by(report["groups"], "user")
    heavy = groups[record.busy]
    assert heavy["events"] == record.reads and heavy["names"] == ["Dr Busy"]
    assert heavy["roles"] == ["physician"] and heavy["clients"] == ["ehr-web"]
    assert sorted(heavy["addresses"]) == ["10.1.0.1", "10.1.0.2"]
    # The report lists a page of each group while its room lasts (most recent first).
    assert len(heavy["items"]) == GROUP_PAGE and newest_first(heavy["items"])
    assert sum(len(g["items"]) for g in report["groups"]) == REPORT_LISTED
    for group in report["groups"]:
        assert (group["next"] is None) == (len(group["items"]) == group["events"]), group
    unlisted = [g for g in report["groups"] if not g["items"]]
    assert unlisted, "the room ran out before the last groups"

    # A group's next pages hold the rest of its events, newest first, each once, with
    # the signals its summary counts.
    rest = await following(http, heavy["next"])
    assert [len(page) for page in rest] == [GROUP_PAGE, record.reads - 2 * GROUP_PAGE]
    items = heavy["items"] + [item for page in rest for item in page]
    assert len(items) == record.reads == len({i["id"] for i in items})
    assert newest_first(items) and {i["user"] for i in items} == {record.busy}
    assert dict(Counter(s for i in items for s in i["signals"])) == heavy["signals"]
    for group in unlisted:
        (page,) = await following(http, group["next"])
        assert len(page) == group["events"] and {i["user"] for i in page} == {group["user"]}
        assert dict(Counter(s for i in page for s in i["signals"])) == group["signals"]

    # Every event of the report, a page of the size asked for at a time.
    events = f"{admin}/api/reports/patient-access/events?patient={record.patient}&count=64"
    pages = await following(http, events)
    assert [len(p) for p in pages] == [64, 64, 64, record.events - 3 * 64]
    listed = [i for p in pages for i in p]
    assert newest_first(listed) and len({i["id"] for i in listed}) == record.events

    # As CSV, streamed in batches (made small here): the same events in the same order,
    # with the same signals.
    monkeypatch.setattr(reports, "EXPORT_BATCH", 64)
    async with http.get(
        f"{admin}/api/reports/patient-access?patient={record.patient}&format=csv"
    ) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        assert "attachment" in r.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert [r["event id"] for r in rows] == [i["id"] for i in listed]
    assert [r["signals"] for r in rows] == [" ".join(i["signals"]) for i in listed]
    users = Counter(r["user"] for r in rows)
    assert users[record.busy] == record.reads and len(users) == record.users
    assert {r["HTTP status"] for r in rows if r["user"] == "mallory"} == {"403"}
    # The searches' events, each its own patient's (fan-outs), are there too.
    assert {r["patients"] for r in rows if r["user"] == record.searcher} == {record.patient}


async def test_a_user_s_group_pages_and_each_page_is_recorded_and_bad_pages_refused(
    busy: Busy, http: aiohttp.ClientSession
) -> None:
    admin, record = busy.admin, busy.record
    report = await get(http, f"{admin}/api/reports/user-activity?user={record.searcher}")
    groups = by(report["groups"], "patient")
    assert report["events"] == 20 and report["patients"] == 8
    assert groups["Patient/x"]["events"] == 5 and groups["Patient/other0"]["events"] == 1
    assert all(g["next"] is None and len(g["items"]) == g["events"] for g in groups.values())
    url = (
        f"{admin}/api/reports/user-activity/events?user={record.searcher}"
        f"&group={quote('Patient/x')}&count=2"
    )
    pages = await following(http, url)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == groups["Patient/x"]["items"]

    # Each page shows events: each is recorded as a read of the trail about the patient.
    reads = f"{admin}/fhir/AuditEvent?patient={record.patient}&{ONLY_ADMIN}&_count=0"
    assert (await get(http, reads))["total"] == 0
    events = f"{admin}/api/reports/patient-access/events?patient={record.patient}"
    # A page past the oldest shows nothing, and records nothing.
    assert await get(http, f"{events}&group=nurse.3&after=1.5_7") == {"items": [], "next": None}
    assert (await get(http, reads))["total"] == 0
    first = await get(http, f"{events}&group=nurse.3&count=4")
    assert len((await get(http, first["next"]))["items"]) == 2
    assert (await get(http, reads))["total"] == 2
    for bad in ("after=yesterday", "count=-1", "colour=blue", "format=csv"):
        outcome = await get(http, f"{events}&{bad}", 400)
        assert outcome["resourceType"] == "OperationOutcome"
    await get(http, f"{admin}/api/reports/patient-access/events", 400)
