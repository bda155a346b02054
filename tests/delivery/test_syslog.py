"""The ``syslog`` mode: RFC 5424 messages, octet-counted over mutual TLS to a real rsyslogd
(every event arrives once, its XML valid for DICOM, nothing acknowledged lost when the
receiver restarts), and the lossy UDP option."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from typing import Any

import pytest
from lxml import etree

from proxy.delivery.flusher import Flusher
from proxy.delivery.sink import (
    Origin,
    PartialDelivery,
    RepositoryRejected,
    RepositoryUnavailable,
)
from proxy.delivery.syslog import BOM, MSGID, SyslogRepository, octet_counted, syslog_message
from proxy.store.queue import AuditQueue
from tests.factories import (
    RsyslogReceiver,
    WatchedQueue,
    audit_event,
    checkpoint_resource,
    log_signer,
)


def _settings(receiver: RsyslogReceiver, **kwargs: Any) -> SyslogRepository:
    values = {"url": receiver.url, "tls": receiver.client_tls(), "timeout_s": 5.0}
    return SyslogRepository(**(values | kwargs))


def _ids(received: list[dict[str, Any]]) -> list[str]:
    """The number each message's event carries (``n-3``), in the order received."""
    out = []
    for r in received:
        found = etree.fromstring(r["msg"].lstrip("\ufeff").encode()).find(
            "ParticipantObjectIdentification"
        )
        assert found is not None
        out.append(str(found.get("ParticipantObjectID")))
    return out


def test_an_rfc_5424_message_and_its_octet_count() -> None:
    event = audit_event(1, recorded="2026-12-05T10:00:00.1234+01:00")
    message = syslog_message(event, hostname="pod-1", app_name="fhir-audit-proxy", procid=7, pri=85)
    header, _, rest = message.partition(BOM)
    assert header == b"<85>1 2026-12-05T09:00:00.123400Z pod-1 fhir-audit-proxy 7 IHE+RFC-3881 - "
    assert rest.startswith(b"<AuditMessage>")
    framed = octet_counted("é".encode() + message)
    length, _, body = framed.partition(b" ")
    assert int(length) == len(body) == len(message) + 2, "the length counts bytes, not characters"


async def test_every_event_arrives_once_as_valid_dicom_xml(
    rsyslog: RsyslogReceiver, dicom_audit_schema: Any
) -> None:
    events = [audit_event(i) for i in range(25)]
    sink = await _settings(rsyslog).open_sink(Origin())
    try:
        await sink.send(events[:10])
        await sink.send(events[10:])
    finally:
        await sink.close()
    received = await _wait_for(rsyslog, len(events))
    assert {r["msgid"] for r in received} == {MSGID}
    assert {r["app"] for r in received} == {"fhir-audit-proxy"}
    assert _ids(received) == [e["entity"][0]["what"]["identifier"]["value"] for e in events]
    for r in received:
        assert dicom_audit_schema.validate(etree.fromstring(r["msg"].lstrip("\ufeff").encode()))


async def test_a_client_without_a_certificate_is_refused(rsyslog: RsyslogReceiver) -> None:
    tls = rsyslog.client_tls()
    sink = await _settings(rsyslog, tls={"ca_file": tls["ca_file"]}).open_sink(Origin())
    with pytest.raises(RepositoryUnavailable, match="syslog receiver"):
        await sink.send([audit_event(1)])
    assert rsyslog.received() == []


async def _wait_for(
    receiver: RsyslogReceiver, count: int, within_s: float = 20.0
) -> list[dict[str, Any]]:
    for _ in range(int(within_s / 0.05)):
        received = receiver.received()
        if len(received) >= count:
            return received
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(receiver.received())} of {count} messages arrived")


@pytest.mark.slow
async def test_a_receiver_restart_under_load_loses_nothing_acknowledged(
    rsyslog: RsyslogReceiver, queue: AuditQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(rsyslog, batch_count=10, flush_interval_ms=10, max_flush_interval_ms=200)
    watched = WatchedQueue(queue)
    sink = await settings.open_sink(Origin())
    flusher = Flusher(watched, sink, settings, rng=random.Random(5))
    total = 300
    marks: dict[int, str] = {}

    async def load() -> None:
        for n in range(total):
            event = audit_event(n)
            await queue.append([event])
            stored = await queue.get_event(event["id"])
            assert stored is not None
            marks[stored.seq] = f"n-{n}"
            await asyncio.sleep(0.003)

    loading = asyncio.create_task(load())
    flushing = asyncio.create_task(flusher.run())
    try:
        for _ in range(4000):
            if len(watched.acked) >= total // 3:
                break
            await asyncio.sleep(0.005)
        acked_before = len(watched.acked)
        await asyncio.to_thread(rsyslog.stop)
        await asyncio.sleep(0.3)  # batches meet a closed port and back off
        rsyslog.start()
        await rsyslog.wait_ready()
        await loading
        for _ in range(600):
            if (await queue.stats()).pending == 0:
                break
            await asyncio.sleep(0.05)
        stats = await queue.stats()
        assert (stats.pending, stats.dead) == (0, 0)
    finally:
        for task in (loading, flushing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await sink.close()
    received = _ids(rsyslog.received())
    acknowledged = {marks[seq] for seq in watched.acked}
    duplicates = len(received) - len(set(received))
    with capsys.disabled():
        print(
            f"\nsyslog (rsyslog) restart: acknowledged {len(acknowledged)} ({acked_before} before"
            f" the restart), in the file {len(set(received) & acknowledged)},"
            f" duplicates {duplicates}"
        )
    assert watched.nacked, "batches failed while the receiver was down and were retried"
    assert len(acknowledged) == total
    assert acknowledged <= set(received), "every acknowledged event is in the receiver's file"


async def test_udp_is_lossy_by_choice_and_refuses_what_no_datagram_holds() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    try:
        settings = SyslogRepository(url=f"udp://127.0.0.1:{port}", max_udp_bytes=4096)
        sink = await settings.open_sink(Origin())
        big = audit_event(2, entity=[{"what": {"identifier": {"value": "x" * 5000}}}])
        with pytest.raises(PartialDelivery) as info:
            await sink.send([audit_event(1), big])
        assert info.value.delivered == 1
        assert isinstance(info.value.cause, RepositoryRejected)
        datagram = await asyncio.to_thread(receiver.recv, 65535)
        assert b" IHE+RFC-3881 - " + BOM + b"<AuditMessage>" in datagram
        assert not datagram[:5].strip().isdigit(), "a datagram carries one message, unframed"
    finally:
        receiver.close()


async def test_a_relayed_checkpoint_is_skipped_and_counts_as_delivered(
    rsyslog: RsyslogReceiver,
) -> None:
    # A relay passes on what its stream holds, the log's checkpoints too: an ATNA
    # repository takes audit messages only.
    checkpoint = checkpoint_resource(log_signer(), "audit.example.org/test/a", 2)
    events = [audit_event(1), checkpoint, audit_event(2)]
    sink = await _settings(rsyslog).open_sink(Origin())
    try:
        await sink.send(events)
        await sink.send([checkpoint])
    finally:
        await sink.close()
    await _wait_for(rsyslog, 2)
    await asyncio.sleep(0.3)  # anything more would have arrived by now
    received = rsyslog.received()
    assert _ids(received) == ["n-1", "n-2"], "the AuditEvents only"
    assert all(r["msg"].lstrip("\ufeff").startswith("<AuditMessage>") for r in received)


async def test_over_udp_a_skipped_checkpoint_counts_in_a_partial_delivery() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    try:
        port = receiver.getsockname()[1]
        settings = SyslogRepository(url=f"udp://127.0.0.1:{port}", max_udp_bytes=4096)
        sink = await settings.open_sink(Origin())
        checkpoint = checkpoint_resource(log_signer(), "audit.example.org/test/a", 1)
        big = audit_event(3, entity=[{"what": {"identifier": {"value": "x" * 5000}}}])
        with pytest.raises(PartialDelivery) as info:
            await sink.send([audit_event(1), checkpoint, big])
        assert info.value.delivered == 2, "the event and the checkpoint skipped after it"
        assert isinstance(info.value.cause, RepositoryRejected)
        datagram = await asyncio.to_thread(receiver.recv, 65535)
        assert b"<AuditMessage>" in datagram and b"n-1" in datagram
        receiver.settimeout(0.5)
        with pytest.raises(TimeoutError):
            receiver.recv(65535)  # the checkpoint sent no datagram
    finally:
        receiver.close()


def test_urls_name_their_transport() -> None:
    assert SyslogRepository(url="tls://arr.example.org").address == ("arr.example.org", 6514)
    assert SyslogRepository(url="udp://arr.example.org").address == ("arr.example.org", 514)
    with pytest.raises(ValueError, match="tls://host:6514"):
        SyslogRepository(url="tcp://arr.example.org:601")


async def test_a_receiver_that_closes_without_reading_the_batch_acknowledges_nothing(
    rsyslog: RsyslogReceiver,
) -> None:
    """A receiver that completes the handshake and dies before reading (its unread bytes
    make its kernel reset the connection): the batch is not delivered, whatever the
    writes returned."""
    certificates = rsyslog.certificates()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates["server_cert"], certificates["server_key"])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_and_die() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            time.sleep(0.3)  # the batch arrives and waits, unread
            tls.settimeout(0)
        # closed with unread bytes: the kernel answers with a reset

    dying = asyncio.create_task(asyncio.to_thread(accept_and_die))
    try:
        settings = _settings(rsyslog, url=f"tls://127.0.0.1:{port}")
        sink = await settings.open_sink(Origin())
        with pytest.raises(RepositoryUnavailable, match="syslog receiver"):
            await sink.send([audit_event(i) for i in range(20)])
    finally:
        await dying
        listener.close()
