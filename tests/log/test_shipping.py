"""The log's checkpoints per repository mode, end to end with real servers: a JetStream
stream carries them beside the events (each its own ``Nats-Msg-Id``), and a relay hands
them on, so ``log verify`` passes on what the relay delivered; an ATNA syslog repository,
which holds audit messages only, gets the events and the checkpoints stay in the store."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.cli import main
from proxy.log.checkpoint import Checkpoint
from proxy.log.entry import POSITION_URL
from proxy.log.note import split
from tests.factories import (
    NatsServer,
    NodeFhirServer,
    RelayProcess,
    RsyslogReceiver,
    RunningProxy,
    StartProxy,
    add_stream,
    independent_open_note,
    log_key_file,
    new_patient,
    stream_messages,
)


async def _reads(http: aiohttp.ClientSession, proxy: RunningProxy, count: int) -> None:
    patient = await new_patient(http, proxy.url)
    for _ in range(count):
        async with http.get(f"{proxy.url}/Patient/{patient['id']}") as response:
            assert response.status == 200


async def _whole_tree_signed(proxy: RunningProxy) -> int:
    """The tree's size, once a checkpoint of all of it is signed."""
    for _ in range(200):
        size = await proxy.queue.tree_size()
        note = await proxy.queue.latest_checkpoint()
        if note is not None and Checkpoint.parse(split(note)[0]).size == size:
            return size
        await asyncio.sleep(0.05)
    raise AssertionError("no checkpoint of the whole tree was signed")


def _is_checkpoint(resource: dict[str, Any]) -> bool:
    return resource.get("resourceType") == "DocumentReference"


def _has_position(event: dict[str, Any]) -> bool:
    return any(e["url"] == POSITION_URL for e in event.get("extension", []))


async def test_a_stream_carries_the_checkpoints_and_a_relay_hands_them_on(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    nats_server: NatsServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await add_stream(nats_server.url, "AUDIT", ["audit.>"])
    signer, key = log_key_file(tmp_path)
    source = {"url": nats_server.url, "stream": "AUDIT", "subject": "audit.{site}.{shard}"}
    proxy = await start_proxy(
        fhir_server.base_url,
        repository={"mode": "jetstream", **source, "flush_interval_ms": 50, "timeout_s": 5},
        log={"key_file": key, "checkpoint_interval_s": 0.2},
    )
    await _reads(http, proxy, 4)
    size = await _whole_tree_signed(proxy)

    messages = []
    for _ in range(100):
        messages = await stream_messages(nats_server.url, "AUDIT")
        if any(
            _is_checkpoint(m.event) and m.event["identifier"][0]["value"].endswith(f"/{size}")
            for m in messages
        ):
            break
        await asyncio.sleep(0.1)
    checkpoints = [m for m in messages if _is_checkpoint(m.event)]
    events = [m for m in messages if not _is_checkpoint(m.event)]
    assert checkpoints, "the checkpoint of the whole tree was published"
    assert len(events) == size and all(_has_position(m.event) for m in events)
    assert all(m.msg_id == m.event["id"] for m in messages), "a redelivery is dropped by id"
    assert {m.subject for m in checkpoints} == {"audit.none.0"}, "no site, shard 0"
    note = base64.b64decode(checkpoints[-1].event["content"][0]["attachment"]["data"]).decode()
    assert independent_open_note(note, signer.verifier.text()).splitlines()[1] == str(size)

    relayed = tmp_path / "relayed.ndjson"
    relay = RelayProcess(
        {
            "admin": {"host": "127.0.0.1", "port": 0},
            "relay": {"source": source, "consumer": "relay", "ack_wait_s": 3},
            "repository": {"mode": "file", "url": str(relayed), "flush_interval_ms": 50},
        },
        tmp_path / "relay",
    )
    try:
        await relay.start()
        for _ in range(200):
            if relayed.exists() and len(relayed.read_bytes().splitlines()) >= len(messages):
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
    delivered = [orjson.loads(line) for line in relayed.read_bytes().splitlines()]
    assert sorted(r["id"] for r in delivered) == sorted(m.event["id"] for m in messages)
    capsys.readouterr()
    assert main(["log", "verify", "--vkey", signer.verifier.text(), str(relayed)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok ") and f"{size} leaves" in out, out


async def test_an_atna_syslog_repository_gets_the_events_and_the_checkpoints_stay_home(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    rsyslog: RsyslogReceiver,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, key = log_key_file(tmp_path)
    proxy = await start_proxy(
        fhir_server.base_url,
        repository={
            "mode": "syslog",
            "url": rsyslog.url,
            "tls": rsyslog.client_tls(),
            "flush_interval_ms": 50,
            "timeout_s": 5,
        },
        log={"key_file": key, "checkpoint_interval_s": 0.2},
    )
    await _reads(http, proxy, 4)
    size = await _whole_tree_signed(proxy)
    for _ in range(200):
        if len(rsyslog.received()) >= size:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # rounds that would have shipped the checkpoint went by
    received = rsyslog.received()
    assert len(received) == size, "one message an event, none for a checkpoint"
    assert all(r["msg"].lstrip("\ufeff").startswith("<AuditMessage>") for r in received)
    assert await proxy.queue.checkpoints_to_ship(100), "kept in the store, not shipped"
