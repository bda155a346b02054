"""The pure-Python benchmarks still run against the code as it is (they use its internals:
the builder's records, the store's insert), each with arguments small enough for the
suite. Their figures are read in bench/RESULTS.md, never asserted here."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parents[1]

RUNS = [
    ("bench_store.py", ["--writers", "8", "--seconds", "0.5", "--floor", "0"], "kept"),
    (
        "bench_search.py",
        ["--events", "2000", "--queries", "5", "--users", "10", "--patients", "50"],
        "target p99 < 100 ms",
    ),
    ("bench_event_cap.py", ["--patients", "200"], "ratio before/proxy"),
    (
        "bench_reports.py",
        ["--events", "2000", "--queries", "3", "--users", "10", "--patients", "50", "--hot", "100"],
        "target: report p99 < 1000 ms",
    ),
    ("bench_store_size.py", ["--count", "16"], "bytes per event"),
    ("bench_sinks.py", ["--events", "200", "--modes", "file,kafka"], "ratio to transaction"),
    ("bench_log.py", ["--commits", "8", "--repeat", "1", "--stored", "128"], "128 stored"),
    ("bench_rss.py", ["--wait", "2", "--no-jwks"], "MB  in all"),
]


@pytest.mark.parametrize(("script", "args", "says"), RUNS, ids=[r[0] for r in RUNS])
def test_a_benchmark_runs_to_its_report(script: str, args: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert says in done.stdout


def test_the_build_benchmark_measures_every_scenario() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_build.py"),
            "--measure-only",
            "--exchanges",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = orjson.loads(done.stdout)
    assert set(figures) == {"read", "search-7", "create"}
    assert all(us > 0 for us in figures.values())


async def test_the_rate_generator_keeps_its_schedule_and_counts_answers() -> None:
    """rate_load.py against a small server: every request of the window answered and
    counted, a non-2xx answer counted as such, latencies from the schedule."""
    answered: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        answered.append(request.method)
        return web.Response(status=404 if request.path == "/missing" else 200, text="{}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app)
    await server.start_server()
    try:
        for path, status_ok in (("/fhir/Patient/1", True), ("/missing", False)):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(ROOT / "bench" / "rate_load.py"),
                str(server.make_url(path)),
                "--rate",
                "200",
                "--seconds",
                "0.5",
                "--warmup",
                "0.1",
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0
            go, done, report = out.decode().splitlines()
            assert (go, done) == ("go", "done")
            figures = orjson.loads(report)
            assert figures["sent"] == figures["answered"] == 100
            assert figures["non2xx"] == (0 if status_ok else 100)
            assert figures["errors"] == figures["unanswered"] == 0
            assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["max"]
        assert len(answered) == 2 * 120  # warm-up included
    finally:
        await server.close()
