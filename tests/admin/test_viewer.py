"""The viewer in a real browser (Debian's chromium driven by Playwright), as a privacy
officer uses it, over real traffic through a real proxy to the real FHIR server
(``ward_traffic``) and a day of earlier events: the events with their signals, chart,
detail and export; the patient access report, printable; the user activity report. Each
page is checked with axe-core (no serious or critical violation).

The screenshots go to ``tmp_path``; with ``FHIR_AUDIT_DOCS_SCREENSHOTS=1`` to ``docs/``,
where the README shows them."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.factories import (
    DR_LEE,
    ROOT,
    NodeFhirServer,
    RunningProxy,
    StartProxy,
    Ward,
    busy_record,
    earlier_day,
    ward_traffic,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AXE = ROOT / "testserver" / "node_modules" / "axe-core" / "axe.min.js"
TOKEN = "viewer-token-for-tests"
ZONE = "Asia/Kolkata"
"""The browser's zone: not UTC, and not a whole number of hours from it."""
SIGNALS = {
    "patients_per_hour": 1,
    "working_hours": {
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        "start": "00:00",
        "end": "00:00",
    },
}
"""Round the clock (start = end): no event is after hours, whenever the test runs."""

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="Debian's chromium is not installed (scripts/setup installs it with apt-get)",
    ),
    pytest.mark.timeout(240),
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--headless",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        await browser.close()


@pytest.fixture
async def ward(
    fhir_server: NodeFhirServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> AsyncIterator[tuple[RunningProxy, Ward, int]]:
    """A proxy with an admin token, the ward's traffic through it, and a day of earlier
    events (their number)."""
    proxy = await start_proxy(
        fhir_server.base_url,
        admin={"tokens": [TOKEN], "signals": SIGNALS},
    )
    ward = await ward_traffic(http, proxy.url)
    earlier = await earlier_day(proxy.queue, datetime.now(UTC))
    yield proxy, ward, earlier


async def open_page(browser: Browser, url: str) -> tuple[Page, list[Any]]:
    context = await browser.new_context(
        viewport={"width": 1360, "height": 860}, timezone_id=ZONE, accept_downloads=True
    )
    page = await context.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    await page.goto(url)
    return page, errors


async def sign_in(page: Page) -> None:
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", TOKEN)
    await page.click("#login-form button")
    await expect(page.locator("#login")).to_be_hidden()


async def shot(page: Page, tmp_path: Path, name: str, **options: Any) -> None:
    """A screenshot: into docs/ for the README when asked, else beside the test."""
    docs = os.environ.get("FHIR_AUDIT_DOCS_SCREENSHOTS") == "1"
    await page.screenshot(path=(ROOT / "docs" if docs else tmp_path) / name, **options)


async def accessible(page: Page) -> None:
    """axe-core finds no serious or critical violation on the page as it is now."""
    await page.evaluate(AXE.read_text())
    result = await page.evaluate(
        "axe.run(document, {runOnly: {type: 'tag', values:"
        " ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})"
    )
    bad = [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert bad == [], bad


async def column(page: Page, n: int) -> list[str]:
    texts: list[str] = await page.locator(f"#events tbody tr td:nth-child({n})").all_inner_texts()
    return texts


def csv_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


async def test_the_events_with_their_signals_chart_detail_and_export(
    ward: tuple[RunningProxy, Ward, int],
    http: aiohttp.ClientSession,
    browser: Browser,
    tmp_path: Path,
) -> None:
    proxy, people, earlier = ward
    # A request the proxy cannot classify: recorded, and shown as such, not blank.
    async with http.get(f"{proxy.url}/notAType/1", headers=DR_LEE.headers) as r:
        assert r.status >= 400
    proxied = 10 + 1
    page, errors = await open_page(browser, f"{proxy.admin_url}/ui")

    # No token and a wrong token are told apart.
    await expect(page.locator("#login-why")).to_have_text(re.compile("needs a token"))
    await page.fill("#token", "not-the-token")
    await page.click("#login-form button")
    await expect(page.locator("#login-why")).to_have_text(re.compile("not accepted"))
    await sign_in(page)
    assert await page.evaluate("sessionStorage.getItem('adminToken')") == TOKEN
    assert await page.evaluate("localStorage.length") == 0

    # The admin reads of the trail (this page's own among them) are hidden: the count
    # holds however often the page asks.
    await expect(page.locator("#total")).to_have_text(f"{proxied + earlier} events")
    await page.reload()
    await expect(page.locator("#total")).to_have_text(f"{proxied + earlier} events")
    await expect(page.locator("#events tbody tr")).to_have_count(20)
    await expect(page.locator("#newer")).to_be_disabled()  # nothing precedes the first page
    await page.check("input[name=admin]")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#events tbody .badge.admin").first).to_be_visible()
    await page.uncheck("input[name=admin]")

    # Times in the browser's zone, with the zone; or in UTC.
    assert all(t.endswith("GMT+5:30") for t in await column(page, 1))
    await page.select_option("#tz", "utc")
    await expect(page.locator("#events tbody tr td:nth-child(1)").first).to_have_text(
        re.compile(r"UTC$")
    )
    # A quick range fills the inputs in the zone shown, and the search agrees with them.
    await page.click("button[data-range='86400']")
    await expect(page.locator("#total")).to_have_text(re.compile("events"))
    typed = await page.input_value("input[name=from]")
    since = datetime.fromisoformat(typed).replace(tzinfo=UTC)
    assert abs(since - (datetime.now(UTC) - timedelta(days=1))) < timedelta(minutes=2)
    assert "tz=utc" in page.url and "from=" in page.url
    await page.select_option("#tz", "")
    local = await page.input_value("input[name=from]")
    assert datetime.fromisoformat(local) - datetime.fromisoformat(typed) == timedelta(
        hours=5, minutes=30
    ), "the same instant, shown in the browser's zone"

    # Ana's record: the signals, as badges.
    await page.click("#clear")
    await page.fill("#filters input[name=patient]", people.ana)
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#total")).to_have_text("7 events")
    badges = page.locator("#events tbody .badge")
    assert await badges.filter(has_text="first access").count() == 4
    assert await badges.filter(has_text="denied").count() == 2
    assert await badges.filter(has_text="break-glass").count() == 1
    await shot(page, tmp_path, "viewer-signals.png", clip=dict(x=0, y=0, width=1360, height=640))

    # Filter on a signal; open a denied access: the detail panel says it in words.
    await page.select_option("#filters select[name=signal]", "denied")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#total")).to_have_text("2 events")
    await page.locator("#events tbody button.open").first.focus()
    await page.keyboard.press("Enter")  # keyboard alone opens an event
    await expect(page.locator("#detail")).to_be_visible()
    facts = dict(
        zip(
            await page.locator("#detail-facts dt").all_inner_texts(),
            await page.locator("#detail-facts dd").all_inner_texts(),
            strict=True,
        )
    )
    assert facts["who"] == "mallory (Mallory)" and facts["client"] == "kiosk"
    assert facts["HTTP status"] == "403" and facts["from"] == "127.0.0.1"
    assert facts["outcome"].startswith("serious failure (code 8): access denied (HTTP 403)")
    assert facts["what"] == f"R read of {people.ana}"
    assert facts["when"].endswith("GMT+5:30")
    assert "first access" in facts["signals"] or "denied" in facts["signals"]
    assert await page.locator("#detail-json").is_hidden(), "the JSON comes after, folded"
    await page.click("#detail-raw summary")
    assert '"resourceType": "AuditEvent"' in await page.locator("#detail-json").inner_text()
    await accessible(page)
    await shot(page, tmp_path, "viewer-detail.png")

    # The request the proxy could not classify is named, not blank.
    await page.goto(f"{proxy.admin_url}/ui/?agent=dr.lee&outcome=4")
    await expect(page.locator("#events tbody tr")).to_have_count(2)
    assert "not a FHIR interaction" in await column(page, 4)

    # The chart: a day of events per hour, by action or outcome; a bar narrows the range.
    await page.goto(f"{proxy.admin_url}/ui/")
    bars = page.locator("#chart .bar")
    await expect(bars.first).to_be_visible()
    assert await bars.count() >= 25
    await page.select_option("#split", "outcome")
    await expect(page.locator("#chart .legend")).to_contain_text("minor failure")
    await shot(page, tmp_path, "viewer-chart.png", clip=dict(x=0, y=0, width=1360, height=560))
    await bars.nth(3).focus()
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(re.compile("from=.*to="))
    await expect(page.locator("#total")).not_to_have_text(f"{proxied + earlier} events")
    narrowed = int((await page.locator("#total").inner_text()).split()[0])
    assert 0 < narrowed < proxied + earlier

    # Page size and paging back in time, from the whole trail.
    await page.goto(f"{proxy.admin_url}/ui/?count=50")
    await expect(page.locator("#events tbody tr")).to_have_count(50)
    first_page = await column(page, 10)
    await page.click("#older")
    await expect(page.locator("#newer")).to_be_enabled()
    assert await column(page, 10) != first_page
    await page.click("#newer")
    await expect(page.locator("#newer")).to_be_disabled()  # back on the first page
    assert await column(page, 10) == first_page

    # Export: every event of the filtered view, not only the page shown.
    await page.goto(f"{proxy.admin_url}/ui/?agent=dr.lee")
    await expect(page.locator("#total")).to_have_text("6 events")
    async with page.expect_download() as download:
        await page.click("#export")
    saved = tmp_path / "export.csv"
    await (await download.value).save_as(saved)
    rows = csv_rows(saved)
    assert len(rows) == 6 and {r["user"] for r in rows} == {"dr.lee"}
    assert all(r["recorded"].endswith("+05:30") for r in rows)

    # Live: an event made now appears at the top without a reload.
    await page.goto(f"{proxy.admin_url}/ui/")
    await page.check("#live")
    async with http.get(f"{proxy.url}/{people.ben}", headers=DR_LEE.headers) as r:
        assert r.status == 200
    await expect(page.locator("#events tbody tr.new").first).to_contain_text(
        people.ben, timeout=15_000
    )
    await accessible(page)
    await shot(page, tmp_path, "viewer.png", clip=dict(x=0, y=0, width=1360, height=700))
    assert errors == []


async def test_the_patient_access_report_and_its_printable_form(
    ward: tuple[RunningProxy, Ward, int], browser: Browser, tmp_path: Path
) -> None:
    proxy, people, _ = ward
    page, errors = await open_page(browser, f"{proxy.admin_url}/ui/?view=patient")
    await sign_in(page)
    await page.fill("#patient-form input[name=patient]", people.ana)
    await page.click("#patient-form button[data-range='7776000']")
    summary = page.locator("#patient-report .summary")
    await expect(summary).to_contain_text(f"7 accesses to {people.ana} by 4 users")
    groups = page.locator("#patient-report table.groups > tbody > tr:not(.group-items)")
    await expect(groups).to_have_count(4)
    assert await groups.locator("th").all_inner_texts() == [
        "mallory",
        "nurse.kim",
        "dr.lee",
        "registrar",
    ]
    lee = groups.nth(2)
    await expect(lee.locator("td").nth(1)).to_have_text("physician")
    toggle = lee.locator("button.expand")
    await toggle.click()
    await expect(toggle).to_have_attribute("aria-expanded", "true")
    items = page.locator("#patient-group-2 table.items tbody tr")
    await expect(items).to_have_count(3)
    await accessible(page)
    await shot(page, tmp_path, "report-patient-access.png")

    async with page.expect_download() as download:
        await page.click("#patient-form .csv")
    saved = tmp_path / "patient.csv"
    await (await download.value).save_as(saved)
    assert len(csv_rows(saved)) == 7

    # The printable report: the browser prints it (and saves it as PDF).
    await page.click("#patient-form .print")
    await expect(page).to_have_url(re.compile(r"report\.html\?"))
    await expect(page.locator("#list tbody tr")).to_have_count(7)
    await expect(page.locator("#intro")).to_contain_text("7 accesses by 4 people or systems")
    await accessible(page)
    await page.emulate_media(media="print")
    await shot(page, tmp_path, "report-printable.png", full_page=True)
    pdf = tmp_path / "report.pdf"
    await page.pdf(path=pdf, format="A4")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert errors == []


async def test_the_user_activity_report(
    ward: tuple[RunningProxy, Ward, int], browser: Browser, tmp_path: Path
) -> None:
    proxy, people, _ = ward
    page, errors = await open_page(browser, f"{proxy.admin_url}/ui/?view=user&user=dr.lee")
    await sign_in(page)
    await expect(page.locator("#user-report .summary")).to_contain_text(
        "5 events by dr.lee (Dr Lee), touching 3 patients"
    )
    patients = page.locator("#user-report table.groups > tbody > tr:not(.group-items) th")
    assert await patients.all_inner_texts() == [people.nobody, people.ben, people.ana]
    days = page.locator("#user-report table.days tbody tr")
    counted = [int(t) for t in await days.locator("td:nth-child(2)").all_inner_texts()]
    assert sum(counted) == 5
    await expect(page.locator("#user-report")).to_contain_text("many patients")
    await accessible(page)
    await shot(page, tmp_path, "report-user-activity.png")
    await page.click("#user-form .print")
    await expect(page.locator("#list tbody tr")).to_have_count(5)
    assert errors == []


async def test_a_busy_record_s_groups_page_in_the_viewer_and_print_whole(
    fhir_server: NodeFhirServer, start_proxy: StartProxy, browser: Browser, tmp_path: Path
) -> None:
    """A record read more often than a report lists: a group shows the page the report
    listed and a page more on each click; a group the report listed none of fetches its
    events when opened; the printable report lists every access."""
    proxy = await start_proxy(fhir_server.base_url, admin={"tokens": [TOKEN]})
    record = await busy_record(proxy.queue, datetime.now(UTC))
    page, errors = await open_page(
        browser, f"{proxy.admin_url}/ui/?view=patient&patient={record.patient}"
    )
    await sign_in(page)
    await expect(page.locator("#patient-report .summary")).to_contain_text(
        f"{record.events} accesses to {record.patient} by {record.users} users"
    )
    groups = page.locator("#patient-report table.groups > tbody > tr:not(.group-items)")
    await expect(groups).to_have_count(record.users)
    await groups.nth(0).locator("button.expand").click()
    busy = page.locator("#patient-group-0")
    rows = busy.locator("table.items tbody tr")
    await expect(rows).to_have_count(50)
    more = busy.locator("button.more-events")
    await expect(more).to_have_text(f"show more (50 of {record.reads} shown)")
    await more.click()
    await expect(rows).to_have_count(100)
    await more.click()
    await expect(rows).to_have_count(record.reads)
    await expect(more).to_be_hidden()
    last = record.users - 1
    await groups.nth(last).locator("button.expand").click()
    await expect(page.locator(f"#patient-group-{last} table.items tbody tr")).to_have_count(1)
    await accessible(page)
    await page.click("#patient-form .print")
    await expect(page).to_have_url(re.compile(r"report\.html\?"))
    await expect(page.locator("#list tbody tr")).to_have_count(record.events)
    assert errors == []


XSS = '<img src=x onerror="window.__pwned = 1">'


async def test_an_ingested_event_shows_as_literal_text_marked_as_ingested(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    browser: Browser,
) -> None:
    """Markup in an ingested event's fields is shown as the text it is: no ``img`` in
    the table or the detail, nothing run. The row says the event was ingested and sits at
    the time it was received, not at the ``recorded`` its submitter claims."""
    proxy = await start_proxy(fhir_server.base_url, admin={"tokens": [TOKEN]})
    event = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"},
        "subtype": [{"system": "urn:example", "code": XSS}],
        "action": "E",
        "recorded": "2001-01-01T00:00:00Z",
        "outcome": "0",
        "agent": [{"requestor": True, "who": {"display": XSS}}],
        "source": {"observer": {"display": XSS}},
        "entity": [
            {"what": {"reference": "Patient/p-x"}, "role": {"code": "1"}, "type": {"code": "1"}}
        ],
    }
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
    async with http.post(f"{proxy.admin_url}/fhir/AuditEvent", json=event, headers=headers) as r:
        assert r.status == 201, await r.text()
        received = (await r.json(content_type=None))["meta"]["lastUpdated"]

    page = await browser.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    page.on("dialog", lambda dialog: errors.append(dialog.message))
    await page.goto(f"{proxy.admin_url}/ui/?patient=Patient/p-x")
    await page.fill("#token", TOKEN)
    await page.click("#login-form button")
    await expect(page.locator("#events tbody tr")).to_have_count(1)
    assert await column(page, 5) == [XSS], "the user cell holds the markup as text"
    assert await column(page, 4) == [f"ingested · {XSS}"]
    (shown,) = await column(page, 1)
    assert shown.startswith(received.replace("T", " ")[:23]), "placed when received"
    assert "2001-01-01" in (
        await page.locator("#events tbody td").first.get_attribute("title") or ""
    )
    await page.locator("#events tbody tr").first.click()
    await expect(page.locator("#detail")).to_be_visible()
    await page.click("#detail-raw summary")
    assert "<img src=x onerror=" in await page.locator("#detail-json").inner_text()
    assert await page.locator("#events img, #detail img").count() == 0
    assert await page.evaluate("window.__pwned") is None
    assert errors == []
