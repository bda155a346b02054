"""The upstream client (``proxy/http/upstream.py``) against real sockets: servers that answer
as real ones do, and as broken ones do (closing, stalling, garbling, early hints), so each
path of the client is met over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.http.flow import HIGH_WATER
from proxy.http.transport import (
    Body,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamRequest,
)
from proxy.http.upstream import UpstreamPool, UpstreamResponse
from tests.factories import StartProxy, free_port, serving, write_certificate

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A TCP server running ``script`` for each connection; counts connections and
    keeps the raw requests it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                body = await reader.readexactly(int(line.split(b":")[1]))
            if line.lower() == b"transfer-encoding: chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
        self.requests.append(head + body)
        return head + body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def origin(self) -> URL:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}")


@contextlib.asynccontextmanager
async def scripted(script: Callable[[Scripted], Script]) -> AsyncIterator[Scripted]:
    holder = Scripted(lambda r, w: asyncio.sleep(0))
    holder.script = script(holder)
    holder.server = await asyncio.start_server(holder._handle, "127.0.0.1", 0)
    try:
        yield holder
    finally:
        holder.server.close()


def answer(body: bytes = b"{}", *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (
        len(body),
        b"".join(h + b"\r\n" for h in extra),
        body,
    )


def keep_answering(*answers: bytes) -> Callable[[Scripted], Script]:
    """Answers the n-th request the server reads (on any connection) with the n-th of
    ``answers`` (the last repeated)."""

    def script(server: Scripted) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await server.read_request(reader)
                writer.write(answers[min(len(server.requests) - 1, len(answers) - 1)])
                await writer.drain()

        return run

    return script


def answer_once(data: bytes = b"", *, stall: bool) -> Callable[[Scripted], Script]:
    """Reads one request, writes ``data`` (maybe nothing, maybe part of an answer), then
    holds the connection open without a word (``stall``) or closes it."""

    def script(server: Scripted) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(data)
            await writer.drain()
            if stall:
                await asyncio.sleep(30)

        return run

    return script


@contextlib.asynccontextmanager
async def answer_of(
    pool: UpstreamPool,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: Body = None,
) -> AsyncIterator[UpstreamResponse]:
    """The answer to one request through ``pool``, closed on exit (as forwarding does)."""
    answer = await pool.handle(
        UpstreamRequest(method=method, target=target, headers=headers, body=body)
    )
    try:
        yield answer
    finally:
        answer.close()


async def get(pool: UpstreamPool, target: str = "/fhir/Patient/1", method: str = "GET") -> bytes:
    async with answer_of(pool, method, target, [("Accept", "application/fhir+json")]) as answer:
        assert answer.status == 200
        return await answer.body.read()


async def test_connections_are_kept_alive_and_requests_are_written_as_sent() -> None:
    async with scripted(keep_answering(answer(b'{"a":1}'))) as server:
        pool = UpstreamPool(server.origin)
        try:
            assert await get(pool) == b'{"a":1}'
            assert await get(pool, "/fhir/Observation?patient=1&_count=2") == b'{"a":1}'
        finally:
            await pool.close()
        assert server.connections == 1
        first, second = server.requests
        assert first.startswith(b"GET /fhir/Patient/1 HTTP/1.1\r\n")
        assert second.startswith(b"GET /fhir/Observation?patient=1&_count=2 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{server.origin.port}\r\n".encode() in first
        assert b"Accept: application/fhir+json\r\n" in first
        assert b"Accept-Encoding: identity\r\n" in first, "the proxy reads what it audits"


async def test_bodies_are_sent_with_their_length_or_chunked() -> None:
    async def stream() -> AsyncIterator[bytes]:
        for part in (b'{"resourceType":', b"", b'"Patient"}'):
            yield part

    async with scripted(keep_answering(answer())) as server:
        pool = UpstreamPool(server.origin)
        try:
            async with answer_of(pool, "POST", "/fhir/Patient", [], b'{"x":1}') as a:
                await a.body.read()
            async with answer_of(pool, "POST", "/fhir/Patient", [], stream()) as a:
                await a.body.read()
            async with answer_of(pool, "POST", "/fhir/Patient/$validate", []) as a:
                await a.body.read()
        finally:
            await pool.close()
    sized, chunked, empty = server.requests
    assert b"Content-Length: 7\r\n" in sized and sized.endswith(b'\r\n\r\n{"x":1}')
    assert b"Transfer-Encoding: chunked\r\n" in chunked
    assert chunked.endswith(b'\r\n\r\n{"resourceType":"Patient"}')
    assert b"Content-Length: 0\r\n" in empty


async def test_chunked_answers_and_answers_ending_at_close_are_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    async with scripted(keep_answering(chunked)) as server:
        pool = UpstreamPool(server.origin)
        try:
            assert await get(pool) == b"hello world"
            assert await get(pool) == b"hello world"
        finally:
            await pool.close()
        assert server.connections == 1
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    async with scripted(answer_once(until_close, stall=False)) as server:
        pool = UpstreamPool(server.origin)
        try:
            assert await get(pool) == b"all of it"
            assert await get(pool) == b"all of it"
        finally:
            await pool.close()
        assert server.connections == 2, "a connection that closed is not reused"


async def test_a_head_answer_ends_at_its_headers_and_an_early_hint_is_skipped() -> None:
    hinted = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n" + answer(b"[1]")
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    async with scripted(keep_answering(head_answer, hinted)) as server:
        pool = UpstreamPool(server.origin)
        try:
            async with answer_of(pool, "HEAD", "/fhir/Patient/1", []) as head:
                assert head.status == 200 and head.headers["content-length"] == "100"
                assert await head.body.read() == b""
            assert await get(pool) == b"[1]"
        finally:
            await pool.close()


async def test_a_pooled_connection_the_server_closed_is_retried_only_when_idempotent() -> None:
    def one_answer_per_connection(server: Scripted) -> Script:
        """Answers as if keeping the connection alive, then closes it once the next
        request arrives, unanswered: the race with a server's keep-alive timeout."""

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(answer(b"ok"))
            await writer.drain()
            await server.read_request(reader)

        return run

    async with scripted(one_answer_per_connection) as server:
        pool = UpstreamPool(server.origin)
        try:
            assert await get(pool) == b"ok"
            assert await get(pool) == b"ok", "the GET was sent again on a new connection"
            assert server.connections == 2
            with pytest.raises(UpstreamDisconnected):
                async with answer_of(pool, "POST", "/fhir/Patient", [], b"{}"):
                    pass
            assert server.connections == 2, "a POST is never sent twice"
        finally:
            await pool.close()


async def test_a_connection_idle_past_the_limit_is_not_reused() -> None:
    async with scripted(keep_answering(answer())) as server:
        pool = UpstreamPool(server.origin, keepalive_s=0.05)
        try:
            await get(pool)
            await get(pool)
            assert server.connections == 1
            await asyncio.sleep(0.1)
            await get(pool)
            assert server.connections == 2
        finally:
            await pool.close()


async def test_the_timeout_bounds_the_head_and_the_body() -> None:
    half = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"
    for script in (answer_once(stall=True), answer_once(half, stall=True)):
        async with scripted(script) as server:
            pool = UpstreamPool(server.origin, timeout=0.3)
            try:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                with pytest.raises(TimeoutError):
                    await get(pool)
                assert loop.time() - t0 < 5
                assert not pool._idle and not pool._open, "the timed-out connection is gone"
            finally:
                await pool.close()


async def test_unreachable_garbled_and_cut_short_answers_are_errors() -> None:
    pool = UpstreamPool(URL(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(UpstreamConnectError):
        await get(pool)
    await pool.close()

    for script, error in (
        (keep_answering(b"SMTP ready\r\n\r\n"), UpstreamProtocolError),
        (
            answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", stall=False),
            UpstreamDisconnected,
        ),
    ):
        async with scripted(script) as server:
            pool = UpstreamPool(server.origin)
            try:
                with pytest.raises(error):
                    await get(pool)
            finally:
                await pool.close()


async def test_a_large_answer_is_buffered_only_as_far_as_it_is_read() -> None:
    size = 8 * 1024 * 1024
    sent_all = asyncio.Event()

    def large(server: Scripted) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()
            sent_all.set()

        return run

    async with scripted(large) as server:
        pool = UpstreamPool(server.origin)
        try:
            async with answer_of(pool, "GET", "/fhir/Binary/1", []) as big:
                await asyncio.sleep(0.5)  # the client reads nothing meanwhile
                assert big.body._size <= HIGH_WATER + 256 * 1024
                assert not sent_all.is_set(), "the server is held back, not the client's memory"
                received = 0
                while chunk := await big.body.read_chunk():
                    received += len(chunk)
                assert received == size
        finally:
            await pool.close()


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    async with scripted(keep_answering(answer(b"x" * 500_000))) as server:
        pool = UpstreamPool(server.origin)
        try:
            async with answer_of(pool, "GET", "/fhir/Binary/1", []) as a:
                assert a.status == 200
            await get(pool)
        finally:
            await pool.close()
        assert server.connections == 2


async def test_requests_past_max_connections_wait_for_a_free_one() -> None:
    seen: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        seen.append(request.path)
        await asyncio.sleep(0.2)
        return web.json_response({})

    async with serving(("GET", "/{tail:.*}", slow)) as server:
        pool = UpstreamPool(server.make_url("/").origin(), max_connections=1)
        try:
            first = asyncio.create_task(get(pool, "/a"))
            second = asyncio.create_task(get(pool, "/b"))
            await asyncio.sleep(0.1)
            assert seen == ["/a"], "the second request waits for the only connection"
            await asyncio.gather(first, second)
            assert seen == ["/a", "/b"]
        finally:
            await pool.close()


async def test_waiting_for_a_connection_counts_against_the_timeout() -> None:
    async with scripted(answer_once(stall=True)) as server:
        pool = UpstreamPool(server.origin, max_connections=1, timeout=1.0)
        loop = asyncio.get_running_loop()
        ended: list[float] = []

        async def timed_get() -> BaseException | None:
            try:
                await get(pool)
            except TimeoutError as exc:
                return exc
            finally:
                ended.append(loop.time())
            return None

        try:
            first, second = await asyncio.gather(timed_get(), timed_get())
            assert isinstance(first, TimeoutError) and isinstance(second, TimeoutError)
            assert ended[1] - ended[0] < 0.8, (
                "the second's timeout ran from its start, not from the first's end"
            )
            assert not pool._slots.locked(), "every slot was given back"
        finally:
            await pool.close()


async def test_an_https_upstream_is_verified_against_the_trusted_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert = write_certificate(tmp_path, "fhir.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, tmp_path / "key.pem")

    async def patient(request: web.Request) -> web.Response:
        return web.json_response({"resourceType": "Patient", "id": "1"})

    app = web.Application()
    app.router.add_get("/fhir/Patient/1", patient)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        untrusted = UpstreamPool(URL(f"https://127.0.0.1:{port}"))
        with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get(untrusted)
        await untrusted.close()

        # The deployment's trust store (SSL_CERT_FILE, or the image's CA bundle).
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusted = UpstreamPool(URL(f"https://127.0.0.1:{port}"))
        try:
            for _ in range(2):  # the second on the kept-alive TLS connection
                assert json.loads(await get(trusted)) == {"resourceType": "Patient", "id": "1"}
        finally:
            await trusted.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/fhir/Patient/1 HTTP/1.1\r\nX-Smuggled: 1\r\n\r\nGET /admin", []),
        ("/fhir/Patient/1", [("X-Note", "a\r\nAuthorization: Bearer stolen")]),
        ("/fhir/Patient/1", [("X-Note\nX-Other", "b")]),
    ],
    ids=["target", "value", "name"],
)
async def test_a_line_break_never_reaches_the_upstream(
    target: str, headers: list[tuple[str, str]]
) -> None:
    async with scripted(keep_answering(answer())) as server:
        pool = UpstreamPool(server.origin)
        try:
            with pytest.raises(UpstreamProtocolError, match="line break"):
                async with answer_of(pool, "GET", target, headers):
                    pass
            await get(pool)
        finally:
            await pool.close()
        assert len(server.requests) == 1, "only the clean request was written"


@pytest.mark.parametrize(("keepalive_s", "connections"), [(4.0, 1), (0.05, 2)])
async def test_the_proxy_reuses_upstream_connections_as_upstream_keepalive_s_says(
    keepalive_s: float, connections: int, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    patient = b'{"resourceType":"Patient","id":"1"}'
    async with scripted(keep_answering(answer(patient))) as server:
        url = f"{server.origin}/fhir"
        proxy = await start_proxy(url, upstream={"url": url, "keepalive_s": keepalive_s})
        for _ in range(2):
            async with http.get(f"{proxy.url}/Patient/1") as r:
                assert r.status == 200 and await r.read() == patient
            await asyncio.sleep(0.1)
        assert server.connections == connections


TOO_LARGE = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/fhir+json\r\n"
    b'Content-Length: 27\r\nConnection: %b\r\n\r\n{"resourceType":"Outcome"}\n'
)


def answer_early(close: bool) -> Callable[[Scripted], Script]:
    """Reads a request's head only, answers 413 at once, then closes the connection or
    holds it open without reading on (as a server with a body limit does)."""

    def script(server: Scripted) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(TOO_LARGE % (b"close" if close else b"keep-alive"))
            await writer.drain()
            if not close:
                await asyncio.sleep(30)

        return run

    return script


@pytest.mark.parametrize("close", [True, False])
async def test_an_answer_before_the_body_is_sent_whole_stops_the_body_and_stands(
    close: bool,
) -> None:
    sent: list[int] = []

    async def large() -> AsyncIterator[bytes]:
        for n in range(2000):  # 128 MB, if it were all sent
            sent.append(n)
            yield b"x" * 65536
            await asyncio.sleep(0.001)

    async with scripted(answer_early(close)) as server:
        pool = UpstreamPool(server.origin, timeout=20)
        try:
            async with answer_of(pool, "POST", "/fhir/Binary", [], large()) as a:
                assert a.status == 413
                assert await a.body.read() == b'{"resourceType":"Outcome"}\n'
            assert len(sent) < 2000, "the body stopped once the answer came"
            assert pool._idle == [] or all(c.closed for c in pool._idle), "not reused"
        finally:
            await pool.close()


def close_after_head() -> Callable[[Scripted], Script]:
    """Reads a request's head only, then closes the connection without a word."""

    def script(server: Scripted) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.requests.append(await reader.readuntil(b"\r\n\r\n"))
            await asyncio.sleep(0.05)

        return run

    return script


@pytest.mark.parametrize(
    ("script", "status", "outcome", "said"),
    [
        (answer_early(close=True), 413, "4", "HTTP 413"),
        (close_after_head(), 502, "12", "upstream unreachable"),
    ],
    ids=["answered early", "closed without an answer"],
)
async def test_what_the_upstream_did_with_a_streamed_body_is_passed_on_and_audited(
    script: Callable[[Scripted], Script],
    status: int,
    outcome: str,
    said: str,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with scripted(script) as server:
        url = f"{server.origin}/fhir"
        proxy = await start_proxy(url, audit={"buffer_limit_bytes": 65536})
        body = io.BytesIO(b'{"resourceType":"Binary","data":"' + b"A" * 4_000_000 + b'"}')
        async with http.post(
            f"{proxy.url}/Binary", data=body, headers={"Content-Type": "application/fhir+json"}
        ) as r:
            assert r.status == status
        (event,) = await proxy.stored_events()
        assert event["outcome"] == outcome and said in event["outcomeDesc"]
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "handler" in r.message]


async def _stream_part_of_a_body(
    start_proxy: StartProxy, *, leave: bool, **overrides: Any
) -> tuple[dict[str, Any], bytes]:
    """Through a proxy, send the head of a 10 MB upload and 1 MB of its body to a server
    that reads what comes; then leave (``leave``) or stall. The one event stored, and what
    the client was answered."""
    received = asyncio.Event()

    async def upstream(request: web.Request) -> web.Response:
        with contextlib.suppress(aiohttp.ClientPayloadError, ConnectionError):
            async for _ in request.content.iter_any():
                received.set()
        return web.json_response({"resourceType": "Binary", "id": "b"}, status=201)

    async with serving(("*", "/{tail:.*}", upstream)) as server:
        proxy = await start_proxy(
            str(server.make_url("/fhir")), audit={"buffer_limit_bytes": 65536}, **overrides
        )
        reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
        writer.write(
            b"POST /fhir/Binary HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
            b"Content-Length: 10000000\r\n\r\n" + b"A" * 1_000_000
        )
        await writer.drain()
        async with asyncio.timeout(10):
            await received.wait()
        answer = b""
        if leave:
            writer.transport.abort()
        else:
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
        async with asyncio.timeout(10):
            while not (events := await proxy.stored_events()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    (event,) = events
    return event, answer


async def test_a_client_that_leaves_during_a_streamed_body_is_audited(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    event, _ = await _stream_part_of_a_body(start_proxy, leave=True)
    assert event["outcome"] != "0"
    assert "did not arrive whole" in event["outcomeDesc"]
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "handler" in r.message]


async def test_a_body_that_stalls_is_bounded_by_the_upstream_timeout(
    start_proxy: StartProxy,
) -> None:
    event, answer = await _stream_part_of_a_body(
        start_proxy, leave=False, upstream={"timeout_s": 1}
    )
    assert answer.startswith(b"HTTP/1.1 504")
    assert event["outcome"] != "0" and "timed out" in event["outcomeDesc"]
