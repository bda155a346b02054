"""SIGKILL at random moments while 32 writers append: every append that returned (the
caller was told "durable") is in the store after a restart, and the store opens cleanly.
A quarter of the writers append fan-outs (a search's events about three patients, stored
as one row whose seq the writer gives): their every event must be there too."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from proxy.store.records import member_id
from tests.factories import queued_event

WRITER = r"""
import asyncio, sys
from datetime import UTC, datetime
from pathlib import Path
from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.store.queue import AuditQueue
from tests.factories import queued_event, search_exchange

async def main() -> None:
    queue = await AuditQueue.open(Path(sys.argv[1]), max_bytes=1 << 30)
    round_no = int(sys.argv[2])

    async def writer(w: int) -> None:
        i = 0
        while True:
            if w % 4:
                event = queued_event(i)
                event["id"] = f"r{round_no}-w{w}-{i}"
                await queue.append([event])
                ids = [event["id"]]
            else:
                built = build_events(
                    search_exchange([f"Patient/w{w}-{i}-{n}" for n in range(3)]),
                    AuditContext.default(),
                    datetime.now(UTC),
                )
                await queue.append_rows(store_rows(built))
                ids = [b.row.event_id for b in built]
            sys.stdout.write("".join(f"{i}\n" for i in ids))  # acknowledged: may be relied on
            sys.stdout.flush()
            i += 1

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.gather(*(writer(w) for w in range(32)))

asyncio.run(main())
"""

ROOT = Path(__file__).resolve().parents[2]


def _run_and_kill(path: Path, round_no: int, rng: random.Random) -> set[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(round_no)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.2, 0.8))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    lines = out.splitlines()
    # The last line may be cut mid-write by the kill: only whole lines were acknowledged.
    complete = lines if out.endswith("\n") else lines[:-1]
    return set(complete)


def _seed() -> int:
    """``KILL_TEST_SEED`` replays a failed run; otherwise a fresh seed each run."""
    replay = os.environ.get("KILL_TEST_SEED")
    return int(replay) if replay else random.SystemRandom().randrange(2**32)


def test_acknowledged_appends_survive_sigkill(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    path = tmp_path / "audit.db"
    seed = _seed()
    # Printed and recorded so a failure names it (pytest shows captured output then):
    # replay with KILL_TEST_SEED=<seed>.
    print(f"KILL_TEST_SEED={seed}")
    record_property("KILL_TEST_SEED", seed)
    rng = random.Random(seed)
    acknowledged: set[str] = set()
    for round_no in range(3):
        acked = _run_and_kill(path, round_no, rng)
        assert len(acked) > 50, f"the writers made progress before the kill (seed {seed})"
        acknowledged |= acked
        print(f"round {round_no}: {len(acked)} acknowledged before SIGKILL")
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {
            member_id(event_id, n) if fan else event_id
            for event_id, fan in conn.execute("SELECT event_id, fan FROM events")
            for n in range(fan or 1)
        }
        assert any(i.startswith(f"r{round_no}-") for i in acked) and any(
            not i.startswith("r") for i in acked
        ), "both plain events and fan-outs were acknowledged"
        conn.close()
        missing = acknowledged - stored
        assert not missing, (
            f"round {round_no}: {len(missing)} acknowledged events lost;"
            f" replay with KILL_TEST_SEED={seed}"
        )
    # And the store still works after three crashes.
    from proxy.store.queue import AuditQueue

    async def reopen() -> int:
        queue = await AuditQueue.open(path, max_bytes=1 << 30)
        try:
            await queue.append([queued_event(1)])
            return (await queue.stats()).pending
        finally:
            await queue.close()

    assert asyncio.run(reopen()) >= len(acknowledged) + 1
