"""The viewer (``/ui``): static HTML, JS and CSS shipped in the package (no CDN, no build
step), and the queue summary its header strip polls. The page holds no data itself: it
reads the search API with the admin token the user types, kept in ``sessionStorage``."""

from __future__ import annotations

import time
from pathlib import Path

from aiohttp import web

from proxy.admin.keys import STORE

STATIC = Path(__file__).resolve().parent / "static"
FILES = {
    "index.html": "text/html",
    "report.html": "text/html",
    "common.js": "text/javascript",
    "chart.js": "text/javascript",
    "viewer.js": "text/javascript",
    "report.js": "text/javascript",
    "viewer.css": "text/css",
}


async def page(request: web.Request) -> web.StreamResponse:
    """``/ui`` and ``/ui/{name}``: the viewer's files (a fixed list, nothing else)."""
    name = request.match_info.get("name") or "index.html"
    if name not in FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(
        STATIC / name,
        headers={
            "Content-Type": f"{FILES[name]}; charset=utf-8",
            "Cache-Control": "no-cache",
            "Content-Security-Policy": (
                "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
            ),
            "X-Frame-Options": "DENY",
        },
    )


async def redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def queue_summary(request: web.Request) -> web.Response:
    """What the header strip shows: depth, oldest undelivered age, dead letters."""
    queue = request.app[STORE]
    stats = await queue.stats()
    oldest = stats.oldest_pending_recorded
    return web.json_response(
        {
            "pending": stats.pending,
            "delivered": stats.delivered,
            "dead": stats.dead,
            "oldestPendingAgeS": None if oldest is None else max(0.0, time.time() - oldest),
            "sizeBytes": stats.size_bytes,
        }
    )
