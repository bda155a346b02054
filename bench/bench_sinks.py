"""Events drained per second by each repository mode, against a FHIR bundle POSTed to the
test FHIR server, measured in the same run.

Each mode gets a fresh store (SQLite, fsync) holding the same BALP PatientRead events and
the flusher that ships them (real acknowledgements from real servers, started here as the
tests start them): ``transaction`` to the test FHIR server (Medplum's engine on Node; the
baseline: it answers ``collection`` Bundles 400, so ``bundle`` mode cannot be measured
against it), ``bundle`` to the tests' recording repository (aiohttp in this process,
answering 200 without storing), ``file`` (NDJSON, fsync), ``jetstream`` to one
nats-server and to a 3-node cluster with an R3 stream, ``kafka`` to Tansu (in memory, no
idempotent producer), and ``syslog`` to rsyslogd over mutual TLS. The figure is events
acknowledged in the store per second of draining, from the first claim to the last ack.

    python bench/bench_sinks.py [--events 3000] [--batch 100] [--modes bundle,kafka,...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.audit.ids import new_event_id  # noqa: E402
from proxy.delivery.flusher import Flusher  # noqa: E402
from proxy.delivery.modes import repository_settings  # noqa: E402
from proxy.delivery.sink import Origin  # noqa: E402
from proxy.store.queue import AuditQueue  # noqa: E402
from tests.factories import (  # noqa: E402
    NatsServer,
    RecordingRepository,
    RsyslogReceiver,
    TansuBroker,
    add_stream_when_ready,
    create_topic,
    events_of,
    exchange,
    nats_cluster,
    serving,
    start_fhir_server,
    stop_fhir_server,
)

MODES = ("transaction", "bundle", "file", "jetstream", "jetstream-r3", "kafka", "syslog")
BASELINE = "transaction"


def _events(count: int) -> list[dict[str, Any]]:
    """``count`` copies of one BALP PatientRead, each with its own id."""
    (template,) = events_of(
        exchange("GET", "/fhir/Patient/1", response={"resourceType": "Patient", "id": "1"})
    )
    out = []
    for _ in range(count):
        event = copy.deepcopy(template)
        event["id"] = new_event_id()
        out.append(event)
    return out


@contextlib.asynccontextmanager
async def _repository(mode: str, work: Path) -> AsyncIterator[dict[str, Any]]:
    """The ``repository:`` settings of ``mode``, its server running meanwhile."""
    if mode == "transaction":
        server = start_fhir_server()
        try:
            yield {"mode": mode, "url": server.base_url}
        finally:
            stop_fhir_server(server)
    elif mode == "bundle":
        repository = RecordingRepository()
        async with serving(("POST", "/{tail:.*}", repository.handle)) as app:
            yield {"mode": "bundle", "url": str(app.make_url("/fhir"))}
    elif mode == "file":
        yield {"mode": "file", "url": str(work / "audit.ndjson")}
    elif mode.startswith("jetstream"):
        nodes = nats_cluster(work, 3) if mode == "jetstream-r3" else [NatsServer("n1", work)]
        for node in nodes:
            node.start()
        try:
            for node in nodes:
                await node.wait_ready()
            await add_stream_when_ready(nodes[0].url, "AUDIT", ["audit.>"], len(nodes))
            urls = ",".join(node.url for node in nodes)
            yield {"mode": "jetstream", "url": urls, "stream": "AUDIT", "timeout_s": 5}
        finally:
            for node in nodes:
                node.stop()
    elif mode == "kafka":
        broker = TansuBroker(work)
        broker.start()
        try:
            await broker.wait_ready()
            await create_topic(broker.bootstrap, "audit")
            yield {"mode": "kafka", "url": broker.url, "idempotent": False}
        finally:
            broker.kill()
    elif mode == "syslog":
        receiver = RsyslogReceiver(work)
        receiver.start()
        try:
            await receiver.wait_ready()
            yield {"mode": "syslog", "url": receiver.url, "tls": receiver.client_tls()}
        finally:
            receiver.stop()
    else:
        raise SystemExit(f"unknown mode {mode}; known: {', '.join(MODES)}")


async def _drain_rate(mode: str, events: list[dict[str, Any]], batch: int) -> float:
    with tempfile.TemporaryDirectory(prefix=f"bench-sinks-{mode}-") as directory:
        work = Path(directory)
        queue = await AuditQueue.open(work / "audit.db", max_bytes=1 << 32)
        try:
            for start in range(0, len(events), 500):
                await queue.append(events[start : start + 500])
            async with _repository(mode, work) as values:
                settings = repository_settings(**values, batch_count=batch)
                sink = await settings.open_sink(Origin())
                flusher = Flusher(queue, sink, settings, rng=random.Random(0))
                try:
                    started = time.perf_counter()
                    while await flusher.flush_once():
                        pass
                    elapsed = time.perf_counter() - started
                finally:
                    await sink.close()
            stats = await queue.stats()
            if stats.delivered != len(events):
                raise SystemExit(f"{mode}: {stats.delivered} of {len(events)} delivered")
            return len(events) / elapsed
        finally:
            await queue.close()


async def _run(modes: list[str], count: int, batch: int, say: Callable[[str], None]) -> None:
    events = _events(count)
    rates: dict[str, float] = {}
    for mode in modes:
        rates[mode] = await _drain_rate(mode, events, batch)
        say(f"  {mode:<13} {rates[mode]:>9.0f} events/s")
    base = rates.get(BASELINE)
    say("")
    say(f"| mode | events/s drained | ratio to {BASELINE} |  ({count} events, batches of {batch})")
    say("|---|---:|---:|")
    for mode, rate in rates.items():
        ratio = f"{rate / base:.2f}" if base else "-"
        say(f"| {mode} | {rate:.0f} | {ratio} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if BASELINE not in modes:
        modes.insert(0, BASELINE)  # the baseline is measured in the same run
    uvloop.run(_run(modes, args.events, args.batch, print))
    return 0


if __name__ == "__main__":
    sys.exit(main())
