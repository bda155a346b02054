"""The pure-Python benchmarks still run against the code as it is (they use its internals:
the builder's records, the store's insert), each with arguments small enough for the
suite. Their figures are read in bench/RESULTS.md, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

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
