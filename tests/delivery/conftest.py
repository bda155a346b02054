"""A scriptable audit repository on loopback (real HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import serving

Behaviour = Callable[[web.Request, bytes], Awaitable[web.StreamResponse | None]]


@dataclass
class ScriptedRepository:
    """Answers 200 unless ``behaviour`` returns a response; records every request."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    behaviour: Behaviour | None = None

    def delivered_ids(self) -> list[str]:
        """AuditEvent ids from the requests answered 2xx, in arrival order."""
        out: list[str] = []
        for r in self.requests:
            if r["status"] >= 300:
                continue
            body = r["json"]
            if body.get("resourceType") == "Bundle":
                out.extend(e["resource"]["id"] for e in body.get("entry", []))
            else:
                out.append(body["id"])
        return out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        response = await self.behaviour(request, raw) if self.behaviour else None
        if response is None:
            response = web.json_response({"resourceType": "Bundle", "type": "batch-response"})
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "json": orjson.loads(raw) if raw else None,
                "status": response.status,
            }
        )
        return response


@pytest.fixture
async def scripted_repository() -> AsyncIterator[ScriptedRepository]:
    repo = ScriptedRepository()
    async with serving(("*", "/{tail:.*}", repo.handle)) as server:
        repo.url = str(server.make_url("/fhir"))
        yield repo


async def never_answer(request: web.Request, raw: bytes) -> web.StreamResponse | None:
    await asyncio.sleep(30)
    return None
