"""Bytes on disk per stored event, to size ``store.max_bytes``.

The proxy runs in this process in front of the bundled FHIR server (``testserver/``,
Medplum's engine on Node), and a client sends ``--count`` requests of each kind through
it, each with a user's bearer JWT: create a Patient, read it, update it, search the
Observations of one patient, search 10 Patients by id. For each kind it prints the bytes
in use per event (the database's pages: what ``max_bytes`` bounds once the WAL's and the
shared-memory index's share is taken off), then for all of them, and the files on disk
(database, WAL, shared-memory index) while the proxy runs and after it stops.

    python bench/bench_store_size.py [--count 1000]

Needs ``node`` and ``testserver/node_modules`` (``scripts/setup``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import jwt
import uvloop

from proxy.app import QUEUE, build_proxy_app, proxy_listener
from proxy.http.server import Server
from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
FHIR = {"Content-Type": "application/fhir+json"}


def _token(n: int) -> str:
    claims = {
        "sub": f"practitioner-{n % 20}",
        "name": f"Dr. Example {n % 20}",
        "client_id": "ehr-web",
        "iss": "https://idp.example.org",
        "jti": f"token-{n}",
    }
    return jwt.encode(claims, "a-key-nobody-checks-here-but-long-enough", "HS256")


def _files(path: Path) -> int:
    names = (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
    return sum(p.stat().st_size for p in names if p.exists())


async def _requests(
    http: aiohttp.ClientSession, base: str, kind: str, n: int, patients: list[str]
) -> None:
    """One request of ``kind``, the ``n``-th."""
    headers = FHIR | {"Authorization": f"Bearer {_token(n)}"}
    pid = patients[n % len(patients)] if patients else ""
    family = {"resourceType": "Patient", "name": [{"family": f"Size{n}", "given": ["Bench"]}]}
    if kind == "create":
        async with http.post(f"{base}/Patient", json=family, headers=headers) as r:
            patients.append((await r.json(content_type=None))["id"])
        return
    if kind == "update":
        body = family | {"id": pid, "gender": "unknown"}
        request = http.put(f"{base}/Patient/{pid}", json=body, headers=headers)
    elif kind == "read":
        request = http.get(f"{base}/Patient/{pid}", headers=headers)
    elif kind == "search, 1 patient":
        request = http.get(f"{base}/Observation?patient=Patient/{pid}", headers=headers)
    else:  # a search whose Bundle holds 10 patients: 10 events, stored as one row
        ids = ",".join(patients[(n + k) % len(patients)] for k in range(10))
        request = http.get(f"{base}/Patient?_id={ids}", headers=headers)
    async with request as r:
        await r.read()


KINDS = ("create", "read", "update", "search, 1 patient", "search, 10 patients")


async def measure(fhir: str, store: Path, count: int) -> dict[str, tuple[int, int]]:
    """For each kind of request, sent ``count`` times: (events stored, bytes in use)."""
    settings = load_settings(
        None,
        listen={"host": "127.0.0.1", "port": 0},
        admin={"host": "127.0.0.1", "port": 0},
        upstream={"url": fhir},
        store={"path": store},
    )
    app = build_proxy_app(settings)
    server = Server(app, proxy_listener)
    await server.start(host="127.0.0.1", port=0)
    out: dict[str, tuple[int, int]] = {}
    patients: list[str] = []
    try:
        base = f"{server.urls()[0]}/fhir"
        queue = app[QUEUE]

        async def events() -> int:
            stats = await queue.stats()
            return stats.pending + stats.delivered + stats.dead

        async with aiohttp.ClientSession() as http:
            for kind in KINDS:
                before, used = await events(), await queue.bytes_in_use()
                for start in range(0, count, 8):
                    await asyncio.gather(
                        *(
                            _requests(http, base, kind, n, patients)
                            for n in range(start, min(start + 8, count))
                        )
                    )
                out[kind] = (await events() - before, await queue.bytes_in_use() - used)
        out["all"] = (await events(), await queue.bytes_in_use())
        out["files while running"] = (out["all"][0], _files(store))
        return out
    finally:
        await server.stop(settings.shutdown_grace_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="requests of each kind")
    args = parser.parse_args()
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is needed for the test FHIR server")
    server = subprocess.Popen(
        [node, str(ROOT / "testserver" / "server.mjs"), "0", "127.0.0.1"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT / "testserver",
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("listening "):
            raise SystemExit(f"the test FHIR server did not start: {line}")
        with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
            store = Path(tmp) / "audit.db"
            figures = uvloop.run(measure(line.split()[1], store, args.count))
            figures["database file after a clean stop"] = (figures["all"][0], _files(store))
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"{args.count} requests of each kind, each with a user's bearer JWT; bytes per event:")
    print("(in use: the database pages what max_bytes bounds, WAL and shm excluded)")
    for name, (events, size) in figures.items():
        label = name if name not in KINDS and name != "all" else f"in use, {name}"
        print(f"  {label:<40} {size / max(events, 1):>7,.0f}  ({events} events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
