"""Building the audit of one exchange: microseconds of Python per exchange for a read, a
search whose Bundle names 7 patients (7 events) and a create, from the finished exchange
to the rows the store writes (events, their JSON, their index columns), against the same
work done by the code of a baseline revision in the same run.

    python bench/bench_build.py [--baseline main] [--exchanges 2000] [--rounds 5]

The baseline's ``proxy`` package is taken from ``git archive`` of that revision and run in
a child process; rounds alternate between the two, and the best round of each is kept
(the machine is shared: the minimum is the figure least disturbed by others, and the
time is the process's CPU time, not the wall clock's). A revision whose builder returns
dicts is given the rows by the store's ``event_row``, as its request path did. The
baseline is its pure-Python source; this tree runs as built (compiled modules included).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
TOKEN_CLAIMS = {"sub": "dr-who", "name": "Dr Who", "client_id": "ehr", "jti": "j-1"}


def _search_bundle() -> bytes:
    """10 Observations about 7 patients, as ``GET Observation?code=...`` answers."""
    entries = [
        {
            "fullUrl": f"http://fhir.example.org/fhir/Observation/o{n}",
            "resource": {
                "resourceType": "Observation",
                "id": f"o{n}",
                "meta": {"versionId": "1"},
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": f"Patient/p{n % 7}"},
                "valueQuantity": {"value": 60 + n, "unit": "/min"},
            },
            "search": {"mode": "match"},
        }
        for n in range(10)
    ]
    return orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries})


OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": 61, "unit": "/min"},
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "read": {
        "method": "GET",
        "path": "Patient/1",
        "query": "",
        "body": None,
        "status": 200,
        "response": orjson.dumps(
            {"resourceType": "Patient", "id": "1", "meta": {"versionId": "3"}, "active": True}
        ),
        "response_headers": {"content-type": "application/fhir+json"},
    },
    "search-7": {
        "method": "GET",
        "path": "Observation",
        "query": "code=8867-4&_count=10",
        "body": None,
        "status": 200,
        "response": _search_bundle(),
        "response_headers": {"content-type": "application/fhir+json"},
    },
    "create": {
        "method": "POST",
        "path": "Observation",
        "query": "",
        "body": orjson.dumps(OBSERVATION),
        "status": 201,
        "response": orjson.dumps({**OBSERVATION, "id": "new", "meta": {"versionId": "1"}}),
        "response_headers": {
            "content-type": "application/fhir+json",
            "location": "http://fhir.example.org/fhir/Observation/new/_history/1",
        },
    },
}


def _token() -> str:
    import base64

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(TOKEN_CLAIMS)}.c2ln"


def measure(exchanges: int) -> dict[str, float]:
    """Microseconds per exchange for each scenario, with the ``proxy`` on ``sys.path``."""
    from proxy.audit import balp
    from proxy.audit.identity import identity_from_headers
    from proxy.exchange import Exchange
    from proxy.fhir.interaction import classify
    from proxy.settings import IdentitySettings

    ctx = balp.AuditContext.default()
    identity_settings = IdentitySettings()
    build: Callable[[Any, Any, datetime], list[Any]] = balp.build_events
    if hasattr(balp, "store_rows"):  # events of several patients handed over as one

        def rows_of(ex: Any, now: datetime) -> list[Any]:
            return balp.store_rows(build(ex, ctx, now))  # type: ignore[no-any-return]

    elif hasattr(balp, "BuiltEvent"):

        def rows_of(ex: Any, now: datetime) -> list[Any]:
            return [built.row for built in build(ex, ctx, now)]

    else:
        try:
            from proxy.store.index import event_row
        except ImportError:  # a revision from before the store's index module
            from proxy.store.queue import event_row  # type: ignore[attr-defined]

        def rows_of(ex: Any, now: datetime) -> list[Any]:
            return [event_row(event) for event in build(ex, ctx, now)]

    started = datetime(2026, 1, 1, tzinfo=UTC)
    finished = started + timedelta(milliseconds=3)
    headers = {"accept": "application/fhir+json", "authorization": f"Bearer {_token()}"}
    results: dict[str, float] = {}
    for name, s in SCENARIOS.items():
        todo = []
        for n in range(exchanges):
            request_headers = dict(headers)
            if s["body"] is not None:
                request_headers["content-type"] = "application/fhir+json"
            ex = Exchange(
                request_id=f"req-{n}",
                method=s["method"],
                path=s["path"],
                query_string=s["query"],
                request_headers=request_headers,
                client_address="10.0.0.7",
                started_at=started,
                base_url="http://fhir.example.org/fhir",
                request_body=s["body"],
                status=s["status"],
                response_headers=s["response_headers"],
                response_body=s["response"],
                finished_at=finished,
            )
            ex.interaction = classify(s["method"], s["path"], s["query"], request_headers, None)
            ex.identity = identity_from_headers(request_headers, identity_settings, None)
            todo.append(ex)
        # The collector off while timing: its passes depend on what else is alive (here
        # thousands of prepared exchanges), not on the builder.
        gc.collect()
        gc.disable()
        try:
            # CPU time of this process, not wall time: on a shared machine the wall clock
            # also counts the time spent waiting for a core.
            t0 = time.process_time()
            for ex in todo:
                rows_of(ex, finished)
            results[name] = (time.process_time() - t0) / exchanges * 1e6
        finally:
            gc.enable()
    return results


def _baseline_tree(revision: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "proxy"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--exchanges", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_only:  # the child: the proxy package on PYTHONPATH
        print(orjson.dumps(measure(args.exchanges)).decode())
        return 0
    sys.path.insert(0, str(REPO))
    best_now: dict[str, float] = {}
    best_then: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        _baseline_tree(args.baseline, Path(tmp))
        child = [sys.executable, __file__, "--measure-only", "--exchanges", str(args.exchanges)]
        env = {**os.environ, "PYTHONPATH": tmp}
        for _ in range(args.rounds):
            then = orjson.loads(
                subprocess.run(child, env=env, check=True, capture_output=True).stdout
            )
            now = measure(args.exchanges)
            for name in SCENARIOS:
                best_then[name] = min(best_then.get(name, float("inf")), then[name])
                best_now[name] = min(best_now.get(name, float("inf")), now[name])
    print(f"{'exchange':<10} {args.baseline + ' us':>12} {'this tree us':>14} {'ratio':>7}")
    for name in SCENARIOS:
        ratio = best_now[name] / best_then[name]
        print(f"{name:<10} {best_then[name]:>12.1f} {best_now[name]:>14.1f} {ratio:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
