"""The admin listener (proxy/admin/server.py), over real sockets: a request head that does
not arrive in time, and requests aiohttp's parser refuses, answered without quoting
them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
import pytest

from proxy.admin.app import build_admin_app
from proxy.admin.server import AdminListener
from proxy.settings import AdminSettings
from proxy.store.queue import AuditQueue
from tests.factories import raw_body, raw_http, raw_status

TOKEN = "admin-token-for-server-tests"


@pytest.fixture
async def admin(queue: AuditQueue) -> AsyncIterator[tuple[str, int]]:
    settings = AdminSettings(tokens=[TOKEN], header_timeout_s=0.3, body_timeout_s=0.3)
    listener = AdminListener(
        build_admin_app(queue, settings, writer=queue), header_timeout_s=settings.header_timeout_s
    )
    await listener.start("127.0.0.1", 0)
    try:
        yield listener.address
    finally:
        await listener.stop()


@pytest.mark.parametrize("where", ["Authorization: Bearer ", "Cookie: s="])
async def test_a_header_past_the_limit_is_refused_without_quoting_it(
    admin: tuple[str, int], caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """8 KiB or more of a header line: 400 with an OperationOutcome; neither the answer
    nor the log quotes the value (aiohttp's own answer and ERROR log quoted its first
    ~100 characters), and nothing is logged at ERROR."""
    caplog.set_level(logging.DEBUG)
    secret = "SECRET-TOKEN-" + "t" * 9000
    raw = await raw_http(
        *admin,
        b"GET /fhir/AuditEvent HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"{where}{secret}\r\n\r\n".encode(),
    )
    assert raw_status(raw) == 400
    outcome = orjson.loads(raw_body(raw))
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"].startswith("malformed HTTP request (LineTooLong)")
    assert b"SECRET" not in raw
    assert "SECRET" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_head_that_does_not_arrive_in_time_is_answered_408(admin: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*admin)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    assert raw_status(raw) == 408
    assert b"Connection: close" in raw
    assert orjson.loads(raw_body(raw))["issue"][0]["code"] == "timeout"

    # A head in parts, whole in time, is answered; an idle connection after it is not 408.
    reader, writer = await asyncio.open_connection(*admin)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"Host: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.6)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            rest = await reader.read()
        assert rest.count(b"HTTP/1.1 200") >= 1 and b"408" not in rest
    finally:
        writer.close()
