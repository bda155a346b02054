"""Admin search over a million stored events: p50/p99 for patient, agent and date-range
queries, first page and a page deep in the result (keyset cursor).

The store is the real one (migrations, triggers, zstd bodies), filled directly: each
event is built with its row by ``proxy.audit.balp.build_events`` for a ``GET
Observation/{n}`` by one of ``--users`` users about one of ``--patients`` patients, and
inserted with ``executemany`` in large transactions (the bench is about reading; a million
proxied requests would only measure the proxy). Queries go through
``AuditQueue.search_page``, the code the admin API runs, counting ``total``.

    python bench/bench_search.py [--events 1000000] [--queries 200] [--store PATH]

An existing ``--store`` with enough events is reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvloop

from proxy.audit.balp import AuditContext, build_events
from proxy.audit.identity import Identity
from proxy.exchange import Exchange
from proxy.fhir.interaction import classify
from proxy.store.codec import BodyCodec
from proxy.store.database import connect, load_codec
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery
from proxy.store.tables import insert_events_sql

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP_S = 2.0
"""Seconds between consecutive events: a million span about 23 days."""


def build_rows(
    codec: BodyCodec,
    start: int,
    count: int,
    users: int,
    patients: int,
    *,
    t0: datetime = T0,
    step_s: float = STEP_S,
    patient_name: str | None = None,
) -> list[tuple[object, ...]]:
    """Rows of events ``start`` to ``start + count``: event ``n`` recorded at ``t0 + n *
    step_s`` by ``user-{n % users}`` about ``Patient/p{n % patients}`` (or all about
    ``patient_name``)."""
    ctx = AuditContext.default()
    rows: list[tuple[object, ...]] = []
    for n in range(start, start + count):
        now = t0 + timedelta(seconds=n * step_s)
        patient = patient_name or f"Patient/p{n % patients}"
        exchange = Exchange(
            request_id=f"req-{n}",
            method="GET",
            path=f"Observation/o{n}",
            query_string="",
            request_headers={"accept": "application/fhir+json"},
            client_address=f"10.0.{n % 7}.{n % 250}",
            started_at=now,
            base_url="http://fhir.example.org/fhir",
            identity=Identity(token_kind="jwt", user_id=f"user-{n % users}", client_id="ehr"),
        )
        exchange.interaction = classify("GET", f"Observation/o{n}", "", {}, None)
        exchange.status = 200
        exchange.response_body = (
            b'{"resourceType":"Observation","id":"o%d","status":"final",'
            b'"code":{"text":"x"},"subject":{"reference":"%s"}}' % (n, patient.encode())
        )
        exchange.finished_at = now
        for built in build_events(exchange, ctx, now):
            # The writer process compresses bodies at commit; this fill bypasses it.
            row = built.row
            (body,) = codec.compress_many([row.body])
            # seq and fan: SQLite's; no leaf (rows outside the log, as if older than it).
            rows.append((None, None, None, None, *row._replace(body=body)))
    return rows


async def fill(queue: AuditQueue, path: Path, total: int, users: int, patients: int) -> float:
    existing = (await queue.stats()).pending
    if existing >= total:
        return 0.0
    conn = connect(path, False, 1 << 40)  # a writer of its own, beside the queue's
    codec = load_codec(conn)
    t = time.perf_counter()
    chunk = 20_000
    for start in range(existing, total, chunk):
        rows = build_rows(codec, start, min(chunk, total - start), users, patients)
        conn.execute("BEGIN")
        conn.executemany(insert_events_sql(1), rows)
        conn.execute("COMMIT")
        print(f"  {start + len(rows):>9} events", end="\r", file=sys.stderr, flush=True)
    conn.close()
    print(file=sys.stderr)
    return time.perf_counter() - t


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(queue: AuditQueue, queries: list[EventQuery]) -> tuple[float, float, float]:
    times: list[float] = []
    deep: list[float] = []
    for query in queries:
        t = time.perf_counter()
        page = await queue.search_page(query)
        times.append(time.perf_counter() - t)
        if page.more_after and page.items:
            cursor = page.cursor_of(page.items[-1], query.sort)
            for _ in range(3):  # three pages on, as someone paging back in time
                nxt = dataclasses.replace(query, after=cursor)
                t = time.perf_counter()
                page = await queue.search_page(nxt)
                deep.append(time.perf_counter() - t)
                if not page.items:
                    break
                cursor = page.cursor_of(page.items[-1], query.sort)
    both = times + deep
    return percentile(both, 50) * 1000, percentile(both, 99) * 1000, max(both) * 1000


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or Path(tmp) / "audit.db"
        queue = await AuditQueue.open(path, max_bytes=1 << 40)
        try:
            spent = await fill(queue, path, args.events, args.users, args.patients)
            if spent:
                print(f"filled {args.events} events in {spent:.0f} s")
            rng = random.Random(14)
            span = args.events * STEP_S
            kinds = {
                "patient": [
                    EventQuery(patient=f"Patient/p{rng.randrange(args.patients)}")
                    for _ in range(args.queries)
                ],
                "agent": [
                    EventQuery(agent=f"user-{rng.randrange(args.users)}")
                    for _ in range(args.queries)
                ],
                "date range (1 h)": [
                    EventQuery(
                        date_from=(start := T0 + timedelta(seconds=rng.uniform(0, span))),
                        date_to=start + timedelta(hours=1),
                    )
                    for _ in range(args.queries)
                ],
                "date range (1 day)": [
                    EventQuery(
                        date_from=(start := T0 + timedelta(seconds=rng.uniform(0, span))),
                        date_to=start + timedelta(days=1),
                    )
                    for _ in range(args.queries)
                ],
                "agent + date (1 day)": [
                    EventQuery(
                        agent=f"user-{rng.randrange(args.users)}",
                        date_from=(start := T0 + timedelta(seconds=rng.uniform(0, span))),
                        date_to=start + timedelta(days=1),
                    )
                    for _ in range(args.queries)
                ],
                "no filter": [EventQuery() for _ in range(args.queries // 4)],
            }
            print(
                f"{'query (50 per page, total counted)':<36}"
                f" {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
            )
            worst = 0.0
            for name, queries in kinds.items():
                p50, p99, top = await measure(queue, queries)
                worst = max(worst, p99) if name != "no filter" else worst
                print(f"{name:<36} {p50:8.2f} {p99:8.2f} {top:8.2f}")
            print(
                "target p99 < 100 ms for patient, agent, date range:",
                "met" if worst < 100 else "NOT met",
            )
        finally:
            await queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
