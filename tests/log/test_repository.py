"""The log end to end, against the real test FHIR server (Medplum's engine) as both the
upstream and the audit repository, in ``transaction`` mode: the events a FHIR repository
holds (re-serialized, ``meta`` set by it) give back the leaves the proxy stored, the
checkpoints it holds verify with a signed-note reader written here from the specification,
their roots with RFC 6962 written here from the RFC, and ``log verify`` passes on the
repository's own search answers."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.cli import main
from proxy.log.entry import POSITION_URL
from proxy.log.fhir import IDENTIFIER_SYSTEM
from tests.factories import (
    FHIR,
    NodeFhirServer,
    StartProxy,
    independent_leaf,
    independent_open_note,
    independent_root,
    log_key_file,
    new_patient,
)


async def _search(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    """Every resource a search finds, following its pages."""
    found: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        async with http.get(next_url) as response:
            assert response.status == 200, await response.text()
            bundle = await response.json(content_type=None)
        found += [e["resource"] for e in bundle.get("entry", [])]
        next_url = next(
            (ln["url"] for ln in bundle.get("link", []) if ln["relation"] == "next"), None
        )
    return found


def _position(event: dict[str, Any]) -> tuple[str, int] | None:
    for extension in event.get("extension", []):
        if extension["url"] == POSITION_URL:
            parts = {p["url"]: p["valueString"] for p in extension["extension"]}
            return parts["origin"], int(parts["index"])
    return None


async def test_a_fhir_repositorys_copy_recomputes_the_leaves_and_the_signed_roots(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    signer, key = log_key_file(tmp_path)
    proxy = await start_proxy(
        fhir_server.base_url,
        repository={
            "url": fhir_server.base_url,
            "mode": "transaction",
            "flush_interval_ms": 50,
            "batch_count": 4,
        },
        log={"key_file": key, "checkpoint_interval_s": 0.2, "origin": "audit.example.org/e2e"},
    )
    patients = [await new_patient(http, proxy.url) for _ in range(3)]
    for patient in patients:
        async with http.get(f"{proxy.url}/Patient/{patient['id']}") as response:
            assert response.status == 200
    observations = [
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "pulse"},
            "subject": {"reference": f"Patient/{p['id']}"},
            "valueQuantity": {"value": 72.5},
        }
        for p in patients
    ]
    for observation in observations:
        async with http.post(
            f"{proxy.url}/Observation", json=observation, headers=FHIR
        ) as response:
            assert response.status == 201
    ids = ",".join(p["id"] for p in patients)
    async with http.get(f"{proxy.url}/Observation?subject={ids}") as response:
        assert response.status == 200  # one event per patient: a fan-out's leaves

    size = await proxy.queue.tree_size()
    assert size >= 10
    # Wait for a checkpoint of the whole tree to reach the repository (after its events).
    documents: list[dict[str, Any]] = []
    for _ in range(200):
        documents = [
            d
            for d in await _search(http, f"{fhir_server.base_url}/DocumentReference?_count=100")
            if any(i["system"] == IDENTIFIER_SYSTEM for i in d.get("identifier", []))
            and d["identifier"][0]["value"].startswith("audit.example.org/e2e/")
            and d["identifier"][0]["value"].endswith(f"/{size}")
        ]
        if documents:
            break
        await asyncio.sleep(0.05)
    assert documents, "the checkpoint of the whole tree was shipped"
    note = base64.b64decode(documents[0]["content"][0]["attachment"]["data"]).decode()
    origin_line, size_line, root_line = independent_open_note(
        note, signer.verifier.text()
    ).splitlines()
    assert int(size_line) == size

    # The repository's events, as it holds them: each recomputes its stored leaf. Read by
    # id: the server holds every other test's events too (thousands in a full run, where a
    # search of them all did not reach these).
    events = []
    for kept in await proxy.stored_events():
        async with http.get(f"{fhir_server.base_url}/AuditEvent/{kept['id']}") as response:
            assert response.status == 200, await response.text()
            events.append(await response.json(content_type=None))
    assert {(_position(e) or ("", 0))[0] for e in events} == {origin_line}
    assert all("meta" in e and "lastUpdated" in e["meta"] for e in events), "the server set meta"
    leaves: dict[int, bytes] = {}
    for event in events:
        _, index = _position(event) or ("", 0)
        leaves[index] = independent_leaf(event)
    assert sorted(leaves) == list(range(size)), "every stored event reached the repository"
    async with http.get(f"{proxy.admin_url}/log/0/tile/0/000.p/{size}") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/octet-stream"
        tile = await response.read()
    stored = [tile[i : i + 32] for i in range(0, len(tile), 32)]
    assert [leaves[i] for i in range(size)] == stored, "the repository's copy gives the same leaves"
    assert base64.b64encode(independent_root(stored)).decode() == root_line

    # What the admin listener serves is the same signed note's size or later.
    async with http.get(f"{proxy.admin_url}/log/0/checkpoint") as response:
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        served = await response.text()
    assert independent_open_note(served, signer.verifier.text()).startswith(origin_line + "\n")

    export = tmp_path / "export.ndjson"
    export.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [*events, *documents]))
    assert main(["log", "verify", "--vkey", signer.verifier.text(), str(export)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok ") and f"{size} leaves" in out, out
