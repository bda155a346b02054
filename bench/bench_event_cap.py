"""How long building the events of one huge request holds the event loop: a form
``POST Patient/_search`` with 10,000 ``_id`` values whose answer names 10,000 patients.

Each case builds the exchange's events and serializes them while a 1 ms ticker runs on the
same loop; the longest gap between its ticks is the stall an admin ``/healthz`` would see.
Cases: the default cap (``audit.max_patient_events`` 100) built in a worker thread, as the
proxy does for bodies over 256 KiB; the same inline; and the cap lifted, inline (one event
per patient, as before the cap).

    python bench/bench_event_cap.py [--patients 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import orjson
import uvloop

from proxy.audit.balp import AuditContext, build_events
from proxy.exchange import Exchange
from proxy.fhir.interaction import classify


def _exchange(n: int) -> Exchange:
    ids = [f"p{i}" for i in range(n)]
    form = urlencode([("_id", i) for i in ids]).encode()
    headers = {"content-type": "application/x-www-form-urlencoded"}
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ids],
    }
    ex = Exchange(
        request_id="bench-1",
        method="POST",
        path="Patient/_search",
        query_string="",
        request_headers=headers,
        client_address="127.0.0.1",
        started_at=datetime.now(UTC),
        base_url="http://127.0.0.1:8080/fhir",
        request_body=form,
        request_content_type=headers["content-type"],
        status=200,
        response_headers={"content-type": "application/fhir+json"},
        response_body=orjson.dumps(bundle),
    )
    ex.interaction = classify(ex.method, ex.path, "", headers, form)
    return ex


async def _stall_ms(n: int, ctx: AuditContext, in_thread: bool) -> tuple[float, int, int]:
    """The longest the loop went without running a 1 ms ticker while the events of one
    exchange were built and serialized, inline or (as the proxy does for large bodies)
    in a worker thread."""
    ex = _exchange(n)
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    def build() -> tuple[int, int]:
        built = build_events(ex, ctx, datetime.now(UTC))
        return len(built), sum(len(b.row.body) for b in built)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    events, size = await asyncio.to_thread(build) if in_thread else build()
    await asyncio.sleep(0.01)
    done = True
    await task
    return max(gaps) * 1000, events, size


async def _run(n: int, repeat: int) -> None:
    capped = AuditContext.default()
    uncapped = dataclasses.replace(capped, max_patient_events=10**9)
    cases = [
        ("capped, in a thread (the proxy)", capped, True),
        ("capped, inline", capped, False),
        ("uncapped, inline (before)", uncapped, False),
    ]
    print(f"{n} patients, loop stall = longest gap of a 1 ms ticker, best of {repeat}:")
    results = {}
    for name, ctx, in_thread in cases:
        runs = [await _stall_ms(n, ctx, in_thread) for _ in range(repeat)]
        stall, events, size = min(runs)
        results[name] = stall
        print(f"  {name:34s} {stall:8.1f} ms  {events:6d} events  {size / 1e6:7.2f} MB")
    base = results["uncapped, inline (before)"]
    print(f"  ratio before/proxy: {base / results['capped, in a thread (the proxy)']:.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    uvloop.run(_run(args.patients, args.repeat))


if __name__ == "__main__":
    main()
