"""The counters and histograms of several workers as one ``/metrics``.

With ``workers: N`` only worker 0 serves the admin listener, so its ``/metrics`` would
count only the requests the kernel happened to give it. Each other worker publishes a
snapshot of its counters and histograms (:func:`proxy.telemetry.snapshot`) to a file beside
its store shard (``audit-1.db`` -> ``audit-1.metrics.json``), once a second and when it
stops; worker 0 reads them when scraped and adds them to its own
(:func:`proxy.telemetry.set_peer_snapshots`). A scrape is at most one second behind the
other workers. Gauges are not added: the queue gauges worker 0 shows are read from every
shard already.

A snapshot names the ``run`` process of the workers that wrote it, so one left by an
earlier run is not counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from proxy import telemetry
from proxy.private_files import write_private
from proxy.tasks import running

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 1.0


def snapshot_path(shard: Path) -> Path:
    """Where the worker owning ``shard`` publishes its metrics."""
    return shard.with_suffix(".metrics.json")


def write_snapshot(path: Path, supervisor: int) -> None:
    """Replace ``path`` with this process's counters and histograms, whole (a reader
    never sees half a file). Owner-only, as the shard beside it."""
    write_private(path, orjson.dumps({"supervisor": supervisor, "metrics": telemetry.snapshot()}))


def read_snapshots(paths: Sequence[Path], supervisor: int) -> list[dict[str, Any]]:
    """The metrics the other workers of this ``run`` last published; a file missing
    (its worker has not published yet), unreadable or from another run is skipped."""
    found = []
    for path in paths:
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("the metrics of another worker could not be read: %s", exc)
            continue
        if isinstance(data, dict) and data.get("supervisor") == supervisor:
            found.append(data["metrics"])
    return found


async def shared(shards: Sequence[Path], worker: int) -> AsyncIterator[None]:
    """While the proxy runs with several workers: worker 0 adds the others' metrics to
    its own at each scrape; every other worker publishes its own."""
    supervisor = os.getppid()
    if worker == 0:
        peers = [snapshot_path(s) for s in shards[1:]]
        telemetry.set_peer_snapshots(lambda: read_snapshots(peers, supervisor))
        try:
            yield
        finally:
            telemetry.set_peer_snapshots(None)
        return

    path = snapshot_path(shards[worker])

    def publish() -> None:
        try:
            write_snapshot(path, supervisor)
        except OSError as exc:
            log.warning("this worker's metrics could not be published: %s", exc)

    async def every_second() -> None:
        while True:
            publish()
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    try:
        async with running(every_second(), "publish-metrics"):
            yield
    finally:
        publish()
