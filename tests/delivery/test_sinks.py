"""Each delivery mode against a real HTTP server (and, for ``transaction``, the real test FHIR
server), with the answers that make a batch retried or rejected."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.delivery.file import FileRepository, FileSink
from proxy.delivery.http import FhirRepositorySink, HttpRepository
from proxy.delivery.sink import (
    Origin,
    PartialDelivery,
    RepositoryRejected,
    RepositoryUnavailable,
    Sink,
)
from tests.factories import NodeFhirServer, ScriptedRepository, audit_event, never_answer


def _settings(url: str, **kwargs: Any) -> HttpRepository:
    return HttpRepository(url=url, **kwargs)


def make_sink(settings: HttpRepository, session: aiohttp.ClientSession) -> Sink:
    return FhirRepositorySink(settings, session)


async def test_bundle_mode_posts_a_collection_with_custom_headers(
    scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    settings = _settings(
        scripted_repository.url, mode="bundle", request_headers={"X-Tenant": "clinic-7"}
    )
    events = [audit_event(i) for i in range(3)]
    await make_sink(settings, http).send(events)
    (request,) = scripted_repository.requests
    assert (request["method"], request["path"]) == ("POST", "/fhir")
    assert request["headers"]["X-Tenant"] == "clinic-7"
    assert request["headers"]["Content-Type"] == "application/fhir+json"
    bundle = request["json"]
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    assert [e["resource"] for e in bundle["entry"]] == events
    assert [e["fullUrl"] for e in bundle["entry"]] == [f"urn:uuid:{e['id']}" for e in events]


async def test_single_mode_posts_each_event_to_auditevent(
    scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(3)]
    await make_sink(_settings(scripted_repository.url, mode="single"), http).send(events)
    assert [(r["method"], r["path"]) for r in scripted_repository.requests] == [
        ("POST", "/fhir/AuditEvent")
    ] * 3
    assert [r["json"] for r in scripted_repository.requests] == events


async def test_single_mode_reports_how_far_it_got(
    scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    events = [audit_event(i) for i in range(3)]

    async def reject_second(request: web.Request, raw: bytes) -> web.Response | None:
        if orjson.loads(raw)["id"] == events[1]["id"]:
            return web.json_response({"resourceType": "OperationOutcome"}, status=422)
        return None

    scripted_repository.behaviour = reject_second
    with pytest.raises(PartialDelivery) as info:
        await make_sink(_settings(scripted_repository.url, mode="single"), http).send(events)
    assert info.value.delivered == 1
    assert isinstance(info.value.cause, RepositoryRejected)
    assert info.value.cause.status == 422


async def test_transaction_mode_is_idempotent_on_a_real_fhir_server(
    fhir_server: NodeFhirServer, http: aiohttp.ClientSession
) -> None:
    sink = make_sink(_settings(fhir_server.base_url, mode="transaction"), http)
    events = [audit_event(i) for i in range(5)]
    await sink.send(events)
    await sink.send(events[2:])  # a redelivery after a lost acknowledgement
    for event in events:
        async with http.get(f"{fhir_server.base_url}/AuditEvent/{event['id']}") as resp:
            assert resp.status == 200
            stored = await resp.json(content_type=None)
        assert stored["entity"] == event["entity"]
    ids = ",".join(e["id"] for e in events)
    async with http.get(f"{fhir_server.base_url}/AuditEvent?_id={ids}&_count=50") as resp:
        found = await resp.json(content_type=None)
    assert sorted(e["resource"]["id"] for e in found.get("entry", [])) == sorted(
        e["id"] for e in events
    ), "each event exactly once"


async def test_transaction_mode_rejects_on_a_failed_entry(
    fhir_server: NodeFhirServer, http: aiohttp.ClientSession
) -> None:
    sink = make_sink(_settings(fhir_server.base_url, mode="transaction"), http)
    # The server answers the transaction 200 but refuses the entry: that is a rejection.
    bad = audit_event(1) | {"id": "a?b=1"}
    with pytest.raises(RepositoryRejected) as info:
        await sink.send([bad])
    assert info.value.status == 400
    assert "Cannot provide ID" in info.value.body


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, RepositoryUnavailable),
        (502, RepositoryUnavailable),
        (503, RepositoryUnavailable),
        (408, RepositoryUnavailable),
        (429, RepositoryUnavailable),
        # Credentials, not events: rejecting would dead-letter every event after bisection.
        (401, RepositoryUnavailable),
        (403, RepositoryUnavailable),
        (400, RepositoryRejected),
        (404, RepositoryRejected),
        (413, RepositoryRejected),
        (422, RepositoryRejected),
    ],
)
async def test_answers_that_retry_and_answers_that_reject(
    scripted_repository: ScriptedRepository,
    http: aiohttp.ClientSession,
    status: int,
    error: type[Exception],
) -> None:
    async def answer(request: web.Request, raw: bytes) -> web.Response:
        return web.json_response(
            {"resourceType": "OperationOutcome", "issue": [{"diagnostics": f"said {status}"}]},
            status=status,
        )

    scripted_repository.behaviour = answer
    with pytest.raises(error) as info:
        await make_sink(_settings(scripted_repository.url), http).send([audit_event(1)])
    assert f"said {status}" in str(info.value), "the repository's answer is kept"
    if isinstance(info.value, RepositoryRejected):
        assert info.value.status == status


async def test_timeout_and_refused_connection_are_unavailable(
    scripted_repository: ScriptedRepository, http: aiohttp.ClientSession
) -> None:
    scripted_repository.behaviour = never_answer
    sink = make_sink(_settings(scripted_repository.url, timeout_s=0.3), http)
    with pytest.raises(RepositoryUnavailable, match=r"TimeoutError|unreachable"):
        await asyncio.wait_for(sink.send([audit_event(1)]), 5)
    refused = make_sink(_settings("http://127.0.0.1:9/fhir"), http)
    with pytest.raises(RepositoryUnavailable, match="unreachable"):
        await refused.send([audit_event(1)])


async def test_file_mode_appends_ndjson_lines(tmp_path: Path) -> None:
    path = tmp_path / "out" / "audit.ndjson"
    sink = await FileRepository(url=f"file://{path}").open_sink(Origin())
    assert isinstance(sink, FileSink)
    first, second = [audit_event(i) for i in range(3)], [audit_event(i) for i in range(3, 5)]
    await sink.send(first)
    await sink.send(second)
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line) for line in lines] == first + second
    assert path.read_bytes().endswith(b"\n")


async def test_file_mode_unwritable_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.raises(RepositoryUnavailable, match="cannot append"):
        await FileSink(blocker / "audit.ndjson").send([audit_event(1)])


async def test_file_mode_fsyncs_the_whole_batch_before_send_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher acknowledges a batch when send() returns: by then the NDJSON file must
    be on disk, every line of the batch in it. os.fsync is watched (and still done): the
    file it was given and how long that file was at that moment."""
    target = tmp_path / "audit.ndjson"
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        status = os.fstat(fd)
        synced.append((status.st_ino, status.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    sink = FileSink(target)
    for batch in ([audit_event(1), audit_event(2)], [audit_event(3)]):
        before = len(synced)
        await sink.send(batch)
        # Nothing of the send may be left to run after it returned.
        assert len(synced) == before + 1, "exactly one fsync, before send() returned"
        inode, size = synced[-1]
        assert (inode, size) == (target.stat().st_ino, target.stat().st_size), (
            "the fsync was of this file, after the whole batch was written to it"
        )
    assert len(target.read_bytes().splitlines()) == 3
