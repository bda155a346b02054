"""Signals computed from the events and the store's index (proxy/admin/signals.py): the
pure parts by table, and the whole against a real store with fan-outs and shards'
global seqs where they matter."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.admin.signals import Access, Signal, _patients_in_hour, after_hours, signals_of
from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.settings import SignalSettings, WorkingHours
from proxy.store.marks import Mark
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery, FanOut, UserAccess
from tests.factories import queued_event, search_exchange

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, zone: ZoneInfo = BERLIN) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


@pytest.mark.parametrize(
    ("local", "hours", "outside"),
    [
        # Office hours, Monday to Friday 07:00-19:00 Berlin time (2026-12-07 is a Monday).
        ("2026-12-07 07:00:00", WorkingHours(zone="Europe/Berlin"), False),
        ("2026-12-07 06:59:59", WorkingHours(zone="Europe/Berlin"), True),
        ("2026-12-07 18:59:59", WorkingHours(zone="Europe/Berlin"), False),
        ("2026-12-07 19:00:00", WorkingHours(zone="Europe/Berlin"), True),
        ("2026-12-06 10:00:00", WorkingHours(zone="Europe/Berlin"), True),  # Sunday
        # Summer time: the hours stay local.
        ("2026-07-06 07:30:00", WorkingHours(zone="Europe/Berlin"), False),
        # A night shift, Monday 22:00 to Tuesday 06:00, belongs to Monday.
        ("2026-12-07 23:00:00", WorkingHours(days=("mon",), start=time(22), end=time(6)), False),
        ("2026-12-08 05:00:00", WorkingHours(days=("mon",), start=time(22), end=time(6)), False),
        ("2026-12-08 23:00:00", WorkingHours(days=("mon",), start=time(22), end=time(6)), True),
        ("2026-12-07 05:00:00", WorkingHours(days=("mon",), start=time(22), end=time(6)), True),
        # Round the clock on the days named.
        ("2026-12-07 03:00:00", WorkingHours(start=time(0), end=time(0)), False),
        ("2026-12-06 03:00:00", WorkingHours(start=time(0), end=time(0)), True),
    ],
)
def test_after_hours_is_read_in_the_working_hours_zone(
    local: str, hours: WorkingHours, outside: bool
) -> None:
    zone = ZoneInfo(hours.zone)
    assert after_hours(at(local, zone), hours) is outside


def access(ts: float, seq: int, *patients: str) -> Access:
    return Access(ts=ts, seq=seq, user="u", patients=patients, outcome="0", marks=frozenset())


def test_patients_in_the_hour_up_to_each_access() -> None:
    """Distinct patients, the event's own included, in ``[t - 1 h, t]``; a fan-out row
    names several."""
    around = [
        UserAccess(ts=0.0, seq=1, patients=("P/a",)),
        UserAccess(ts=600.0, seq=2, patients=("P/b", "P/c")),
        UserAccess(ts=1200.0, seq=3, patients=("P/a",)),
        UserAccess(ts=3700.0, seq=4, patients=("P/d",)),
        UserAccess(ts=4300.0, seq=5, patients=("P/e",)),
    ]
    mine = [access(u.ts, u.seq, *u.patients) for u in around]
    # At 3700 s the hour reaches back to 100 s: b and c (600), a (1200), d.
    assert _patients_in_hour(mine, around) == [1, 3, 3, 4, 3]
    # Order of the accesses asked about does not matter.
    assert _patients_in_hour(mine[::-1], around) == [3, 4, 3, 3, 1]


async def test_signals_over_a_store_with_a_fan_out(tmp_path: Path) -> None:
    """A search that returned three patients' data is one stored row (a fan-out): each
    of its events is the user's first access to its own patient, and the three count
    toward the hour's patients."""
    queue = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    try:
        t0 = datetime(2026, 12, 7, 10, tzinfo=UTC)  # a Monday, 11:00 in Berlin

        def event(n: int, patient: str, minutes: float, **extra: Any) -> dict[str, Any]:
            recorded = (t0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
            return queued_event(n, patient=patient, user="dr.x", recorded=recorded, **extra)

        await queue.append([event(0, "Patient/a", 0), event(1, "Patient/a", 1)])
        search = search_exchange(["Patient/b", "Patient/c"], user="dr.x")
        search.started_at = search.finished_at = t0 + timedelta(minutes=2)
        rows = store_rows(build_events(search, AuditContext.default(), search.finished_at))
        assert [type(r) for r in rows] == [FanOut], "one row for both patients"
        await queue.append_rows(rows)
        denied = event(4, "Patient/a", 4, outcome="8", outcomeDesc="access denied (HTTP 403): no")
        glass = event(5, "Patient/d", 70)
        glass["agent"][0]["purposeOfUse"] = [{"coding": [{"code": "ETREAT"}]}]
        await queue.append([denied, glass])
        page = await queue.search_page(EventQuery(newest_first=False, limit=100))
        settings = SignalSettings(
            patients_per_hour=2, working_hours=WorkingHours(zone="Europe/Berlin")
        )
        found = await signals_of(page.items, queue, settings)
        F, M, D, B = (
            Signal.FIRST_ACCESS,
            Signal.MANY_PATIENTS,
            Signal.DENIED,
            Signal.BREAK_GLASS,
        )
        assert found == [
            {F},  # a, first
            set(),  # a again
            {F, M},  # the search's b: a, b and c in the hour (one row names both)
            {F, M},  # the search's c
            {D, M},  # a again, denied: still three patients in the hour
            {F, B},  # d, 70 minutes on: alone in its hour
        ]
        # The index agrees: the marks are terms.
        marked = await queue.search_page(EventQuery(marked=(Mark.DENIED.value,)))
        assert [i.event_id for i in marked.items] == [denied["id"]]
        glassy = await queue.search_page(EventQuery(marked=(Mark.BREAK_GLASS.value,)))
        assert [i.event_id for i in glassy.items] == [glass["id"]]
    finally:
        await queue.close()
