"""The privacy reports and the activity chart over a million stored events: p50/p99 of
the admin API's answers, over HTTP, as the viewer asks for them.

The store is ``bench_search.py``'s (1,000,000 events: ``GET Observation`` by one of 1,000
users about one of 20,000 patients, two seconds apart, about 23 days), plus a busy
patient: ``--hot`` more events about ``Patient/hot`` by 300 users spread over 90 days.
Each query goes through a real admin listener (``build_admin_app`` on aiohttp), so the
figures include the signals, the JSON and the access record each report writes (one
durable append). Every query asks for the 90 days up to the end of the stored events.

    python bench/bench_reports.py [--events 1000000] [--queries 100] [--store PATH]
    python bench/bench_reports.py --write-cost [--events 32000]

An existing ``--store`` with enough events is reused (``bench_search.py --store`` makes
one). ``--write-cost`` measures instead what schema 7's tables cost the writer: the same
events inserted 32 to a statement, without fsync, into a store at schema 6 and one at
schema 7, alternately, five times each (medians compared).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import uvloop
from aiohttp.test_utils import TestServer
from bench_search import STEP_S, T0, build_rows, fill, percentile

from proxy.admin.app import build_admin_app
from proxy.settings import AdminSettings
from proxy.store.database import connect, load_codec
from proxy.store.queue import AuditQueue
from proxy.store.schema import MIGRATIONS, split_statements
from proxy.store.tables import insert_events_sql

HOT = "Patient/hot"
RUNS = 5
HIDE_ADMIN = ("_tag:not", "urn:fhir-audit-proxy:tag|admin-access")


def fill_hot(queue: AuditQueue, path: Path, count: int, days: float) -> float:
    """``count`` events about the busy patient, spread over ``days`` days."""
    conn = connect(path, False, 1 << 40)
    try:
        have = conn.execute(
            "SELECT COUNT(*) FROM event_terms WHERE term = ?", (f"e:{HOT}",)
        ).fetchone()[0]
        if have >= count:
            return 0.0
        t = time.perf_counter()
        step = days * 86_400 / count
        start = T0 - timedelta(days=days) + timedelta(days=23)
        codec = load_codec(conn)
        rows = build_rows(codec, 0, count, 300, 1, t0=start, step_s=step, patient_name=HOT)
        conn.execute("BEGIN")
        conn.executemany(insert_events_sql(1), [(None, None, *r[2:]) for r in rows])
        conn.execute("COMMIT")
        return time.perf_counter() - t
    finally:
        conn.close()


async def timed(
    http: aiohttp.ClientSession, base: str, paths: Sequence[str]
) -> tuple[float, float, float, int]:
    """p50, p99 and max milliseconds of GETs of ``paths``, and the last answer's size."""
    times: list[float] = []
    size = 0
    for path in paths:
        t = time.perf_counter()
        async with http.get(base + path) as r:
            body = await r.read()
            if r.status != 200:
                raise SystemExit(f"{path}: HTTP {r.status}: {body[:300]!r}")
        times.append(time.perf_counter() - t)
        size = len(body)
    ms = [t * 1000 for t in times]
    return percentile(ms, 50), percentile(ms, 99), max(ms), size


async def write_cost(events: int) -> None:
    """Microseconds per event inserted at schema 6 and at schema 7."""
    with tempfile.TemporaryDirectory() as tmp:
        codec_store = Path(tmp) / "codec.db"

        conn = connect(codec_store, True, 1 << 40)
        try:
            rows = build_rows(load_codec(conn), 0, events, 1_000, 20_000)
        finally:
            conn.close()
        per = 32
        statement = insert_events_sql(per)
        flat = [[v for r in rows[i : i + per] for v in r] for i in range(0, len(rows), per)]
        flat = [chunk for chunk in flat if len(chunk) == per * len(rows[0])]
        results: dict[int, list[float]] = {6: [], 7: []}
        for attempt in range(RUNS):
            for version in (6, 7):
                path = Path(tmp) / f"v{version}-{attempt}.db"
                conn = sqlite3.connect(path, isolation_level=None)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = OFF")
                for migration in MIGRATIONS[:version]:
                    for sql in split_statements(migration):
                        conn.execute(sql)
                # CPU time: on a shared machine, wall time measures the neighbours.
                t = time.process_time()
                for chunk in flat:
                    conn.execute("BEGIN")
                    conn.execute(statement, chunk)
                    conn.execute("COMMIT")
                results[version].append((time.process_time() - t) / (len(flat) * per) * 1e6)
                conn.close()
        print(f"insert, 32 events a statement, no fsync, CPU ({RUNS} runs, alternating):")
        for version, us in results.items():
            print(f"  schema {version}: " + ", ".join(f"{u:.1f}" for u in us) + " us/event")
        ratio = [b / a for a, b in zip(results[6], results[7], strict=True)]
        print("  schema 7 / schema 6: " + ", ".join(f"{r:.2f}" for r in ratio))
        medians = {v: sorted(us)[len(us) // 2] for v, us in results.items()}
        ratio_of_medians = medians[7] / medians[6]
        print(f"  medians: {medians[6]:.1f} -> {medians[7]:.1f} us/event ({ratio_of_medians:.2f})")


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--hot", type=int, default=5_000)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--write-cost", action="store_true")
    args = parser.parse_args()
    if args.write_cost:
        await write_cost(min(args.events, 64_000))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or Path(tmp) / "audit.db"
        queue = await AuditQueue.open(path, max_bytes=1 << 40)
        try:
            spent = await fill(queue, path, args.events, args.users, args.patients)
            spent += fill_hot(queue, path, args.hot, 90)
            if spent:
                print(f"filled in {spent:.0f} s")
            with sqlite3.connect(path) as conn:
                (stored,) = conn.execute("SELECT SUM(COALESCE(fan, 1)) FROM events").fetchone()
            end = T0 + timedelta(seconds=args.events * STEP_S)
            window = [
                ("date", f"ge{(end - timedelta(days=90)).isoformat()}"),
                ("date", f"lt{end.isoformat()}"),
            ]
            period = urlencode(
                {"from": (end - timedelta(days=90)).isoformat(), "to": end.isoformat()}
            )
            rng = random.Random(30)
            n = args.queries

            def patient() -> str:
                return f"Patient/p{rng.randrange(args.patients)}"

            def user() -> str:
                return f"user-{rng.randrange(args.users)}"

            kinds = {
                "patient access report (one patient, 90 days)": [
                    f"/api/reports/patient-access?patient={patient()}&{period}" for _ in range(n)
                ],
                f"patient access report ({args.hot} events, 90 days)": [
                    f"/api/reports/patient-access?patient={HOT}&{period}"
                    for _ in range(max(n // 5, 2))
                ],
                "activity chart (whole store, 90 days)": [
                    "/api/activity?" + urlencode([*window, HIDE_ADMIN, ("tz", "Europe/Berlin")])
                    for _ in range(n)
                ],
                "activity chart (one user, 90 days)": [
                    "/api/activity?" + urlencode([*window, HIDE_ADMIN, ("agent", user())])
                    for _ in range(n)
                ],
                "activity chart (one patient, 90 days)": [
                    "/api/activity?" + urlencode([*window, HIDE_ADMIN, ("patient", patient())])
                    for _ in range(n)
                ],
                "user activity report (one user, 90 days)": [
                    f"/api/reports/user-activity?user={quote(user())}&{period}"
                    for _ in range(max(n // 5, 2))
                ],
                "events page with signals (50, newest, total)": [
                    "/fhir/AuditEvent?" + urlencode([HIDE_ADMIN, ("with-signals", "true")])
                    for _ in range(max(n // 5, 2))
                ],
            }
            app = build_admin_app(queue, AdminSettings(), writer=queue)
            server = TestServer(app, host="127.0.0.1", port=0)
            await server.start_server()
            try:
                async with aiohttp.ClientSession() as http:
                    base = str(server.make_url(""))
                    print(f"{stored} events stored")
                    print(f"{'query (over HTTP)':<48} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
                    worst = {"report": 0.0, "chart": 0.0}
                    for name, paths in kinds.items():
                        p50, p99, top, _ = await timed(http, base, paths)
                        print(f"{name:<48} {p50:8.1f} {p99:8.1f} {top:8.1f}")
                        if name.startswith("patient access report (one"):
                            worst["report"] = p99
                        if name.startswith("activity chart"):
                            worst["chart"] = max(worst["chart"], p99)
            finally:
                await server.close()
            print(
                "target: report p99 < 1000 ms",
                "met" if worst["report"] < 1000 else "NOT met",
                "; chart p99 < 500 ms",
                "met" if worst["chart"] < 500 else "NOT met",
            )
        finally:
            await queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
