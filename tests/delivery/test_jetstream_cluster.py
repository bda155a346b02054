"""A proxy publishing to a 3-node JetStream cluster whose R3 stream's leader is killed with
SIGKILL under load: every event the proxy acknowledged is in the stream once, in the
order the proxy stored it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import nats
import nats.errors
import nats.js.errors
import pytest

from proxy.app import LOG_ORIGIN
from proxy.log.entry import with_position
from proxy.store.records import EventQuery
from tests.factories import (
    NatsServer,
    NodeFhirServer,
    StartProxy,
    add_stream_when_ready,
    nats_cluster,
    new_patient,
    stream_messages,
)

READERS = 6
READS_EACH = 50


async def _stream_leader(url: str, stream: str) -> str:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream(timeout=5).stream_info(stream)
        assert info.cluster is not None and info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await nc.close()


@pytest.mark.slow
async def test_every_acknowledged_event_is_in_the_stream_once_after_its_leader_is_killed(
    tmp_path: Path,
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nodes = nats_cluster(tmp_path)
    by_name: dict[str, NatsServer] = {node.name: node for node in nodes}
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            await node.wait_ready()
        await add_stream_when_ready(nodes[0].url, "AUDIT", ["audit.>"], replicas=3)
        proxy = await start_proxy(
            fhir_server.base_url,
            repository={
                "mode": "jetstream",
                "url": ",".join(node.url for node in nodes),
                "stream": "AUDIT",
                "subject": "audit.{shard}.{patient}",
                "batch_count": 20,
                "flush_interval_ms": 20,
                "max_flush_interval_ms": 400,
                "timeout_s": 2,
            },
        )
        patient = await new_patient(http, proxy.url)

        async def reads() -> None:
            for _ in range(READS_EACH):
                async with http.get(f"{proxy.url}/Patient/{patient['id']}") as r:
                    assert r.status == 200

        load = asyncio.gather(*(reads() for _ in range(READERS)))
        try:
            for _ in range(3000):
                if (await proxy.queue.stats()).delivered >= READERS * READS_EACH // 4:
                    break
                await asyncio.sleep(0.01)
            leader = await _stream_leader(nodes[0].url, "AUDIT")
            by_name[leader].kill()
            survivor = next(node for node in nodes if node.name != leader)
            await load
        finally:
            if not load.done():
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
        for _ in range(600):
            stats = await proxy.queue.stats()
            if stats.pending == 0:
                break
            await asyncio.sleep(0.1)
        stats = await proxy.queue.stats()
        assert (stats.pending, stats.dead) == (0, 0), stats

        page, _ = await proxy.queue.search(EventQuery(newest_first=False, limit=10_000))
        retried = sum(1 for q in page if q.attempts)
        stored = [q.event_id for q in page]
        messages = await stream_messages(survivor.url, "AUDIT")
        in_stream = [m.msg_id for m in messages]
        duplicates = len(in_stream) - len(set(in_stream))
        with capsys.disabled():
            print(
                f"\nJetStream R3, leader {leader} killed: acknowledged {stats.delivered},"
                f" in the stream {len(set(in_stream))}, duplicates {duplicates},"
                f" {retried} held back by the outage and sent again"
            )
        assert retried, "the leader's death was felt: some publishes failed and were retried"
        assert stats.delivered == len(stored) == 1 + READERS * READS_EACH
        assert duplicates == 0
        assert in_stream == stored, "every acknowledged event once, in the order stored"
        # Shipped as stored, with each event's place in the shard's log.
        origin = proxy.app[LOG_ORIGIN]
        shipped = [with_position(q.event, origin, leaf) for leaf, q in enumerate(page)]
        assert [m.event for m in messages] == shipped
    finally:
        for node in nodes:
            node.stop()
