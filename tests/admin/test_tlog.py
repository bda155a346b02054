"""The Merkle log on the admin listener, in the C2SP tlog-tiles layout: checkpoints and
hash tiles open to any tile client, entry bundles only with the read scope and audited."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import aiohttp

from proxy.admin.access import is_admin_access
from proxy.app import CHECKPOINTER
from proxy.log.tiles import bundle_entries
from tests.factories import (
    NodeFhirServer,
    StartProxy,
    independent_open_note,
    independent_root,
    log_key_file,
    new_patient,
)

TOKEN = "log-test-token-0123456789"


async def test_tiles_and_checkpoints_are_open_and_entries_need_the_read_scope(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    signer, key = log_key_file(tmp_path)
    proxy = await start_proxy(
        fhir_server.base_url,
        admin={"tokens": [TOKEN]},
        log={"key_file": key, "checkpoint_interval_s": 60, "checkpoint_events": 1000},
    )
    admin = f"{proxy.admin_url}/log/0"
    async with http.get(f"{admin}/checkpoint") as response:
        assert response.status == 404, "no checkpoint before the first is signed"
    for _ in range(3):
        await new_patient(http, proxy.url)
    await proxy.app[CHECKPOINTER].checkpoint()
    size = await proxy.queue.tree_size()
    assert size == 3

    async with http.get(f"{admin}/checkpoint") as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        note = await response.text()
    origin, size_line, root = independent_open_note(note, signer.verifier.text()).splitlines()
    assert origin.startswith("fhir-audit-proxy/")
    assert size_line == "3"
    async with http.get(f"{admin}/tile/0/000.p/3") as response:
        assert response.status == 200
        assert "immutable" in response.headers["Cache-Control"]
        tile = await response.read()
    hashes = [tile[i : i + 32] for i in range(0, 96, 32)]
    assert base64.b64encode(independent_root(hashes)).decode() == root
    for missing in ("tile/0/000", "tile/0/000.p/4", "tile/1/000.p/1", "tile/0/x000/000.p/3"):
        async with http.get(f"{admin}/{missing}") as response:
            assert response.status == 404, missing
    async with http.get(f"{proxy.admin_url}/log/7/checkpoint") as response:
        assert response.status == 404

    entries_url = f"{admin}/tile/entries/000.p/3"
    async with http.get(entries_url) as response:
        assert response.status == 401, "entry bundles are the events: PHI"
    stored_before = len(await proxy.stored_events())
    async with http.get(entries_url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
        bundle = bundle_entries(await response.read())
    assert [hashlib.sha256(b"\x00" + e).digest() for e in bundle] == hashes
    after = await proxy.stored_events()
    assert len(after) == stored_before + 1, "reading the entries was recorded"
    assert is_admin_access(after[-1])
