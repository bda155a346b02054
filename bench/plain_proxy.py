"""A bare aiohttp reverse proxy (no audit, no header rewriting): the Python floor that
bench_proxy.py compares fhir-audit-proxy with, so the ratio isolates what auditing costs.

    python bench/plain_proxy.py UPSTREAM_ORIGIN PORT
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web
from yarl import URL


async def main(origin: URL, port: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))

    async def forward(request: web.Request) -> web.Response:
        target = origin.join(URL(request.rel_url.raw_path_qs, encoded=True))
        headers = {"Accept": request.headers.get("Accept", "*/*")}
        async with session.request(request.method, target, headers=headers) as upstream:
            body = await upstream.read()
            content_type = upstream.headers.get("Content-Type", "application/octet-stream")
            return web.Response(
                status=upstream.status, body=body, headers={"Content-Type": content_type}
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(URL(sys.argv[1]), int(sys.argv[2])))
