"""The transport seam's contract (``proxy/http/transport.py``), held against each
implementation: the pool of connections to a real HTTP server on loopback, and the
``MockTransport`` the pipeline's tests use in its place. What forwarding relies on must
hold for both, or a test on the double proves nothing about the proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web
from yarl import URL

from proxy.http.transport import (
    MockAnswer,
    MockTransport,
    SentRequest,
    Transport,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamRequest,
)
from proxy.http.upstream import UpstreamPool
from tests.factories import serving

PATIENT = b'{"resourceType":"Patient","id":"1"}'
LARGE = bytes(range(256)) * 1024  # 256 KiB: more than one read's worth


async def _answer(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """What the server of these tests answers, whichever side of the seam it is on."""
    if path.endswith("/slow"):
        await asyncio.sleep(5)
    if path.endswith("/large"):
        return 200, {"Content-Type": "application/octet-stream"}, LARGE
    if method == "POST":
        return 201, {"Content-Type": "application/fhir+json", "Location": "Patient/2"}, body
    return 200, {"Content-Type": "application/fhir+json"}, PATIENT


@dataclass
class Side:
    """One implementation of the seam, in front of :func:`_answer`."""

    transport: Transport
    bodies: list[bytes]
    """Each request body as the server received it."""


async def _real() -> AsyncIterator[Side]:
    bodies: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        bodies.append(body)
        status, headers, answer = await _answer(request.method, request.path, body)
        return web.Response(status=status, headers=headers, body=answer)

    async with serving(("*", "/{tail:.*}", handle)) as server:
        pool = UpstreamPool(URL(str(server.make_url("/"))).origin(), timeout=1.0)
        try:
            yield Side(pool, bodies)
        finally:
            await pool.close()


async def _double() -> AsyncIterator[Side]:
    bodies: list[bytes] = []

    async def handle(sent: SentRequest) -> MockAnswer:
        bodies.append(sent.body or b"")
        if sent.target.endswith("/slow"):
            async with asyncio.timeout(1.0):  # as the pool's timeout ends it
                await asyncio.sleep(5)
        status, headers, answer = await _answer(sent.method, sent.target, sent.body or b"")
        return MockAnswer(status=status, headers=headers, body=answer)

    yield Side(MockTransport(handle), bodies)


SIDES: dict[str, Callable[[], AsyncIterator[Side]]] = {"pool": _real, "double": _double}


@pytest.fixture(params=sorted(SIDES))
async def side(request: pytest.FixtureRequest) -> AsyncIterator[Side]:
    async for made in SIDES[request.param]():
        yield made


async def _stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _get(target: str) -> UpstreamRequest:
    return UpstreamRequest(method="GET", target=target, headers=[("Accept", "*/*")])


async def test_the_head_comes_back_first_and_the_body_through_its_reader(side: Side) -> None:
    answer = await side.transport.handle(_get("/fhir/Patient/1"))
    try:
        assert answer.status == 200
        assert answer.headers["content-type"] == "application/fhir+json"
        assert answer.content_length == len(PATIENT)
        assert await answer.body.read() == PATIENT
        assert await answer.body.read_chunk() == b"", "at its end"
    finally:
        answer.close()
    answer.close()  # more than once is harmless


async def test_a_body_is_read_whole_in_parts_and_sent_whole_or_streamed(side: Side) -> None:
    answer = await side.transport.handle(_get("/fhir/Binary/large"))
    try:
        parts = []
        while part := await answer.body.read_chunk():
            parts.append(part)
        assert b"".join(parts) == LARGE
    finally:
        answer.close()
    for body in (PATIENT, _stream(PATIENT[:10], b"", PATIENT[10:])):
        request = UpstreamRequest(method="POST", target="/fhir/Patient", headers=[], body=body)
        answer = await side.transport.handle(request)
        try:
            assert answer.status == 201 and answer.headers["Location"] == "Patient/2"
            assert await answer.body.read() == PATIENT
        finally:
            answer.close()
    assert side.bodies[-2:] == [PATIENT, PATIENT]


async def test_an_answer_closed_unread_ends_its_exchange_and_the_next_is_whole(
    side: Side,
) -> None:
    answer = await side.transport.handle(_get("/fhir/Binary/large"))
    answer.close()
    again = await side.transport.handle(_get("/fhir/Patient/1"))
    try:
        assert await again.body.read() == PATIENT
    finally:
        again.close()


async def test_past_the_timeout_the_exchange_fails_with_timeout_error(side: Side) -> None:
    with pytest.raises(TimeoutError):
        answer = await side.transport.handle(_get("/fhir/slow"))
        answer.close()


async def test_an_unreachable_or_failing_server_is_an_upstream_error() -> None:
    """(The double is told to fail by its function; the pool meets a closed port.)"""

    async def failing(sent: SentRequest) -> MockAnswer:
        raise UpstreamDisconnected("the upstream closed the connection")

    async with serving() as gone:
        closed = URL(str(gone.make_url("/"))).origin()
    pool = UpstreamPool(closed, timeout=1.0)
    try:
        sides: list[Transport] = [pool, MockTransport(failing)]
        for transport in sides:
            with pytest.raises(UpstreamError):
                answer = await transport.handle(_get("/fhir/Patient/1"))
                answer.close()
    finally:
        await pool.close()


async def test_the_double_counts_the_answers_left_open() -> None:
    async def ok(sent: SentRequest) -> MockAnswer:
        return MockAnswer(body=b"{}")

    double = MockTransport(ok)
    first = await double.handle(_get("/a"))
    await double.handle(_get("/b"))
    first.close()
    assert double.open == 1
    assert [sent.target for sent in double.sent] == ["/a", "/b"]
