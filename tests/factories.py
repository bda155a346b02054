"""Small factories shared by test modules (tests never import helpers from each other)."""

from __future__ import annotations

import asyncio
from typing import Any


async def raw_http(host: str, port: int | None, request: bytes, *, within_s: float = 10.0) -> bytes:
    """Send ``request`` as bytes on a fresh connection and return everything the server
    answers until it closes the connection (the request should say ``Connection: close``).
    For requests no HTTP client library would send (bytes that are not UTF-8, control
    characters in headers)."""
    assert port is not None, "the server is not listening"
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within_s)
    finally:
        writer.close()
        await writer.wait_closed()


def raw_status(response: bytes) -> int:
    """The status code of a raw HTTP/1.x response."""
    return int(response.split(b" ", 2)[1])


def raw_body(response: bytes) -> bytes:
    """The body of a raw HTTP/1.x response (not chunked)."""
    return response.partition(b"\r\n\r\n")[2]


def request_id_of(event: dict[str, Any]) -> str | None:
    """The X-Request-Id an event records (its BALP transaction entity), if any."""
    for entity in event.get("entity", []):
        if entity.get("type", {}).get("code") == "XrequestId":
            value: str = entity["what"]["identifier"]["value"]
            return value
    return None
