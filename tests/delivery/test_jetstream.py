"""The ``jetstream`` mode against a real nats-server with JetStream (single node): ids as
``Nats-Msg-Id``, subjects from the template, the stream checked at start-up, the server's
absence and return, authentication, and an event the stream refuses."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import nkeys
import pytest
import yaml

from proxy.delivery.flusher import Flusher
from proxy.delivery.jetstream import JetStreamRepository, subject_matches
from proxy.delivery.sink import (
    Origin,
    RepositoryRejected,
    RepositoryUnavailable,
    SinkUnusable,
)
from proxy.store.queue import AuditQueue
from tests.factories import (
    ROOT,
    NatsServer,
    add_stream,
    audit_event,
    free_port,
    nats_operator,
    stream_messages,
    write_certificate,
)


def _settings(url: str, **kwargs: Any) -> JetStreamRepository:
    values: dict[str, Any] = {"url": url, "stream": "AUDIT", "timeout_s": 2.0}
    return JetStreamRepository(**(values | kwargs))


def _with_patient(n: int, patient: str | None) -> dict[str, Any]:
    event = audit_event(n, source={"site": "ward 7", "observer": {"display": "proxy"}})
    if patient is not None:
        role = {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}
        event["entity"].append({"what": {"reference": patient}, "role": role})
    return event


async def test_events_are_published_by_id_to_their_subject_and_a_redelivery_is_dropped(
    nats_server: NatsServer,
) -> None:
    await add_stream(nats_server.url, "AUDIT", ["audit.>"])
    sink = await _settings(nats_server.url, subject="audit.{site}.{shard}.{patient}").open_sink(
        Origin(shard=3)
    )
    try:
        events = [_with_patient(i, f"Patient/p{i % 2}" if i < 4 else None) for i in range(5)]
        await sink.send(events)
        await sink.send(events[2:])  # a redelivery after an acknowledgement was lost
    finally:
        await sink.close()
    messages = await stream_messages(nats_server.url, "AUDIT")
    assert [m.msg_id for m in messages] == [e["id"] for e in events], "each once, in order"
    assert [m.event for m in messages] == events
    p0 = hashlib.sha256(b"Patient/p0").hexdigest()[:16]
    assert messages[0].subject == f"audit.ward_7.3.{p0}"
    assert messages[4].subject == "audit.ward_7.3.none"


async def test_a_missing_stream_is_a_start_up_error_that_names_it(
    nats_server: NatsServer,
) -> None:
    with pytest.raises(SinkUnusable, match=r"stream 'NOPE' does not exist.*create_stream"):
        await _settings(nats_server.url, stream="NOPE").open_sink(Origin())


async def test_the_stream_is_created_when_configured(nats_server: NatsServer) -> None:
    settings = _settings(nats_server.url, stream="MADE", create_stream=True, subject="a.{site}")
    sink = await settings.open_sink(Origin())
    try:
        await sink.send([audit_event(1)])
    finally:
        await sink.close()
    (message,) = await stream_messages(nats_server.url, "MADE")
    assert message.subject == "a.none"


async def test_a_stream_that_does_not_take_the_subject_is_a_start_up_error(
    nats_server: NatsServer,
) -> None:
    await add_stream(nats_server.url, "AUDIT", ["other.>"])
    with pytest.raises(SinkUnusable, match=r"does not take subject 'audit\.\*\.\*'"):
        await _settings(nats_server.url).open_sink(Origin())


async def test_a_server_down_at_start_is_waited_for(tmp_path: Path) -> None:
    server = NatsServer(name="late", directory=tmp_path)
    sink = await _settings(server.url).open_sink(Origin())  # nothing listens yet
    try:
        with pytest.raises(RepositoryUnavailable, match="unreachable"):
            await sink.send([audit_event(1)])
        server.start()
        await server.wait_ready()
        await add_stream(server.url, "AUDIT", ["audit.>"])
        await sink.send([audit_event(2)])
        (message,) = await stream_messages(server.url, "AUDIT")
        assert message.event["entity"] == audit_event(2)["entity"]
    finally:
        await sink.close()
        server.stop()


def _nkey_pair() -> tuple[str, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public: bytes = nkeys.from_seed(seed).public_key
    return seed.decode(), public.decode()


@pytest.mark.parametrize("auth", ["token", "nkey", "creds", "mutual-tls"])
async def test_authentication(tmp_path: Path, auth: str) -> None:
    settings: dict[str, Any] = {}
    lacking: dict[str, Any] = {}
    """What a client that must be refused has (the server's CA, but no certificate)."""
    connect: dict[str, Any] = {}
    server = NatsServer(name="secured", directory=tmp_path)
    if auth == "token":
        server.extra = 'authorization { token: "t0ken-for-audit" }'
        settings["token"] = "t0ken-for-audit"
        connect["token"] = "t0ken-for-audit"
    elif auth == "nkey":
        seed, public = _nkey_pair()
        server.extra = f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}'
        seed_file = tmp_path / "user.nk"
        seed_file.write_text(seed)
        settings["nkey_seed_file"] = seed_file
        connect["nkeys_seed"] = str(seed_file)
    elif auth == "creds":
        operator = nats_operator(tmp_path)
        server.extra = operator.server_config
        settings["creds_file"] = operator.creds_file
        connect["user_credentials"] = str(operator.creds_file)
    else:
        (tmp_path / "srv").mkdir()
        (tmp_path / "cli").mkdir()
        server_ca = write_certificate(tmp_path / "srv", "nats-server")
        client_ca = write_certificate(tmp_path / "cli", "audit-proxy")
        server.extra = (
            f'tls {{ cert_file: "{server_ca}", key_file: "{tmp_path / "srv" / "key.pem"}",'
            f' ca_file: "{client_ca}", verify: true }}'
        )
        tls = {
            "ca_file": server_ca,
            "cert_file": client_ca,
            "key_file": tmp_path / "cli" / "key.pem",
        }
        settings["tls"] = tls
        lacking["tls"] = {"ca_file": server_ca}
        server.scheme = "tls"
        connect["tls"] = JetStreamRepository(tls=tls).tls.client_context("tls")
    server.start()
    try:
        await server.wait_ready()
        await add_stream_as(server.url, connect)
        refused = await _settings(server.url, **lacking).open_sink(Origin())
        try:
            with pytest.raises(RepositoryUnavailable):
                await refused.send([audit_event(0)])
        finally:
            await refused.close()
        sink = await _settings(server.url, **settings).open_sink(Origin())
        try:
            await sink.send([audit_event(1)])
        finally:
            await sink.close()
        assert len(await stream_messages(server.url, "AUDIT", **connect)) == 1
    finally:
        server.stop()


async def add_stream_as(url: str, connect: dict[str, Any]) -> None:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url, **connect)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="AUDIT", subjects=["audit.>"]))
    finally:
        await nc.close()


async def test_an_event_larger_than_the_stream_takes_goes_to_the_dead_letters(
    nats_server: NatsServer, queue: AuditQueue
) -> None:
    await add_stream(nats_server.url, "AUDIT", ["audit.>"], max_msg_size=2048)
    settings = _settings(nats_server.url, batch_count=10)
    big = audit_event(1, extension=[{"url": "urn:pad", "valueString": "x" * 4096}])
    events = [audit_event(0), big, audit_event(2)]
    for event in events:
        await queue.append([event])
    sink = await settings.open_sink(Origin())
    try:
        with pytest.raises(RepositoryRejected, match="exceeds maximum"):
            await sink.send([big])
        flusher = Flusher(queue, sink, settings, rng=random.Random(1))
        assert await flusher.flush_once() == 2
    finally:
        await sink.close()
    (dead,) = await queue.list_dead()
    assert dead.event_id == big["id"]
    messages = await stream_messages(nats_server.url, "AUDIT")
    assert [m.msg_id for m in messages] == [events[0]["id"], events[2]["id"]]


def test_subject_matching() -> None:
    assert subject_matches("audit.*.*", "audit.>")
    assert subject_matches("audit.*.*", "audit.*.*")
    assert not subject_matches("audit.*.*", "audit.*")
    assert not subject_matches("audit.x", "other.>")
    assert subject_matches("audit.a.b", "audit.*.b")


async def test_the_proxy_refuses_to_start_without_its_stream(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstream": {"url": "http://127.0.0.1:9/fhir"},
        "store": {"path": str(tmp_path / "audit.db")},
        "repository": {"mode": "jetstream", "url": nats_server.url, "stream": "MISSING"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "-c", str(path), "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "JetStream stream 'MISSING' does not exist" in done.stderr
    assert "Traceback" not in done.stderr
