"""A bare aiohttp reverse proxy (no audit, no header rewriting): the Python floor that
bench_proxy.py compares fhir-audit-proxy with, so the ratio isolates what auditing costs.
It passes the method, the request body and the headers a FHIR client needs through, and
buffers each response whole, as fhir-audit-proxy does below its buffer limit.

    python bench/plain_proxy.py UPSTREAM_ORIGIN PORT

The port is bound with SO_REUSEPORT: N of these on one port are the bare stack with N
processes, what ``bench_proxy.py --workers N`` compares N workers with.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web
from yarl import URL

_PASSED = ("Accept", "Content-Type", "Prefer", "If-Match", "If-None-Exist")
_RETURNED = ("Content-Type", "Location", "ETag", "Last-Modified")


async def main(origin: URL, port: int) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100), auto_decompress=False
    )

    async def forward(request: web.Request) -> web.Response:
        target = origin.join(URL(request.rel_url.raw_path_qs, encoded=True))
        headers = {k: request.headers[k] for k in _PASSED if k in request.headers}
        body = await request.read() if request.body_exists else None
        async with session.request(
            request.method, target, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            data = await upstream.read()
            back = {k: upstream.headers[k] for k in _RETURNED if k in upstream.headers}
            return web.Response(status=upstream.status, body=data, headers=back)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(URL(sys.argv[1]), int(sys.argv[2])))
