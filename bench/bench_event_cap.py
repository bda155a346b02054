"""How long building the events of one huge request holds the event loop: a form
``POST Patient/_search`` with 10,000 ``_id`` values whose answer names 10,000 patients.

Both runs classify the request, build its events and serialize them (what the proxy does
on the loop before handing them to the store's writer thread), with the default cap
(``audit.max_patient_events`` 100) and with the cap lifted (one event per patient, as
before the cap). The loop cannot serve anything else meanwhile, so this is the stall an
admin ``/healthz`` would see.

    python bench/bench_event_cap.py [--patients 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import orjson

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


def _stall_ms(n: int, ctx: AuditContext, repeat: int) -> tuple[float, int, int]:
    best = float("inf")
    events = size = 0
    for _ in range(repeat):
        ex = _exchange(n)
        t0 = time.perf_counter()
        built = build_events(ex, ctx, datetime.now(UTC))
        size = sum(len(orjson.dumps(e)) for e in built)
        best = min(best, time.perf_counter() - t0)
        events = len(built)
    return best * 1000, events, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    capped = AuditContext.default()
    uncapped = dataclasses.replace(capped, max_patient_events=10**9)
    c_ms, c_events, c_bytes = _stall_ms(args.patients, capped, args.repeat)
    u_ms, u_events, u_bytes = _stall_ms(args.patients, uncapped, max(1, args.repeat // 2))
    print(f"{args.patients} patients, best of {args.repeat}:")
    print(
        f"  capped   (max_patient_events={capped.max_patient_events}): "
        f"{c_ms:8.1f} ms loop stall, {c_events:6d} events, {c_bytes / 1e6:8.2f} MB"
    )
    print(
        f"  uncapped (one event per patient):   "
        f"{u_ms:8.1f} ms loop stall, {u_events:6d} events, {u_bytes / 1e6:8.2f} MB"
    )
    print(f"  ratio uncapped/capped: {u_ms / c_ms:.1f}x time, {u_bytes / c_bytes:.1f}x bytes")


if __name__ == "__main__":
    main()
