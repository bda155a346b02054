"""The proxy application's wiring: what its upstream session does between requests."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import build_proxy_app
from tests.factories import serving, settings_for


async def test_upstream_cookies_never_travel_to_another_clients_request(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The proxy is no browser: a cookie one client's answer set upstream is passed back
    to that client only, never kept and sent upstream with the next request."""
    received: list[str | None] = []

    async def upstream(request: web.Request) -> web.Response:
        received.append(request.headers.get("Cookie"))
        response = web.json_response(
            {"resourceType": "Patient", "id": "1"}, content_type="application/fhir+json"
        )
        response.set_cookie("session", "alice-session-secret", path="/")
        return response

    async with serving(("GET", "/fhir/{tail:.*}", upstream)) as fhir:
        # A host name (not an IP literal, whose cookies aiohttp's jar refuses anyway).
        base = f"http://localhost:{fhir.port}/fhir"
        server = TestServer(build_proxy_app(settings_for(base, tmp_path)), host="127.0.0.1")
        await server.start_server()
        try:
            for _ in range(2):
                async with http.get(server.make_url("/fhir/Patient/1")) as response:
                    assert response.status == 200
                    assert "alice-session-secret" in response.headers["Set-Cookie"]
        finally:
            await server.close()
    assert received == [None, None]
