"""What the proxy costs at a sidecar's load: CPU per request, added latency and memory at a
fixed, evenly spaced request rate, against calling the upstream directly and against a
bare aiohttp pass-through, in one run.

    python bench/bench_rate.py [--rate 1000] [--seconds 10] [--warmup 2] [--repeat 3]
                               [--requests read search create] [--before DIR]
                               [--tree NAME=DIR ...] [--no-bare] [--profile DIR]
                               [--store-dir DIR]

The upstream is nginx serving canned FHIR JSON (``bench_proxy.py``'s); the load is
``rate_load.py`` in a process of its own (open loop, evenly spaced, latency from each
request's scheduled instant). Three requests: ``GET Patient/1`` (one event), ``GET
Observation?patient=1`` answering 10 Observations of 7 patients (7 events) and ``POST
Observation`` (an intent before forwarding, the event after). Each goes, in turn, to
nginx directly (the latency baseline), to the bare pass-through (``plain_proxy.py``), to
fhir-audit-proxy and, with ``--before DIR``, to a second fhir-audit-proxy run from
another source tree (``git archive REV proxy | tar -x -C DIR``; ``--tree NAME=DIR`` for
more, each under its name); ``--repeat N`` runs the whole round N times, interleaved,
and reports medians.

For each target it reads, between the generator's ``go`` and ``done``, the user and
system CPU time of every process of the target (the process, its threads, its workers
and its store's writer: the whole process tree, from ``/proc/PID/stat``), and samples
their resident memory; ``vCPU per 1000 req/s`` is CPU seconds per 1000 requests
answered. Memory is summed ``VmRSS`` of the tree (pages shared between processes counted
in each) and summed ``Pss`` (shared pages divided among their users). Beside the runs it
measures the store directory's disk: a 4 KiB append with ``fdatasync``, and a one-row
SQLite commit in WAL mode with ``synchronous=FULL``, the floor of any durable write.

``--profile DIR`` then runs each request once more against fhir-audit-proxy with
``py-spy record`` on every process of the proxy (``pip install py-spy``), writing
collapsed stacks to DIR (not counted in the figures: py-spy stops the process to sample).

Needs Debian's ``nginx`` (``apt-get install nginx-light``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench_proxy import (
    CREATED,
    NGINX_CONF,
    PATIENT,
    free_port,
    load_average,
    observation,
    proxy_config,
    running,
    searchset,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent
LOAD = ROOT / "bench" / "rate_load.py"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Request:
    name: str
    label: str
    path: str
    method: str = "GET"
    body: bytes | None = None


REQUESTS = {
    "read": Request("read", "GET Patient/1", "/fhir/Patient/1"),
    "search": Request(
        "search", "GET Observation?patient=1 (7 patients)", "/fhir/Observation?patient=1"
    ),
    "create": Request(
        "create",
        "POST Observation",
        "/fhir/Observation",
        "POST",
        json.dumps(observation(0, 1)).encode(),
    ),
}


# --- the process tree ------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (children of any of their threads)."""
    out = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                for child in children:
                    out += tree(int(child))
    return out


def role(pid: int, root: int) -> str:
    """What a process of the tree is: the one started, a store writer, or a worker."""
    if pid == root:
        return "main"
    with contextlib.suppress(OSError):
        if b"writer_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return "writer"
    return "worker"


def cpu_by_role(root: int) -> dict[str, tuple[float, float]]:
    """User and system CPU seconds so far of every process of ``root``'s tree (each
    process's own, all its threads), summed by :func:`role`."""
    out: dict[str, tuple[float, float]] = {}
    for pid in tree(root):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
            key = role(pid, root)
            u, s = out.get(key, (0.0, 0.0))
            out[key] = (u + user, s + system)
    return out


def memory_mb(root: int) -> tuple[float, float]:
    """Summed ``VmRSS`` and summed ``Pss`` of ``root``'s tree, in MB."""
    rss = pss = 0
    for pid in tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def commit_counters(admin: int) -> tuple[float, float]:
    """The proxy's group commits so far and the seconds they took (its admin
    ``/metrics``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("fhir_audit_store_commit_seconds_count", "fhir_audit_store_commit_seconds_sum"):
            values[name] = float(value)
    return (
        values.get("fhir_audit_store_commit_seconds_count", 0.0),
        values.get("fhir_audit_store_commit_seconds_sum", 0.0),
    )


# --- one measurement -------------------------------------------------------------------


@dataclass
class Run:
    """One request kind against one target, over the generator's window."""

    latency_ms: dict[str, float]
    send_lag_ms: dict[str, float]
    answered: int
    non2xx: int
    errors: int
    window_s: float
    cpu: dict[str, tuple[float, float]]
    """CPU seconds (user, system) spent in the window, by role."""
    rss_mb: float
    pss_mb: float
    generator_cpu_share: float
    commits: float = float("nan")
    """Group commits the proxy made in the window (NaN: not a proxy)."""
    commit_s: float = float("nan")
    """Seconds its writer spent in them."""

    def vcpu_per_krps(self, key: str | None = None) -> float:
        """CPU seconds per 1000 requests answered (of ``key``'s processes, or all)."""
        spent = sum(u + s for k, (u, s) in self.cpu.items() if key in (None, k))
        return spent / self.answered * 1000 if self.answered else float("nan")


def measure(
    url: str,
    req: Request,
    pid: int | None,
    args: argparse.Namespace,
    body_file: Path | None,
    admin: int | None = None,
) -> Run:
    cmd = [
        sys.executable,
        str(LOAD),
        url,
        "--rate",
        str(args.rate),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--method",
        req.method,
        "--header",
        "Accept: application/fhir+json",
    ]
    if body_file is not None:
        cmd += ["--body", str(body_file), "--header", "Content-Type: application/fhir+json"]
    peak = [0.0, 0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            if pid is not None:
                rss, pss = memory_mb(pid)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as gen:
        assert gen.stdout is not None
        line = gen.stdout.readline().strip()
        if line != "go":
            raise SystemExit(f"the load generator said {line!r}")
        before = cpu_by_role(pid) if pid is not None else {}
        commits_before = commit_counters(admin) if admin is not None else (0.0, 0.0)
        t0 = time.monotonic()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            line = gen.stdout.readline().strip()
        finally:
            stop.set()
            sampler.join()
        after = cpu_by_role(pid) if pid is not None else {}
        window = time.monotonic() - t0
        commits_after = (
            commit_counters(admin) if admin is not None else (float("nan"), float("nan"))
        )
        result = json.loads(gen.stdout.readline())
    cpu = {
        k: (u - before.get(k, (0.0, 0.0))[0], s - before.get(k, (0.0, 0.0))[1])
        for k, (u, s) in after.items()
    }
    return Run(
        latency_ms=result["latency_ms"],
        send_lag_ms=result["send_lag_ms"],
        answered=result["answered"],
        non2xx=result["non2xx"],
        errors=result["errors"] + result["unanswered"],
        window_s=window,
        cpu=cpu,
        rss_mb=peak[0],
        pss_mb=peak[1],
        generator_cpu_share=result["generator_cpu_share"],
        commits=commits_after[0] - commits_before[0],
        commit_s=commits_after[1] - commits_before[1],
    )


@dataclass
class Target:
    name: str
    port: int
    pid: int | None
    """The process whose tree is measured (None: nginx, whose CPU is not the question)."""
    admin: int | None = None
    """A fhir-audit-proxy's admin port (its commit counters)."""
    runs: dict[str, list[Run]] = field(default_factory=dict)
    rest_mb: tuple[float, float] = (0.0, 0.0)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the disk's floor ------------------------------------------------------------------


def fsync_floor(directory: Path, n: int = 400) -> dict[str, dict[str, float]]:
    """Latency of a 4 KiB append + ``fdatasync`` and of a one-row SQLite WAL commit
    (``synchronous=FULL``) in ``directory``, and the CPU that commit takes (this thread's,
    user and system: the floor of what a durable write per request costs): p50/p90/p99
    in ms."""

    def pct(values: list[float]) -> dict[str, float]:
        values.sort()
        return {
            p: values[min(len(values) - 1, int(len(values) * q))] * 1e3
            for p, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        }

    path = directory / "fsync.probe"
    raw: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"x" * 4096
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            raw.append(time.perf_counter() - t0)
            time.sleep(0.001)
    finally:
        os.close(fd)
        path.unlink()
    db = directory / "fsync.db"
    conn = sqlite3.connect(db, isolation_level=None)
    commits: list[float] = []
    commit_cpu: list[float] = []
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        row = b"y" * 300
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.thread_time()
            conn.execute("INSERT INTO t (body) VALUES (?)", (row,))
            commits.append(time.perf_counter() - t0)
            commit_cpu.append(time.thread_time() - c0)
            time.sleep(0.001)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(db) + suffix).unlink()
    return {
        "fdatasync 4 KiB": pct(raw),
        "SQLite WAL commit, 1 row": pct(commits),
        "its CPU": pct(commit_cpu),
    }


# --- running it ------------------------------------------------------------------------


@contextlib.contextmanager
def upstream(d: Path, port: int) -> Iterator[None]:
    www = d / "www"
    (www / "Patient").mkdir(parents=True)
    (www / "Patient" / "1").write_text(json.dumps(PATIENT))
    (www / "Observation").write_text(json.dumps(searchset(10, 7)))
    (www / "metadata").write_text(json.dumps({"resourceType": "CapabilityStatement"}))
    (d / "nginx.conf").write_text(
        NGINX_CONF.format(dir=d, upstream=port, created=json.dumps(CREATED))
    )
    with running(["nginx", "-c", str(d / "nginx.conf")]):
        wait_http(f"http://127.0.0.1:{port}/fhir/Patient/1")
        yield


def profile(
    targets: list[Target], chosen: list[Request], args: argparse.Namespace, d: Path
) -> None:
    """Each request once more against fhir-audit-proxy under ``py-spy record`` (Python
    stacks, sampled by wall clock: a thread waiting for a core is sampled where it
    waits) and, where Linux ``perf`` is installed, once under ``perf record -e
    cpu-clock`` (on-CPU samples only: the kernel, the interpreter, the C extensions)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    perf = shutil.which("perf")
    args.profile.mkdir(parents=True, exist_ok=True)
    proxy = next(t for t in targets if t.name == "fhir-audit-proxy")
    assert proxy.pid is not None
    duration = str(int(args.warmup + args.seconds + 2))
    for req in chosen:
        body_file = d / f"{req.name}.body" if req.body is not None else None
        url = f"http://127.0.0.1:{proxy.port}{req.path}"
        recorders = {
            # py-spy writes its stacks when its --duration ends (not when signalled).
            f"{req.name}.txt": [
                spy,
                "record",
                "--pid",
                str(proxy.pid),
                "--subprocesses",
                "--rate",
                "250",
                "--duration",
                duration,
                "--format",
                "raw",
                "--output",
                str(args.profile / f"{req.name}.txt"),
            ]
        }
        if perf is not None:
            pids = ",".join(map(str, tree(proxy.pid)))
            recorders[f"{req.name}.perf.data"] = [
                perf,
                "record",
                "--quiet",
                "-e",
                "cpu-clock",
                "-F",
                "997",
                "-g",
                "-p",
                pids,
                "-o",
                str(args.profile / f"{req.name}.perf.data"),
                "--",
                "sleep",
                duration,
            ]
        for out, cmd in recorders.items():
            recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)
                measure(url, req, None, args, body_file)
                recorder.wait(timeout=120)
            finally:
                if recorder.poll() is None:
                    recorder.kill()
                    recorder.wait()
            print(f"profile of {req.name}: {args.profile / out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--requests", nargs="+", default=list(REQUESTS), choices=list(REQUESTS))
    parser.add_argument("--before", type=Path, help="a source tree to run as 'before'")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another source tree to run beside (repeatable), compared as 'before' is",
    )
    parser.add_argument("--no-bare", action="store_true", help="skip the bare pass-through")
    parser.add_argument("--profile", type=Path, help="write py-spy stacks of the proxy here")
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/var/tmp")),
        help="where the stores go (the disk whose fsync is measured)",
    )
    args = parser.parse_args()
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise SystemExit("nginx is needed: apt-get install nginx-light")
    chosen = [REQUESTS[r] for r in args.requests]

    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(dir=args.store_dir, prefix="bench-rate-") as stores,
    ):
        d = Path(tmp)
        d.chmod(0o755)  # nginx's workers run as another user and must read www/
        for req in chosen:
            if req.body is not None:
                (d / f"{req.name}.body").write_bytes(req.body)
        up = free_port()
        floor_before = fsync_floor(Path(stores))
        with contextlib.ExitStack() as stack:
            stack.enter_context(upstream(d, up))
            targets = [Target("direct", up, None)]
            if not args.no_bare:
                bare = stack.enter_context(
                    running(
                        [
                            sys.executable,
                            str(ROOT / "bench" / "plain_proxy.py"),
                            f"http://127.0.0.1:{up}",
                            str(port := free_port()),
                        ]
                    )
                )
                targets.append(Target("bare aiohttp", port, bare.pid))
            trees = [("fhir-audit-proxy", ROOT)]
            if args.before is not None:
                trees.append(("before", args.before.resolve()))
            for spec in args.tree:
                name, _, directory = spec.partition("=")
                trees.append((name, Path(directory).resolve()))
            for name, tree_root in trees:
                port, admin = free_port(), free_port()
                config = proxy_config(
                    d / f"{name}.yaml", port, admin, up, Path(stores) / name.replace(" ", "-")
                )
                proc = stack.enter_context(
                    running(
                        [sys.executable, "-m", "proxy", "-c", str(config), "run"], cwd=tree_root
                    )
                )
                targets.append(Target(name, port, proc.pid, admin))
            for t in targets:
                wait_http(f"http://127.0.0.1:{t.port}/fhir/Patient/1")
            time.sleep(2)
            for t in targets:
                if t.pid is not None:
                    t.rest_mb = memory_mb(t.pid)
            load_before = load_average()
            started = datetime.now(UTC)
            for _ in range(args.repeat):
                for req in chosen:
                    body_file = d / f"{req.name}.body" if req.body is not None else None
                    for t in targets:
                        url = f"http://127.0.0.1:{t.port}{req.path}"
                        run = measure(url, req, t.pid, args, body_file, t.admin)
                        t.runs.setdefault(req.name, []).append(run)
            load_after = load_average()
            if args.profile is not None:
                profile(targets, chosen, args, d)
        floor_after = fsync_floor(Path(stores))
    report(args, chosen, targets, started, load_before, load_after, floor_before, floor_after)


def report(
    args: argparse.Namespace,
    chosen: list[Request],
    targets: list[Target],
    started: datetime,
    load_before: str,
    load_after: str,
    floor_before: dict[str, dict[str, float]],
    floor_after: dict[str, dict[str, float]],
) -> None:
    print(
        f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, {args.rate:.0f} req/s evenly"
        f" spaced, {args.seconds:g} s after {args.warmup:g} s of warm-up"
        + (f", median of {args.repeat} interleaved runs" if args.repeat > 1 else "")
        + f"; load average {load_before} -> {load_after}"
    )
    print()
    direct = targets[0]
    audited = [t for t in targets if t.pid is not None]

    def lat(t: Target, req: str, p: str) -> float:
        return median([r.latency_ms[p] for r in t.runs[req]])

    print(
        "| request | target | latency p50 / p90 / p99 ms | added over direct p50 / p90 / p99 ms"
        " | vCPU per 1000 req/s | of which user / system | by process | RSS MB under load"
        " (PSS) | commits per request, mean commit | non-2xx/errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for req in chosen:
        for t in targets:
            runs = t.runs[req.name]
            p = [lat(t, req.name, k) for k in ("p50", "p90", "p99")]
            base = [lat(direct, req.name, k) for k in ("p50", "p90", "p99")]
            added = (
                " / ".join(f"{a - b:+.2f}" for a, b in zip(p, base, strict=True))
                if t is not direct
                else ""
            )
            bad = sum(r.non2xx + r.errors for r in runs)
            if t.pid is None:
                cpu = split = by_process = mem = commits = ""
            else:
                cpu = f"{median([r.vcpu_per_krps() for r in runs]):.3f}"
                user = median([sum(u for u, _ in r.cpu.values()) / r.answered * 1000 for r in runs])
                system = median(
                    [sum(s for _, s in r.cpu.values()) / r.answered * 1000 for r in runs]
                )
                split = f"{user:.3f} / {system:.3f}"
                roles = sorted({k for r in runs for k in r.cpu})
                by_process = ", ".join(
                    f"{k} {median([r.vcpu_per_krps(k) for r in runs]):.3f}" for k in roles
                )
                rss, pss = median([r.rss_mb for r in runs]), median([r.pss_mb for r in runs])
                mem = f"{rss:.0f} ({pss:.0f})"
                per_request = median([r.commits / r.answered for r in runs])
                commit_ms = median(
                    [r.commit_s / r.commits * 1e3 if r.commits else 0.0 for r in runs]
                )
                writer_us = median(
                    [
                        sum(r.cpu.get("writer", (0.0, 0.0))) / r.commits * 1e6 if r.commits else 0.0
                        for r in runs
                    ]
                )
                commits = (
                    f"{per_request:.2f}, {commit_ms:.2f} ms, writer {writer_us:.0f} µs CPU each"
                    if t.admin is not None
                    else ""
                )
            print(
                f"| `{req.name}` | {t.name} | {' / '.join(f'{v:.2f}' for v in p)} | {added}"
                f" | {cpu} | {split} | {by_process} | {mem} | {commits} | {bad} |"
            )
    print()
    for t in audited:
        print(f"RSS at rest, {t.name}: {t.rest_mb[0]:.0f} MB (PSS {t.rest_mb[1]:.0f} MB)")
    lags = [r.send_lag_ms["p99"] for t in targets for rs in t.runs.values() for r in rs]
    shares = [r.generator_cpu_share for t in targets for rs in t.runs.values() for r in rs]
    print(
        f"load generator: send lag p99 {median(lags):.3f} ms (median over runs, max"
        f" {max(lags):.3f}); its own CPU {median(shares):.3f} of a core"
    )
    for label, floor in (("before the runs", floor_before), ("after", floor_after)):
        print(
            f"disk floor {label}: "
            + "; ".join(
                f"{k} p50 {v['p50']:.2f} / p90 {v['p90']:.2f} / p99 {v['p99']:.2f} ms"
                for k, v in floor.items()
            )
        )
    after = next(t for t in audited if t.name == "fhir-audit-proxy")
    others = [t for t in audited if t.name not in ("fhir-audit-proxy", "bare aiohttp")]
    if others:
        print()
        print(
            "| request | tree | vCPU per 1000 req/s, that tree / this tree | ratio"
            " | p50 added, that tree / this tree |"
        )
        print("|---|---|---|---|---|")
        for req in chosen:
            base = lat(direct, req.name, "p50")
            a = median([r.vcpu_per_krps() for r in after.runs[req.name]])
            for before in others:
                b = median([r.vcpu_per_krps() for r in before.runs[req.name]])
                added_b = lat(before, req.name, "p50") - base
                added_a = lat(after, req.name, "p50") - base
                print(
                    f"| `{req.name}` | {before.name} | {b:.3f} / {a:.3f} | {a / b:.2f}"
                    f" | {added_b:+.2f} / {added_a:+.2f} ms |"
                )


if __name__ == "__main__":
    main()
