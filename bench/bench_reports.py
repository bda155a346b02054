"""The privacy reports and the activity chart over a million stored events: p50/p99 of
the admin API's answers, over HTTP, as the viewer asks for them.

The store is ``bench_search.py``'s (1,000,000 events: ``GET Observation`` by one of 1,000
users about one of 20,000 patients, two seconds apart, about 23 days), plus a busy
patient: ``--hot`` more events about ``Patient/hot`` by 300 users spread over 90 days.
Each query goes to a real admin listener (``build_admin_app`` on aiohttp) in a process
of its own, so the figures include the signals, the JSON and the access record each
report writes (one durable append), and the CPU that process (and its store's writer)
spent per query is measured beside the time. Every query asks for the 90 days up to the
end of the stored events.

    python bench/bench_reports.py [--events 1000000] [--queries 100] [--store PATH]
                                  [--before DIR]
    python bench/bench_reports.py --write-cost [--events 32000]

An existing ``--store`` with enough events is reused (``bench_search.py --store`` makes
one). ``--before DIR`` runs a second admin listener from another source tree (say ``git
archive main | tar -x -C DIR``) side by side, over a store that tree filled
(``PATH.before``, made if missing), each query asked of both in turn; a ``--store`` that
does not exist yet is then that store copied and opened by this tree (its migrations
timed). ``--write-cost`` measures instead what the newest schema's tables and columns
cost the writer: the same events inserted 32 to a statement, without fsync, into a store
at the schema before it and one at it, alternately, five times each (medians compared).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import uvloop
from bench_proxy import cpu_seconds
from bench_search import STEP_S, T0, build_rows, fill, percentile

from proxy.store.database import connect, load_codec
from proxy.store.queue import AuditQueue
from proxy.store.schema import MIGRATIONS, SCHEMA_VERSION, split_statements
from proxy.store.tables import INSERTED, insert_events_sql

ROOT = Path(__file__).resolve().parent.parent

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
        conn.executemany(insert_events_sql(1), [(None, None, None, None, *r[4:]) for r in rows])
        conn.execute("COMMIT")
        return time.perf_counter() - t
    finally:
        conn.close()


async def write_cost(events: int) -> None:
    """Microseconds per event inserted at the schema before the newest and at the newest."""
    old, new = SCHEMA_VERSION - 1, SCHEMA_VERSION
    with tempfile.TemporaryDirectory() as tmp:
        codec_store = Path(tmp) / "codec.db"

        conn = connect(codec_store, True, 1 << 40)
        try:
            rows = build_rows(load_codec(conn), 0, events, 1_000, 20_000)
        finally:
            conn.close()
        per = 32
        results: dict[int, list[float]] = {old: [], new: []}
        for attempt in range(RUNS):
            for version in (old, new):
                path = Path(tmp) / f"v{version}-{attempt}.db"
                conn = sqlite3.connect(path, isolation_level=None)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = OFF")
                for migration in MIGRATIONS[:version]:
                    for sql in split_statements(migration):
                        conn.execute(sql)
                # The columns this schema has, of those a row is inserted with.
                have = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
                kept = [i for i, name in enumerate(INSERTED) if name in have]
                names = ", ".join(INSERTED[i] for i in kept)
                row = "(" + ", ".join("?" * len(kept)) + ")"
                statement = f"INSERT INTO events ({names}) VALUES {', '.join([row] * per)}"
                flat = [
                    [r[i] for r in rows[start : start + per] for i in kept]
                    for start in range(0, len(rows) - per + 1, per)
                ]
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
        ratio = [b / a for a, b in zip(results[old], results[new], strict=True)]
        print(f"  schema {new} / schema {old}: " + ", ".join(f"{r:.2f}" for r in ratio))
        medians = {v: sorted(us)[len(us) // 2] for v, us in results.items()}
        ratio_of_medians = medians[new] / medians[old]
        print(
            f"  medians: {medians[old]:.1f} -> {medians[new]:.1f} us/event ({ratio_of_medians:.2f})"
        )


SERVE = """
import asyncio, sys
from pathlib import Path
import uvloop
from aiohttp import web
from proxy.admin.app import build_admin_app
from proxy.settings import AdminSettings
from proxy.store.queue import AuditQueue

async def main():
    queue = await AuditQueue.open(Path(sys.argv[1]), max_bytes=1 << 40)
    runner = web.AppRunner(build_admin_app(queue, AdminSettings(), writer=queue))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    print(f"http://{host}:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()
    await queue.close()

uvloop.run(main())
"""
"""An admin listener over the store ``argv[1]``, from whichever source tree is on the
path: it prints its URL, and stops when its stdin closes."""

FILL = """
import sys
import uvloop
sys.path.insert(0, "bench")
from pathlib import Path
from bench_reports import fill_hot
from bench_search import fill
from proxy.store.queue import AuditQueue

async def main():
    path = Path(sys.argv[1])
    events, users, patients, hot = map(int, sys.argv[2:])
    queue = await AuditQueue.open(path, max_bytes=1 << 40)
    try:
        spent = await fill(queue, path, events, users, patients)
        spent += fill_hot(queue, path, hot, 90)
    finally:
        await queue.close()
    print(f"{spent:.0f}", flush=True)

uvloop.run(main())
"""
"""The benchmark's store filled by whichever source tree is on the path (its schema):
``argv[1:]`` the path, events, users, patients and busy patient's events."""


@dataclass
class Listener:
    """An admin listener in a process of its own."""

    url: str
    process: subprocess.Popen[str]

    @classmethod
    def start(cls, tree: Path, store: Path) -> Listener:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(store)],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        return cls(process.stdout.readline().strip(), process)

    def cpu_seconds(self) -> float:
        """User and system CPU time so far of the listener and its store's writer."""
        return cpu_seconds([self.process.pid])

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(60)


@dataclass
class Figures:
    """One query kind on one listener."""

    times_ms: list[float]
    cpu_ms: float
    """CPU per query, the listener's and its writer's."""

    def row(self) -> str:
        ms = self.times_ms
        return (
            f"{percentile(ms, 50):8.1f} {percentile(ms, 99):8.1f} {max(ms):8.1f} {self.cpu_ms:8.1f}"
        )


async def measure(
    http: aiohttp.ClientSession, listeners: dict[str, Listener], paths: Sequence[str]
) -> dict[str, Figures]:
    """Each of ``paths`` asked of each listener in turn: the times and the CPU spent."""
    times: dict[str, list[float]] = {name: [] for name in listeners}
    spent = {name: 0.0 for name in listeners}
    for path in paths:
        for name, listener in listeners.items():
            cpu = listener.cpu_seconds()
            t = time.perf_counter()
            async with http.get(listener.url + path) as r:
                body = await r.read()
                if r.status != 200:
                    raise SystemExit(f"{name} {path}: HTTP {r.status}: {body[:300]!r}")
            times[name].append((time.perf_counter() - t) * 1000)
            spent[name] += listener.cpu_seconds() - cpu
    return {name: Figures(times[name], spent[name] / len(paths) * 1000) for name in listeners}


def stored_events(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (stored,) = conn.execute("SELECT COALESCE(SUM(COALESCE(fan, 1)), 0) FROM events").fetchone()
    return int(stored)


async def fill_here(args: argparse.Namespace, path: Path) -> None:
    """The store filled by this tree."""
    queue = await AuditQueue.open(path, max_bytes=1 << 40)
    try:
        spent = await fill(queue, path, args.events, args.users, args.patients)
        spent += fill_hot(queue, path, args.hot, 90)
    finally:
        await queue.close()
    if spent:
        print(f"filled in {spent:.0f} s")


def fill_before(args: argparse.Namespace, path: Path) -> Path:
    """The store the ``--before`` tree filled (``path`` with ``.before``); ``path``, when
    missing, made a copy of it and migrated by this tree."""
    before = path.with_name(path.name + ".before")
    fill_args = [str(v) for v in (args.events, args.users, args.patients, args.hot)]
    filled = subprocess.run(
        [sys.executable, "-c", FILL, str(before), *fill_args],
        cwd=args.before,
        env={**os.environ, "PYTHONPATH": str(args.before)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if filled != "0":
        print(f"'before' store filled by {args.before} in {filled} s")
    if not path.exists():
        shutil.copyfile(before, path)
        t = time.perf_counter()
        connect(path, True, 1 << 40).close()
        print(f"its copy migrated to schema {SCHEMA_VERSION} in {time.perf_counter() - t:.0f} s")
    return before


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--hot", type=int, default=5_000)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument(
        "--before",
        type=Path,
        help="a source tree of an earlier fhir-audit-proxy to measure side by side",
    )
    parser.add_argument("--write-cost", action="store_true")
    args = parser.parse_args()
    if args.write_cost:
        await write_cost(min(args.events, 64_000))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or Path(tmp) / "audit.db"
        before = fill_before(args, path) if args.before is not None else None
        if before is None:
            await fill_here(args, path)
        end = T0 + timedelta(seconds=args.events * STEP_S)
        window = [
            ("date", f"ge{(end - timedelta(days=90)).isoformat()}"),
            ("date", f"lt{end.isoformat()}"),
        ]
        period = urlencode({"from": (end - timedelta(days=90)).isoformat(), "to": end.isoformat()})
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
                f"/api/reports/patient-access?patient={HOT}&{period}" for _ in range(max(n // 5, 2))
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
        listeners = {"this tree": Listener.start(ROOT, path)}
        if before is not None:
            listeners = {"before": Listener.start(args.before, before), **listeners}
        try:
            async with aiohttp.ClientSession() as http:
                print(f"{stored_events(path)} events stored; load average {load_average()}")
                print(
                    f"{'query (over HTTP)':<48} {'':<10}"
                    f" {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU ms':>8}"
                )
                worst = {"report": 0.0, "chart": 0.0}
                for name, paths in kinds.items():
                    figures = await measure(http, listeners, paths)
                    for who, measured in figures.items():
                        print(f"{name:<48} {who:<10} {measured.row()}")
                        name = ""
                    if before is not None:
                        old, new = figures["before"], figures["this tree"]
                        ratio = percentile(old.times_ms, 50) / percentile(new.times_ms, 50)
                        # CPU is counted in clock ticks: no ratio of a tick or less.
                        tick_ms = 1000 / os.sysconf("SC_CLK_TCK") / len(paths)
                        cpu = (
                            f"{old.cpu_ms / new.cpu_ms:8.1f}"
                            if min(old.cpu_ms, new.cpu_ms) > tick_ms
                            else f"{'-':>8}"
                        )
                        print(
                            f"{'':<48} {'before/now':<10} {ratio:8.1f}"
                            f" {percentile(old.times_ms, 99) / percentile(new.times_ms, 99):8.1f}"
                            f" {'':>8} {cpu}"
                        )
                    ours = figures["this tree"]
                    p99 = percentile(ours.times_ms, 99)
                    if paths[0].startswith("/api/reports/patient-access"):
                        worst["report"] = max(worst["report"], p99)
                    if paths[0].startswith("/api/activity"):
                        worst["chart"] = max(worst["chart"], p99)
                print(f"load average {load_average()}")
        finally:
            for listener in listeners.values():
                listener.stop()
        print(
            "target: report p99 < 1000 ms",
            "met" if worst["report"] < 1000 else "NOT met",
            "; chart p99 < 500 ms",
            "met" if worst["chart"] < 500 else "NOT met",
        )
    return 0


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
