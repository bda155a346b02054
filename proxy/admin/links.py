"""Where the admin API's links point (search Bundle links, ``fullUrl``, ``Location``)."""

from __future__ import annotations

from aiohttp import web

from proxy.admin.keys import SETTINGS


def public_base(request: web.Request) -> str:
    """The admin listener as the client reaches it, without a trailing slash:
    ``admin.public_url``, else the address the client connected to. Never the request's
    ``Host`` header: a client (or whatever stands between) could otherwise make the
    answers another client reads, or a cache keeps, point elsewhere."""
    configured = request.app[SETTINGS].public_url
    if configured:
        return configured.rstrip("/")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host = str(sockname[0])
        address = f"[{host}]:{sockname[1]}" if ":" in host else f"{host}:{sockname[1]}"
    else:
        address = "localhost"
    return f"{request.scheme}://{address}"
