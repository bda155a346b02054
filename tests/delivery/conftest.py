"""A scriptable audit repository on loopback (real HTTP), events to send, and a real store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.audit.balp import new_event_id
from proxy.store.queue import AuditQueue

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
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", repo.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    repo.url = str(server.make_url("/fhir"))
    yield repo
    await server.close()


def audit_event(n: int, **extra: Any) -> dict[str, Any]:
    """A small valid R4 AuditEvent, numbered in ``entity[0].what.identifier``."""
    return {
        "resourceType": "AuditEvent",
        "id": new_event_id(),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "action": "R",
        "recorded": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "outcome": "0",
        "agent": [{"who": {"display": "test"}, "requestor": True}],
        "source": {"observer": {"display": "fhir-audit-proxy"}},
        "entity": [{"what": {"identifier": {"value": f"n-{n}"}}}],
        **extra,
    }


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[AuditQueue]:
    q = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    yield q
    await q.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def never_answer(request: web.Request, raw: bytes) -> web.StreamResponse | None:
    await asyncio.sleep(30)
    return None
