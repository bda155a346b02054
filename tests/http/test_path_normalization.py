"""What is forwarded is what is audited: the path is normalized once, classified and
forwarded in that form; paths outside the FHIR base are refused unless allowed; every
request that is not GET, HEAD or OPTIONS has a durable intent before it is forwarded."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from proxy.http.forward import PathRefused, normalize_path
from tests.factories import FhirDouble, StartProxy, request_id_of, serving


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/fhir/Patient/1", "/fhir/Patient/1"),
        ("/fhir/Patient//del2", "/fhir/Patient/del2"),
        ("/fhir/Patient/", "/fhir/Patient"),
        ("/fhir/./Patient/1", "/fhir/Patient/1"),
        ("/fhir/../__admin/x", "/__admin/x"),
        ("/fhir/%2e%2e/__admin/x", "/__admin/x"),
        ("/fhir/%2E./__admin/x", "/__admin/x"),
        ("/fhir/Patient/%64el2", "/fhir/Patient/del2"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/fhir/Patient?x", "/fhir/Patient?x"),
        ("/fhir/Patient/a%20b", "/fhir/Patient/a%20b"),
        ("/fhir/Patient/a%c3%a9", "/fhir/Patient/a%C3%A9"),
        ("/", "/"),
        ("", "/"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw", ["/fhir/Patient%2Fdel2", "/fhir/Patient%2fdel2", "/fhir/a%5Cb", "/fhir/a\\b", "/a%00"]
)
def test_ambiguous_paths_are_refused(raw: str) -> None:
    with pytest.raises(PathRefused):
        normalize_path(raw)


def _subtypes(event: dict[str, Any]) -> list[str]:
    return [c["code"] for c in event.get("subtype", [])]


async def test_a_delete_with_an_empty_segment_is_audited_as_what_it_deletes(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double)
    async with http.put(
        f"{proxy.url}/Patient/del2",
        json={"resourceType": "Patient", "id": "del2"},
        headers={"Content-Type": "application/fhir+json"},
    ) as r:
        assert r.status in (200, 201)
    url = URL(f"{proxy.url}/Patient//del2", encoded=True)
    async with http.delete(url, headers={"X-Request-Id": "del-empty"}) as r:
        assert r.status == 200
    assert fhir_double.sent[-1].target == "/fhir/Patient/del2", "forwarded as normalized"
    assert "Patient/del2" not in fhir_double.resources, "the server deleted Patient/del2"
    (event,) = [e for e in await proxy.stored_events() if request_id_of(e) == "del-empty"]
    assert event["action"] == "D"
    assert _subtypes(event) == ["delete"]
    refs = [e["what"].get("reference") for e in event["entity"]]
    assert "Patient/del2" in refs


@pytest.mark.parametrize(
    "path", ["/fhir/../__admin/x", "/fhir/%2e%2e/__admin/x", "/__admin/x", "/fhirx/Patient"]
)
async def test_paths_outside_the_base_are_refused_404_and_audited(
    start_proxy: StartProxy, http: aiohttp.ClientSession, path: str
) -> None:
    seen: list[str] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"admin": "secret"})

    async with serving(("*", "/{tail:.*}", upstream)) as server:
        proxy = await start_proxy(str(server.make_url("/fhir")))
        origin = proxy.url.removesuffix("/fhir")
        url = URL(origin + path, encoded=True)
        async with http.post(url, data=b"{}", headers={"X-Request-Id": "out-1"}) as r:
            assert r.status == 404
            assert r.headers["X-Request-Id"] == "out-1"
            outcome = await r.json(content_type=None)
        assert outcome["issue"][0]["code"] == "not-found"
        assert seen == []
        (event,) = await proxy.stored_events()
        assert request_id_of(event) == "out-1"
        assert event["outcome"] == "4"
        assert "outside the FHIR base" in event["outcomeDesc"]


async def test_an_allowed_path_outside_the_base_is_forwarded_and_audited(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    seen: list[str] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"issuer": "x"})

    async with serving(("*", "/{tail:.*}", upstream)) as server:
        proxy = await start_proxy(
            str(server.make_url("/fhir")),
            audit={"forward_outside_base": ["/.well-known"]},
        )
        origin = proxy.url.removesuffix("/fhir")
        async with http.get(f"{origin}/.well-known/smart-configuration") as r:
            assert r.status == 200
        async with http.get(f"{origin}/.well-knownx") as r:
            assert r.status == 404
        assert seen == ["/.well-known/smart-configuration"]
        events = await proxy.stored_events()
        assert len(events) == 2


@pytest.mark.parametrize(
    ("method", "path", "body", "limit"),
    [
        # a POST to the base that is no batch/transaction Bundle: UNKNOWN
        ("POST", "", b'{"resourceType":"Patient"}', None),
        # a body over the buffer limit streams on unread: UNKNOWN (the 9 MiB Bundle)
        (
            "POST",
            "",
            orjson.dumps({"resourceType": "Bundle", "type": "transaction"}) + b" " * 4096,
            1024,
        ),
        ("DELETE", "Patient//x1", None, None),
        # a PATCH no FHIR interaction matches: UNKNOWN (a PURGE is refused, never forwarded)
        ("PATCH", "Patient/x1/not/an/interaction", b"[]", None),
        ("POST", "Patient/_search", b"name=x", None),
    ],
)
async def test_every_unsafe_method_has_an_intent_before_it_is_forwarded(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: bytes | None,
    limit: int | None,
) -> None:
    """While the upstream works on the request, the intent is already durable: a crash
    then leaves an outcome-unknown event instead of nothing."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def upstream(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.json_response({"resourceType": "Bundle", "type": "transaction-response"})

    async with serving(("*", "/{tail:.*}", upstream)) as server:
        overrides: dict[str, Any] = {}
        if limit is not None:
            overrides["audit"] = {"buffer_limit_bytes": limit}
        proxy = await start_proxy(str(server.make_url("/fhir")), **overrides)
        url = URL(f"{proxy.url}/{path}", encoded=True)
        headers = {"X-Request-Id": "intent-1"}
        if path.endswith("_search"):
            headers["Content-Type"] = "application/x-www-form-urlencoded"

        async def send() -> int:
            async with http.request(method, url, data=body, headers=headers) as r:
                return r.status

        task = asyncio.create_task(send())
        try:
            await asyncio.wait_for(arrived.wait(), 10)
            intents = await proxy.queue.orphan_intents()
            assert [i.summary["request_id"] for i in intents] == ["intent-1"]
        finally:
            release.set()
            status = await task
        assert status == 200
        assert await proxy.queue.orphan_intents() == [], "the answer completed the intent"
        (event,) = await proxy.stored_events()
        assert request_id_of(event) == "intent-1"
