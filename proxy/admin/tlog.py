"""Each shard's Merkle log in the C2SP ``tlog-tiles`` layout, under ``/log/<shard>/``:
``checkpoint``, ``tile/<L>/<N>[.p/<W>]`` and ``tile/entries/<N>[.p/<W>]``.

Checkpoints and hash tiles are open (:data:`~proxy.admin.auth.RouteGroup.OPEN`): they hold
hashes and tree sizes, no PHI, and an auditor's tile client (Go's ``sumdb/tlog``, any C2SP
client) fetches them without credentials. Entry bundles hold the events themselves: they
need the read scope, like ``/fhir/AuditEvent``, and each answer that discloses an event is
audited as a search of the trail.

A tile is served as soon as the tree holds it, full or partial (a partial tile of width
``W`` is a prefix that never changes), with long-lived caching; an entry bundle only while
every one of its events is in the store (pruned: 404). An entry longer than an entry
bundle can hold (65,535 bytes) makes its bundle unavailable (422); the event itself
stays readable at ``/fhir/AuditEvent/<id>``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.admin.access import discloses, record_access
from proxy.fhir.operation_outcome import outcome_response
from proxy.log.entry import entry_of
from proxy.log.tiles import MAX_ENTRY, entry_bundle, parse_tile_path
from proxy.log.tree import TILE_WIDTH
from proxy.store.faces import TransparencyLog

ShardLogs = Callable[[int], Awaitable[TransparencyLog | None]]
"""The log of shard ``n``, or None when there is no such shard (yet)."""
LOGS: web.AppKey[ShardLogs] = web.AppKey("shard_logs")
IMMUTABLE = "public, max-age=31536000, immutable"
OCTETS = "application/octet-stream"


async def _shard_log(request: web.Request) -> TransparencyLog | web.Response:
    shard = request.match_info["shard"]
    tlog = await request.app[LOGS](int(shard)) if shard.isdigit() else None
    if tlog is None:
        return outcome_response(404, "not-found", f"no log for shard {shard!r}")
    return tlog


async def checkpoint(request: web.Request) -> web.StreamResponse:
    tlog = await _shard_log(request)
    if isinstance(tlog, web.Response):
        return tlog
    note = await tlog.latest_checkpoint()
    if note is None:
        return outcome_response(404, "not-found", "no checkpoint signed yet (is log.key_file set?)")
    return web.Response(
        body=note.encode(),
        content_type="text/plain",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def tile(request: web.Request) -> web.StreamResponse:
    tlog = await _shard_log(request)
    if isinstance(tlog, web.Response):
        return tlog
    wanted = parse_tile_path("tile/" + request.match_info["path"])
    if wanted is None or wanted.level is None:
        return outcome_response(404, "not-found", "not a tile path (C2SP tlog-tiles)")
    hashes = await tlog.tile_hashes(wanted.level, wanted.start, wanted.width)
    if len(hashes) < wanted.width:
        return outcome_response(404, "not-found", "the tree does not hold this tile yet")
    return web.Response(
        body=b"".join(hashes), content_type=OCTETS, headers={"Cache-Control": IMMUTABLE}
    )


async def entries(request: web.Request) -> web.StreamResponse:
    tlog = await _shard_log(request)
    if isinstance(tlog, web.Response):
        return tlog
    wanted = parse_tile_path("tile/entries/" + request.match_info["path"])
    if wanted is None or wanted.level is not None:
        return outcome_response(404, "not-found", "not an entry bundle path (C2SP tlog-tiles)")
    if await tlog.tree_size() < wanted.start + wanted.width:
        return outcome_response(404, "not-found", "the tree does not hold these entries yet")
    events = await tlog.leaf_events(wanted.start, wanted.width)
    if events is None:
        return outcome_response(404, "not-found", "these entries' events were pruned")
    bundle = [entry_of(item.event) for item in events]
    too_long = [item.event_id for item, e in zip(events, bundle, strict=True) if len(e) > MAX_ENTRY]
    if too_long:
        return outcome_response(
            422,
            "too-long",
            f"AuditEvent {too_long[0]} is longer than an entry bundle holds (65,535 bytes);"
            " read it at /fhir/AuditEvent/{id}",
        )
    if discloses(events):
        path = request.match_info["shard"] + "/" + wanted.path()
        await record_access(request, search=[("log-entries", path)])
    cache = IMMUTABLE if wanted.width == TILE_WIDTH else "no-store"
    return web.Response(
        body=entry_bundle(bundle), content_type=OCTETS, headers={"Cache-Control": cache}
    )
