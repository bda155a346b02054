"""Any bytes in the method, path, query and headers, thousands of cases (Hypothesis),
through a real proxy to a real FHIR server: every answer carries an ``X-Request-Id``
whose event is in the store (the request was forwarded and audited, or refused and
audited), the proxy never answers with its own 500, and it stays up."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import QUEUE, build_proxy_app, proxy_listener
from proxy.http.server import Server
from proxy.store.records import EventQuery
from tests.factories import (
    STOP_GRACE_S,
    request_id_of,
    settings_for,
    start_fhir_server,
    stop_fhir_server,
)


class ThreadedProxy:
    """A proxy on its own uvloop in a thread, so a synchronous Hypothesis test can drive
    it with plain sockets."""

    def __init__(self, upstream_url: str, store_dir: Path) -> None:
        self._settings = settings_for(upstream_url, store_dir)
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Server | None = None
        self.port = 0

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def __enter__(self) -> ThreadedProxy:
        self._thread.start()
        self.app = build_proxy_app(self._settings)

        async def start() -> int:
            self._server = Server(self.app, proxy_listener)
            await self._server.start(host="127.0.0.1", port=0)
            return self._server.port

        self.port = self.call(start())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self.call(self._server.stop(STOP_GRACE_S))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def recorded_request_ids(self) -> set[str | None]:
        async def read() -> set[str | None]:
            page, _ = await self.app[QUEUE].search(EventQuery(newest_first=False, limit=100_000))
            return {request_id_of(q.event) for q in page}

        result: set[str | None] = self.call(read())
        return result


def send(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


LINE = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
SEGMENTS = st.sampled_from(
    [b"Patient", b"Observation", b"p1", b"..", b".", b"", b"%2e%2e", b"%2E.", b"%2F", b"%64",
     b"_search", b"_history", b"$everything", b"metadata", b"__admin", b"\xe9", b"\xff\xfe",
     b"a b", b"%", b"?", b"\\"]
)  # fmt: skip
HEADER_NAMES = st.sampled_from(
    [b"X-Request-Id", b"Accept", b"Host", b"Authorization", b"Cookie", b"X-Forwarded-For",
     b"Content-Type", b"If-None-Exist", b"Prefer", b"X-Custom", b"If-Match", b"Transfer-Encoding"]
)  # fmt: skip
METHODS = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"PURGE", b"G\xe9T"]
)


@st.composite
def requests(draw: Any) -> bytes:
    method = draw(METHODS)
    path = b"/fhir/" + b"/".join(draw(st.lists(SEGMENTS, max_size=5)))
    query = draw(st.one_of(st.just(b""), LINE.map(lambda q: b"?" + q.replace(b" ", b"+"))))
    headers = draw(st.lists(st.tuples(HEADER_NAMES, LINE), max_size=5))
    body = draw(st.sampled_from([b"", b'{"resourceType":"Patient"}', b"name=x&access_token=s"]))
    lines = [method + b" " + path.replace(b" ", b"%20") + query + b" HTTP/1.1"]
    if not any(name == b"Host" for name, _ in headers):
        lines.append(b"Host: fuzz")
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
    request: bytes = b"\r\n".join(lines) + b"\r\n\r\n" + body
    return request


def test_any_request_is_audited_or_refused_never_a_500_and_the_proxy_stays_up(
    tmp_path: Path,
) -> None:
    fhir = start_fhir_server()  # its own server: fuzzed writes must not touch other tests'
    answered: list[tuple[int, str | None]] = []
    try:
        with ThreadedProxy(fhir.base_url, tmp_path) as proxy:

            @settings(
                max_examples=1500,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(requests())
            def one(request: bytes) -> None:
                response = send(proxy.port, request)
                head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
                status = int(head.split(" ", 2)[1])
                request_id = next(
                    (
                        line.split(":", 1)[1].strip()
                        for line in head.split("\r\n")[1:]
                        if line.lower().startswith("x-request-id:")
                    ),
                    None,
                )
                assert request_id is not None, f"no X-Request-Id: {request!r} -> {head}"
                assert b"Server got itself in trouble" not in response, request
                answered.append((status, request_id))

            one()
            recorded = proxy.recorded_request_ids()
            unaudited = [(s, r) for s, r in answered if r not in recorded]
            assert unaudited == [], f"answered without an event: {unaudited[:10]}"
            statuses = {s for s, _ in answered}
            assert {400, 404} <= statuses, statuses
            assert any(s < 300 for s in statuses), "some requests were forwarded"
            up = send(
                proxy.port, b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert up.startswith(b"HTTP/1.1 200"), "the proxy is still up"
    finally:
        stop_fhir_server(fhir)
