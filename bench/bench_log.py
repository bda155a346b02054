"""What the Merkle log costs the store's writer, and what a checkpoint costs.

Commits the same batches through the writer's transaction (:mod:`proxy.store.transaction`)
on one connection, with every step and without ``append leaves``, interleaved, and prints
the CPU time per event of each and their difference: PatientRead events in batches of 1, 8
and 64, and 7-patient fan-outs (one row, seven leaves), each into a new store and, with
``--stored N``, PatientReads in batches of 8 into a store already holding N events (what
the writer reads to find where the tree ends and to complete a tile must not grow with
the store). ``synchronous=OFF``: the disk's fsync is the same with and without the log and
is left out. Then the root of the tree as the checkpointer makes it, from the stored
tiles, at the size reached.

    python bench/bench_log.py [--commits 300] [--repeat 3] [--stored 50000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.exchange import Exchange
from proxy.fhir.interaction import classify
from proxy.store.database import connect, load_codec
from proxy.store.log import read_tree_head
from proxy.store.records import EventRow, FanOut
from proxy.store.transaction import STEPS, AppendLeaves, Committer, Step
from proxy.store.wire import Submission

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def _rows(path: str, query: str, response: dict[str, object]) -> list[EventRow | FanOut]:
    """The rows the builder makes for ``GET {path}?{query}`` answered with ``response``."""
    exchange = Exchange(
        request_id=str(uuid.uuid4()),
        method="GET",
        path=path,
        query_string=query,
        request_headers={"accept": "application/fhir+json", "user-agent": "bench"},
        client_address="10.0.0.7",
        started_at=NOW,
        base_url="http://fhir.example.org/fhir",
    )
    exchange.interaction = classify("GET", path, query, exchange.request_headers, None)
    exchange.status = 200
    exchange.response_body = orjson.dumps(response)
    exchange.response_headers = {"content-type": "application/fhir+json"}
    exchange.finished_at = NOW
    return store_rows(build_events(exchange, AuditContext.default(), NOW))


def read_rows() -> list[EventRow | FanOut]:
    """A PatientRead's row."""
    return _rows("Patient/1", "", {"resourceType": "Patient", "id": "1"})


def search_rows() -> list[EventRow | FanOut]:
    """A search answered with 7 patients' Observations: one fan-out row of 7 events."""
    entries = [
        {
            "resource": {
                "resourceType": "Observation",
                "id": f"o{i}",
                "status": "final",
                "subject": {"reference": f"Patient/p{i}"},
            }
        }
        for i in range(7)
    ]
    bundle: dict[str, object] = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    return _rows("Observation", "code=8867-4", bundle)


def batches(
    make: Callable[[], list[EventRow | FanOut]], per_commit: int, commits: int
) -> list[list[Submission]]:
    """``commits`` batches of ``per_commit`` submissions, each of new rows."""
    return [
        [
            Submission(rows=make(), complete_intent=None, intent=None, capture=None)
            for _ in range(per_commit)
        ]
        for _ in range(commits)
    ]


def cpu_per_event(
    steps: Sequence[type[Step]],
    work: list[list[Submission]],
    events: int,
    stored: Sequence[list[Submission]] = (),
) -> float:
    with tempfile.TemporaryDirectory() as d:
        conn = connect(Path(d) / "audit.db", True, 1 << 34)
        conn.execute("PRAGMA synchronous=OFF")
        committer = Committer(conn, load_codec(conn), max_bytes=1 << 34, steps=steps)
        for batch in stored:
            committer.commit_batch(batch)
        started = time.process_time()
        for batch in work:
            committer.commit_batch(batch)
        spent = time.process_time() - started
        conn.close()
    return spent / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stored", type=int, default=0)
    args = parser.parse_args()
    without = tuple(s for s in STEPS if s is not AppendLeaves)
    print("| batch | CPU µs/event without the log | with | added |")
    print("|---|---:|---:|---:|")
    for name, make, per_commit, fan in (
        ("PatientRead x1", read_rows, 1, 1),
        ("PatientRead x8", read_rows, 8, 1),
        ("PatientRead x64", read_rows, 64, 1),
        ("7-patient search x8", search_rows, 8, 7),
    ):
        commits = max(1, args.commits * 8 // per_commit // fan)
        work = batches(make, per_commit, commits)
        events = commits * per_commit * fan
        before, after = [], []
        for _ in range(args.repeat):
            before.append(cpu_per_event(without, work, events))
            after.append(cpu_per_event(STEPS, work, events))
        b, a = statistics.median(before), statistics.median(after)
        print(f"| {name} | {b:.1f} | {a:.1f} | {a - b:+.1f} |")
    if args.stored:
        stored = batches(read_rows, 64, args.stored // 64)
        commits = args.commits
        work = batches(read_rows, 8, commits)
        before, after = [], []
        for _ in range(args.repeat):
            before.append(cpu_per_event(without, work, commits * 8, stored))
            after.append(cpu_per_event(STEPS, work, commits * 8, stored))
        b, a = statistics.median(before), statistics.median(after)
        print(f"| PatientRead x8, {args.stored:,} stored | {b:.1f} | {a:.1f} | {a - b:+.1f} |")

    with tempfile.TemporaryDirectory() as d:
        conn = connect(Path(d) / "audit.db", True, 1 << 34)
        conn.execute("PRAGMA synchronous=OFF")
        committer = Committer(conn, load_codec(conn), max_bytes=1 << 34)
        for batch in batches(read_rows, 64, args.commits * 4):
            committer.commit_batch(batch)
        started = time.perf_counter()
        size, _ = read_tree_head(conn)
        spent = time.perf_counter() - started
        conn.close()
    print(f"\nroot of the tree of {size} leaves from its stored tiles: {spent * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
