"""Durable appends per second: the group-committing queue against one commit per event.

Both runs use the real store (SQLite, WAL, ``synchronous=FULL``, fsync on every commit) in
one process, on the same disk, with the same realistic BALP event (a PatientRead built by
``proxy.audit.balp``). The baseline is the same queue with ``commit_batch_max=1``: one
transaction and one fsync per append, which is what a store without group commit does.

    python bench/bench_store.py [--writers 64] [--seconds 5] [--floor 18000]

Prints appends/s for both, the ratio, events per commit, and whether the floor is kept
(18k/s with 64 writers: durable appends must not fall below it; the targets that count are
end to end, in bench_proxy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from proxy.audit.balp import AuditContext, build_events
from proxy.audit.ids import new_event_id
from proxy.exchange import Exchange
from proxy.fhir.interaction import classify
from proxy.store.queue import AuditQueue


def sample_event() -> dict[str, Any]:
    """A PatientRead event as the proxy builds it for ``GET Patient/1``."""
    now = datetime.now(UTC)
    exchange = Exchange(
        request_id="8f1c2a8e-5a7b-4a53-9b1e-0c0d7f6f2a11",
        method="GET",
        path="Patient/1",
        query_string="",
        request_headers={"accept": "application/fhir+json", "user-agent": "bench"},
        client_address="10.0.0.7",
        started_at=now,
        base_url="http://fhir.example.org/fhir",
    )
    exchange.interaction = classify("GET", "Patient/1", "", exchange.request_headers, None)
    exchange.status = 200
    exchange.response_body = (
        b'{"resourceType":"Patient","id":"1","meta":{"versionId":"3"},'
        b'"name":[{"family":"Chalmers","given":["Peter"]}]}'
    )
    exchange.response_headers = {"content-type": "application/fhir+json"}
    exchange.finished_at = now
    (built,) = build_events(exchange, AuditContext.default(), now)
    return built.event


async def run(
    path: Path, writers: int, seconds: float, batch_max: int
) -> tuple[float, float, float]:
    """Appends/s, events per commit, and milliseconds per commit for ``writers``
    concurrent appenders."""
    template = sample_event()
    queue = await AuditQueue.open(path, max_bytes=1 << 40, commit_batch_max=batch_max)
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            event = copy.copy(template)
            event["id"] = new_event_id()
            await queue.append([event])
            done += 1

    commits_before = queue.commits
    busy_before = queue.commit_seconds
    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    commits = max(queue.commits - commits_before, 1)
    busy = queue.commit_seconds - busy_before
    await queue.close()
    return done / elapsed, done / commits, busy / commits * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--floor", type=float, default=18_000)
    parser.add_argument("--dir", type=Path, default=None, help="where the store files go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-store-") as tmp:
        base, base_each, base_ms = uvloop.run(
            run(Path(tmp) / "baseline.db", args.writers, args.seconds, batch_max=1)
        )
        grouped, per_commit, grouped_ms = uvloop.run(
            run(Path(tmp) / "grouped.db", args.writers, args.seconds, batch_max=512)
        )
    where = args.dir or tempfile.gettempdir()
    print(f"writers: {args.writers}, {args.seconds:g}s each, store in {where}")
    print(
        f"one commit per append (baseline): {base:>9,.0f} appends/s"
        f" ({base_each:.1f}/commit, {base_ms:.2f} ms/commit)"
    )
    print(
        f"group commit (the queue):         {grouped:>9,.0f} appends/s"
        f" ({per_commit:.1f}/commit, {grouped_ms:.2f} ms/commit)"
    )
    print(f"ratio grouped/baseline:           {grouped / base:>9.1f}x")
    kept = grouped >= args.floor
    print(f"floor {args.floor:,.0f} appends/s: {'kept' if kept else 'NOT kept'}")
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())
