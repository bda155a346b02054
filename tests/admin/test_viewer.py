"""The viewer in a real browser (Debian's chromium driven by Playwright): traffic through a
real proxy to the real FHIR server, then the page as a privacy officer uses it: token
prompt, filter by patient and date, page back in time, open an event, watch one arrive."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.factories import NodeFhirServer, RunningProxy, StartProxy, unsigned_jwt

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "viewer-token-for-tests"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (scripts/setup installs it with apt-get)",
)


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


async def create(http: aiohttp.ClientSession, proxy: RunningProxy, family: str) -> str:
    async with http.post(
        f"{proxy.url}/Patient",
        json={"resourceType": "Patient", "name": [{"family": family}]},
        headers={"Authorization": "Bearer opaque-clerk-token-0000000000000000000000"},
    ) as r:
        assert r.status == 201
        return f"Patient/{(await r.json(content_type=None))['id']}"


CLINICIAN = unsigned_jwt({"sub": "dr.lee", "name": "Dr Lee", "client_id": "ehr-web"})


async def read(http: aiohttp.ClientSession, proxy: RunningProxy, ref: str, rid: str) -> None:
    headers = {"X-Request-Id": rid, "Authorization": f"Bearer {CLINICIAN}"}
    async with http.get(f"{proxy.url}/{ref}", headers=headers) as r:
        assert r.status == 200


async def cells(page: Page, column: int) -> list[str]:
    texts: list[str] = await page.locator(
        f"#events tbody tr td:nth-child({column})"
    ).all_inner_texts()
    return texts


async def test_the_viewer_finds_pages_opens_and_follows_events(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    browser: Browser,
    tmp_path: Path,
) -> None:
    proxy = await start_proxy(fhir_server.base_url, admin={"tokens": [TOKEN]})
    ana = await create(http, proxy, "Ana")
    ben = await create(http, proxy, "Ben")
    for i in range(25):
        await read(http, proxy, ana, f"ana-read-{i:02d}")
    for i in range(3):
        await read(http, proxy, ben, f"ben-read-{i:02d}")

    page = await browser.new_page(viewport={"width": 1280, "height": 760})
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    await page.goto(f"{proxy.admin_url}/ui")
    await expect(page.locator("#login")).to_be_visible()
    await page.screenshot(path=tmp_path / "1-token.png")
    await page.fill("#token", TOKEN)
    await page.click("#login-form button")
    await expect(page.locator("#events tbody tr")).to_have_count(20)
    assert await page.evaluate("sessionStorage.getItem('adminToken')") == TOKEN
    assert await page.evaluate("localStorage.length") == 0
    # 30 proxied events and the record of this first look at them (the strip polls).
    await expect(page.locator("#q-pending")).to_have_text("31", timeout=15_000)

    # Filter by patient, by date (the last hour, in the browser's local time) and by
    # interaction (the viewer's own searches for Ana are PatientQuery events about her).
    since = (datetime.now() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    await page.fill("input[name=patient]", ana)
    await page.fill("input[name=from]", since)
    await page.fill("input[name=subtype]", "read")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#total")).to_have_text("25 events")
    assert "patient=Patient" in page.url and "from=" in page.url
    first_page = await cells(page, 9)
    assert first_page[:3] == ["ana-read-24", "ana-read-23", "ana-read-22"]
    assert set(await cells(page, 6)) == {ana}
    assert set(await cells(page, 4)) == {"dr.lee"} and set(await cells(page, 5)) == {"ehr-web"}
    await page.screenshot(path=tmp_path / "2-filtered.png")

    # Page back in time: the five oldest reads.
    await page.click("#older")
    await expect(page.locator("#events tbody tr")).to_have_count(5)
    assert "cursor=" in page.url
    assert await cells(page, 9) == [f"ana-read-{i:02d}" for i in (4, 3, 2, 1, 0)]
    await page.click("#newer")
    await expect(page.locator("#events tbody tr")).to_have_count(20)
    assert await cells(page, 9) == first_page

    # A filter in the URL is a view that can be shared: open it in a new tab.
    shared = await browser.new_page()
    await shared.goto(page.url)
    await shared.fill("#token", TOKEN)
    await shared.click("#login-form button")
    await expect(shared.locator("#total")).to_have_text("25 events")
    await shared.close()

    # Open an event: the whole AuditEvent, and links to the patient's other events.
    await page.locator("#events tbody tr").first.click()
    await expect(page.locator("#detail")).to_be_visible()
    detail = await page.locator("#detail-json").inner_text()
    assert '"resourceType": "AuditEvent"' in detail and "ana-read-24" in detail
    await expect(page.locator("#detail-links a").first).to_have_text(f"other events of {ana}")
    await page.screenshot(path=tmp_path / "3-detail.png")

    # Live: an event made now appears at the top without a reload.
    await page.check("#live")
    await read(http, proxy, ana, "ana-live-read")
    await expect(page.locator("#events tbody tr.new td:nth-child(9)").first).to_have_text(
        "ana-live-read", timeout=15_000
    )
    assert (await cells(page, 9))[0] == "ana-live-read"
    await page.screenshot(path=tmp_path / "4-live.png")
    await page.screenshot(
        path=tmp_path / "readme.png", clip={"x": 0, "y": 0, "width": 1280, "height": 480}
    )

    # Dead letters show in the strip and are retried from it.
    claimed = await proxy.queue.claim(2, datetime.now(UTC))
    await proxy.queue.dead_letter([c.seq for c in claimed], "422 Unprocessable: test")
    await expect(page.locator("#q-dead")).to_have_text("2", timeout=15_000)
    await page.screenshot(path=tmp_path / "5-dead.png")
    await page.click("#q-retry")
    await expect(page.locator("#q-note")).to_have_text("requeued 2")
    await expect(page.locator("#q-dead")).to_have_text("0")
    assert (await proxy.queue.stats()).dead == 0

    # Ben's events through the URL a detail link gives.
    await page.goto(f"{proxy.admin_url}/ui/?patient={ben}&action=R")
    await expect(page.locator("#events tbody tr")).to_have_count(3)
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
    assert await cells(page, 4) == [XSS], "the user cell holds the markup as text"
    assert await cells(page, 3) == [f"ingested · {XSS}"]
    assert await cells(page, 1) == [received.replace("T", " ")[:23]], "placed when received"
    assert "2001-01-01" in (
        await page.locator("#events tbody td").first.get_attribute("title") or ""
    )
    await page.locator("#events tbody tr").first.click()
    await expect(page.locator("#detail")).to_be_visible()
    assert "<img src=x onerror=" in await page.locator("#detail-json").inner_text()
    assert await page.locator("#events img, #detail img").count() == 0
    assert await page.evaluate("window.__pwned") is None
    assert errors == []
