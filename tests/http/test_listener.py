"""The proxy listener's HTTP/1.1 (proxy/http/listener.py), over real sockets, with handlers of
the tests' own: framing, keep-alive, pipelining, bodies and flow control, limits, streamed
answers, clients that leave, idle connections and shutdown. That the proxy audits what the
listener refuses is tested at the end."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.http.flow import BodyTimedOut
from proxy.http.listener import ClientRequest, Listener
from proxy.http.response import Response
from tests.factories import (
    NodeFhirServer,
    ProxyProcess,
    StartProxy,
    free_port,
    raw_body,
    raw_http,
    raw_status,
    request_id_of,
    serving,
)

Handler = Callable[[ClientRequest], Awaitable[Response]]


def answer(status: int, headers: dict[str, str], body: bytes, keep_alive: bool = True) -> Response:
    return Response(status=status, headers=headers, body=body, keep_alive=keep_alive)


class Chunks:
    """A streamed body from a list of chunks, which records whether it was closed."""

    def __init__(self, *parts: bytes, fail_after: int | None = None) -> None:
        self.parts = list(parts)
        self.fail_after = fail_after
        self.sent = 0
        self.was_closed = asyncio.Event()

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise RuntimeError("the source broke off")
        if self.sent >= len(self.parts):
            raise StopAsyncIteration
        self.sent += 1
        await asyncio.sleep(0)
        return self.parts[self.sent - 1]

    @property
    def closed(self) -> bool:
        return self.was_closed.is_set()

    async def aclose(self) -> None:
        self.was_closed.set()


class Refusals:
    """The refusal hook: records what it was given, answers a 4xx."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    async def __call__(self, peer: str, status: int, reason: str) -> Response:
        self.seen.append((peer, status, reason))
        return answer(status, {"Content-Type": "text/plain"}, reason.encode(), keep_alive=False)


@contextlib.asynccontextmanager
async def listening(
    handler: Handler, refusals: Refusals | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Listener, int]]:
    listener = Listener(handler, refusals or Refusals(), **kwargs)
    server = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
    try:
        yield listener, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await listener.shutdown(1)
        await server.wait_closed()


async def talk(port: int, data: bytes, *, wait: float = 5) -> bytes:
    """Send ``data``, then read until the listener closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            return await reader.read()
    finally:
        writer.close()


async def echo(request: ClientRequest) -> Response:
    body = b""
    if request.body is not None:
        body = b"".join([chunk async for chunk in request.body])
    text = f"{request.method} {request.raw_path}?{request.raw_query} {len(body)}"
    return answer(200, {"X-Echo": text}, body or text.encode())


async def test_requests_on_one_connection_are_answered_in_order_and_http_1_0_closes() -> None:
    async with listening(echo) as (_, port):
        raw = await talk(
            port,
            b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        assert raw.count(b"HTTP/1.1 200 OK") == 3
        assert raw.index(b"X-Echo: GET /a?x=1 0") < raw.index(b"X-Echo: POST /b? 3")
        assert raw.index(b"X-Echo: POST /b? 3") < raw.index(b"X-Echo: GET /c? 0")
        assert raw.endswith(b"Connection: close\r\n\r\nGET /c? 0")
        # HTTP/1.0 without keep-alive: answered, then closed (talk returns at the close).
        raw = await talk(port, b"GET /d HTTP/1.0\r\n\r\n")
        assert b"Connection: close" in raw and raw.endswith(b"GET /d? 0")
        raw = await talk(
            port,
            b"GET /e HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /f HTTP/1.0\r\n\r\n",
        )
        assert b"Connection: keep-alive" in raw and raw.endswith(b"GET /f? 0")


async def test_a_pipelined_request_waits_for_the_answer_before_it() -> None:
    order: list[str] = []

    async def slow_first(request: ClientRequest) -> Response:
        order.append(f"start {request.raw_path}")
        if request.raw_path == "/slow":
            await asyncio.sleep(0.2)
        order.append(f"end {request.raw_path}")
        return answer(200, {}, request.raw_path.encode())

    async with listening(slow_first) as (_, port):
        raw = await talk(
            port,
            b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nGET /fast HTTP/1.1\r\nHost: h\r\n"
            b"Connection: close\r\n\r\n",
        )
    assert order == ["start /slow", "end /slow", "start /fast", "end /fast"]
    assert raw.index(b"\r\n\r\n/slow") < raw.index(b"\r\n\r\n/fast")


async def test_bodies_arrive_whole_chunked_or_larger_than_the_high_water_mark() -> None:
    async with listening(echo) as (_, port):
        raw = await talk(
            port,
            b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        assert raw.endswith(b"abcde")
        big = bytes(range(256)) * 8192  # 2 MiB: reading pauses and resumes many times
        raw = await talk(
            port,
            b"POST /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            + f"Content-Length: {len(big)}\r\n\r\n".encode()
            + big,
        )
        assert raw.endswith(big)


async def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_read() -> None:
    async with listening(echo) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"PUT /p HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n"
        )
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"ok")
            raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"ok")


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, "target is too long"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nCookie: " + b"c" * 9000 + b"\r\n\r\n", 431, "too long"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(200)) + b"\r\n",
            431,
            "too many header lines",
        ),
        (
            b"GET / HTTP/1.1\r\nAuthorization: Bearer secret-token\x01\r\n\r\n",
            400,
            "HttpParserError: Invalid header value char",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "HttpParserError",
        ),
    ],
)
async def test_a_request_the_parser_refuses_goes_to_the_refusal_hook_without_its_bytes(
    request_bytes: bytes, status: int, reason: str
) -> None:
    handled: list[str] = []

    async def handler(request: ClientRequest) -> Response:
        handled.append(request.raw_path)
        return answer(200, {}, b"")

    refusals = Refusals()
    async with listening(handler, refusals) as (_, port):
        raw = await talk(port, request_bytes)
    assert raw_status(raw) == status
    assert handled == []
    ((peer, seen_status, seen_reason),) = refusals.seen
    assert (peer, seen_status) == ("127.0.0.1", status)
    assert reason in seen_reason
    assert b"secret" not in raw and "secret" not in seen_reason


async def test_a_refused_request_after_good_ones_is_answered_after_them() -> None:
    refusals = Refusals()
    async with listening(echo, refusals) as (_, port):
        raw = await talk(
            port,
            b"GET /one HTTP/1.1\r\nHost: h\r\n\r\nGET /two HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /three HTTP/1.1\r\nBad\x01Header: x\r\n\r\n",
        )
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.index(b"GET /one") < raw.index(b"GET /two") < raw.index(b"HTTP/1.1 400")
    assert b"Connection: close" not in raw.split(b"HTTP/1.1 400")[0]
    assert [status for _, status, _ in refusals.seen] == [400]


async def test_a_streamed_answer_is_chunked_to_http_1_1_and_close_delimited_to_http_1_0() -> None:
    streams: list[Chunks] = []

    async def stream(request: ClientRequest) -> Response:
        body = Chunks(b"one ", b"", b"two ", b"three")
        streams.append(body)
        return Response(status=200, headers={"Content-Type": "text/plain"}, stream=body)

    async with listening(stream) as (_, port):
        raw = await talk(port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in raw
        assert raw.endswith(b"4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n")
        raw = await talk(port, b"GET / HTTP/1.0\r\n\r\n")
        assert b"Transfer-Encoding" not in raw and raw.endswith(b"\r\n\r\none two three")
        raw = await talk(port, b"HEAD / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert raw.endswith(b"\r\n\r\n"), "a HEAD answer has no body"
    assert [body.closed for body in streams] == [True, True, True]


async def test_a_streamed_answer_of_known_length_is_sent_with_it_on_a_kept_connection() -> None:
    async def stream(request: ClientRequest) -> Response:
        return Response(status=200, headers={}, stream=Chunks(b"ab", b"cde"), length=5)

    async with listening(stream) as (_, port):
        raw = await talk(
            port,
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n"
            b"Connection: close\r\n\r\n",
        )
    assert raw.count(b"Content-Length: 5\r\n") == 2 and b"chunked" not in raw
    assert raw.count(b"\r\n\r\nabcde") == 2


async def test_a_stream_that_breaks_off_cuts_the_answer_short_and_is_closed() -> None:
    """The client must never take a broken body for whole: a chunked answer gets no last
    chunk, one of known length no more bytes, and the connection is aborted."""
    streams: list[Chunks] = []

    async def stream(request: ClientRequest) -> Response:
        body = Chunks(b"one ", b"two ", b"three", fail_after=2)
        streams.append(body)
        length = 13 if request.raw_path == "/sized" else None
        return Response(status=200, headers={}, stream=body, length=length)

    async with listening(stream) as (_, port):
        raw = await talk(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert raw.endswith(b"4\r\none \r\n4\r\ntwo \r\n"), "no last chunk"
        raw = await talk(port, b"GET /sized HTTP/1.1\r\nHost: h\r\n\r\n")
        assert b"Content-Length: 13" in raw and raw.endswith(b"\r\n\r\none two ")
    assert [body.closed for body in streams] == [True, True]


async def test_a_client_that_leaves_does_not_cancel_the_handler() -> None:
    """The handler runs to its end, and the stream it answered with is closed when the
    client is gone before it or leaves half-way (the stream lets go of what it holds)."""
    bodies = [Chunks(*[b"x" * 65536] * 10_000) for _ in range(2)]

    async def stream(request: ClientRequest) -> Response:
        await asyncio.sleep(0.05)  # not cancelled by the client's leaving
        return Response(status=200, headers={}, stream=bodies[request.raw_path == "/2"])

    async with listening(stream) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await writer.drain()
        writer.transport.abort()  # gone before the answer
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        await reader.readexactly(100_000)
        writer.transport.abort()  # gone half-way
        async with asyncio.timeout(10):
            for body in bodies:
                await body.was_closed.wait()
    assert bodies[0].sent <= 1
    assert 1 <= bodies[1].sent < 10_000


async def test_an_idle_connection_is_closed_after_the_keepalive_time() -> None:
    async with listening(echo, keepalive_s=0.2) as (listener, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"\r\n\r\nGET /? 0")
            assert await reader.read() == b"", "closed by the listener once idle"
        writer.close()
        assert listener.connections == set()


async def test_shutdown_lets_the_answers_in_flight_finish_and_closes_idle_connections() -> None:
    started = asyncio.Event()
    late_started = asyncio.Event()

    async def slow(request: ClientRequest) -> Response:
        if request.raw_path == "/slow":
            started.set()
            async with asyncio.timeout(10):  # in flight until the late one has begun
                await late_started.wait()
        elif request.raw_path == "/late":
            late_started.set()
            await asyncio.sleep(0.1)
        return answer(200, {}, b"done")

    listener = Listener(slow, Refusals())
    server = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n")
    await idle_reader.readuntil(b"done")
    late_reader, late_writer = await asyncio.open_connection("127.0.0.1", port)
    late_writer.write(b"GET /late HTTP/1.1\r\nHost: h\r\n")  # its head is still arriving
    busy = asyncio.create_task(talk(port, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n"))
    await started.wait()
    server.close()
    stopping = asyncio.create_task(listener.shutdown(5))
    await asyncio.sleep(0.1)
    late_writer.write(b"\r\n")  # a request begun during the grace is answered within it
    raw = await busy
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"done")
    assert b"Connection: close" in raw
    async with asyncio.timeout(5):
        late = await late_reader.read()
        assert late.startswith(b"HTTP/1.1 200 OK") and late.endswith(b"done")
        assert await idle_reader.read() == b""
    await stopping
    idle_writer.close()
    late_writer.close()
    await server.wait_closed()


async def test_a_header_that_would_add_a_line_is_never_sent() -> None:
    async def injecting(request: ClientRequest) -> Response:
        return answer(200, {"X-Bad": "a\r\nSet-Cookie: stolen=1"}, b"body")

    async with listening(injecting) as (_, port):
        raw = await talk(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert b"Set-Cookie" not in raw and b"body" not in raw


async def test_a_handler_that_fails_answers_500_and_an_upgrade_ends_the_connection() -> None:
    async def failing(request: ClientRequest) -> Response:
        if request.raw_path == "/fail":
            raise RuntimeError("bug")
        return answer(200, {}, b"plain")

    async with listening(failing) as (_, port):
        raw = await talk(port, b"GET /fail HTTP/1.1\r\nHost: h\r\n\r\n")
        assert raw_status(raw) == 500
        assert orjson.loads(raw_body(raw))["resourceType"] == "OperationOutcome"
        raw = await talk(
            port,
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"not http at all",
        )
        assert raw_status(raw) == 200 and raw.endswith(b"plain")


async def test_a_head_that_does_not_arrive_in_time_is_answered_408_and_closed() -> None:
    handled: list[str] = []
    refusals = Refusals()

    async def handler(request: ClientRequest) -> Response:
        handled.append(request.raw_path)
        return answer(200, {}, b"served")

    async with listening(handler, refusals, header_timeout_s=0.3) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /never HTTP/1.1\r\nHost: h\r\n")  # the head never ends
        async with asyncio.timeout(5):
            raw = await reader.read()
        writer.close()
        assert raw_status(raw) == 408
        assert b"Connection: close" in raw
        assert orjson.loads(raw_body(raw))["issue"][0]["code"] == "timeout"

        # A head in parts, whole in time, is served; then the connection idles without a
        # byte of another request: the keep-alive time decides about that, not this one.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"Host: h\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"served")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.6):
                await reader.read(1)
        writer.close()
    assert handled == ["/slow"]
    assert refusals.seen == [], "nothing of the request was identified: not a refusal to audit"


async def test_a_body_that_stops_arriving_fails_its_read_in_time() -> None:
    async def reading(request: ClientRequest) -> Response:
        assert request.body is not None
        try:
            size = sum([len(chunk) async for chunk in request.body])
        except BodyTimedOut as exc:
            return answer(408, {}, str(exc).encode())
        return answer(200, {}, f"whole {size}".encode())

    async with listening(reading, body_timeout_s=0.3) as (_, port):
        for stalled in (
            b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc",
            b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ):
            raw = await talk(port, stalled)  # returns when the listener closes
            assert raw_status(raw) == 408, raw
            assert raw.endswith(b"no byte of the request body for 0.3 s")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nabc")
        await asyncio.sleep(0.1)
        writer.write(b"def")
        async with asyncio.timeout(5):
            await reader.readuntil(b"whole 6")
        writer.close()


# --- through the proxy: what the listener refuses is audited ----------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /fhir/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n", 414),
        (b"GET /fhir/Patient HTTP/1.1\r\nHost: x\r\nCookie: session=" + b"s" * 9000 + b"\r\n", 431),
    ],
)
async def test_a_head_past_the_limits_is_answered_with_an_outcome_and_audited(
    start_proxy: StartProxy, head: bytes, status: int
) -> None:
    proxy = await start_proxy("http://127.0.0.1:9/fhir")
    raw = await raw_http(proxy.server.host, proxy.server.port, head + b"Connection: close\r\n\r\n")
    assert raw_status(raw) == status
    assert orjson.loads(raw_body(raw))["resourceType"] == "OperationOutcome"
    (event,) = await proxy.stored_events()
    assert event["outcome"] == "4"
    assert event["outcomeDesc"].count("malformed HTTP request") == 1, "said once"
    assert f"HTTP {status}" in event["outcomeDesc"]
    assert b"sssss" not in orjson.dumps(event)


async def test_a_request_whose_head_or_body_does_not_arrive_is_answered_408(
    start_proxy: StartProxy,
) -> None:
    """A head not whole in time: 408, nothing to audit. A body that stops arriving: 408,
    audited as the interaction its head says, never forwarded when it was to be buffered,
    and cut off upstream when it was streaming there."""
    forwarded: list[tuple[str, int]] = []

    async def upstream(request: web.Request) -> web.Response:
        size = -1
        with contextlib.suppress(Exception):  # the proxy drops a cut-off body's connection
            size = len(await request.read())
        forwarded.append((request.headers["X-Request-Id"], size))
        return web.json_response({"resourceType": "Patient", "id": "p1"}, status=201)

    async with serving(("*", "/{tail:.*}", upstream)) as server:
        proxy = await start_proxy(
            str(server.make_url("/fhir")),
            listen={"header_timeout_s": 0.5, "body_timeout_s": 0.5},
            audit={"buffer_limit_bytes": 1024},
        )
        host, port = proxy.server.host, proxy.server.port
        raw = await raw_http(host, port, b"GET /fhir/Patient HTTP/1.1\r\nHost: x\r\n")
        assert raw_status(raw) == 408
        assert await proxy.stored_events() == []

        head = "POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
        raw = await raw_http(
            host,
            port,
            f"{head}X-Request-Id: buffered\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"resourceType": "Patient"',
        )
        assert raw_status(raw) == 408
        assert orjson.loads(raw_body(raw))["resourceType"] == "OperationOutcome"
        raw = await raw_http(
            host,
            port,
            f"{head}X-Request-Id: streamed\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"800\r\n"
            + b" " * 2048
            + b"\r\n",
        )
        assert raw_status(raw) == 408
    events = {request_id_of(e): e for e in await proxy.stored_events()}
    assert set(events) == {"buffered", "streamed"}
    for event in events.values():
        assert event["action"] == "C" and event["outcome"] != "0"
        assert "no byte of the request body for 0.5 s" in event["outcomeDesc"]
    assert all(rid == "streamed" and size < 2048 for rid, size in forwarded), forwarded


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("workers", [1, 2])
async def test_listening_on_double_colon_takes_both_families(
    fhir_server: NodeFhirServer, tmp_path: Path, workers: int
) -> None:
    """``listen.host: "::"`` (what the injector gives a sidecar): IPv4 and IPv6 clients are
    both served, with one worker and with several (asyncio alone binds "::" for IPv6)."""
    port = free_port()
    config = {
        "listen": {"host": "::", "port": port},
        "upstream": {"url": fhir_server.base_url},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "store": {"path": str(tmp_path / "audit.db")},
        "workers": workers,
    }
    proxy = ProxyProcess(config, tmp_path, own_group=True)
    async with aiohttp.ClientSession() as http:
        await proxy.start(http)
        try:
            for host in ("127.0.0.1", "[::1]"):
                async with http.get(f"http://{host}:{port}/fhir/metadata") as answer:
                    assert answer.status == 200, host
        finally:
            await proxy.stop()
