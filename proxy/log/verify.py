"""``fhir-audit-proxy log verify``: check a store's shards, or a repository's copy of the
trail, against signed checkpoints, and name the first problem found.

A store shard is checked in this order: every checkpoint's signature (the store's own and
any given from elsewhere, as the repository's); every stored event against its leaf hash
(an edited event, two swapped); every leaf without its event that pruning did not delete
(a deleted range); the tree against each checkpoint by size (a tail lost to a truncated
WAL or an older copy of the store; a checkpoint the tree's later ones do not extend, shown
by a consistency proof; leaf hashes rewritten). A repository's copy (NDJSON, or a Bundle)
is checked per log origin: signatures, two events claiming one leaf, leaves missing
below a checkpoint, and the tree its events make against each checkpoint.

The checks read the store directly (read-only), never through a running proxy.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from proxy.log.checkpoint import Checkpoint
from proxy.log.entry import entry_of, position_of
from proxy.log.fhir import notes_in
from proxy.log.note import NoteError, Verifier, split
from proxy.log.tree import (
    TILE_WIDTH,
    Frontier,
    consistency_proof,
    leaf_hash,
    split_hashes,
    verify_consistency,
)
from proxy.store.codec import BodyCodec, CodecError, shipped_dictionary
from proxy.store.fans import fan_of
from proxy.store.leaves import tree_size


class Problem(StrEnum):
    """What is wrong, by kind."""

    BAD_SIGNATURE = "bad signature"
    EDITED = "edited event"
    SWAPPED = "events swapped"
    DELETED = "deleted range"
    TRUNCATED = "truncated tail"
    INCONSISTENT = "checkpoint not extended"
    REWRITTEN = "leaf hashes rewritten"
    FORKED = "two events at one leaf"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Finding:
    problem: Problem
    message: str

    def __str__(self) -> str:
        return f"{self.problem}: {self.message}"


@dataclass(slots=True)
class Report:
    """What one log's check found."""

    name: str
    """The shard's file, or the origin, checked."""
    origin: str | None = None
    leaves: int = 0
    checkpoints: int = 0
    """Checkpoints checked against the tree."""
    pruned: int = 0
    """Leaves whose events pruning deleted (checked by their stored hashes alone)."""
    finding: Finding | None = None
    notes: list[str] = field(default_factory=list)
    """What else the check says (events not yet covered by a checkpoint)."""

    @property
    def ok(self) -> bool:
        return self.finding is None

    def __str__(self) -> str:
        head = f"{self.name}: origin {self.origin or '(none)'}, {self.leaves} leaves"
        head += f", {self.checkpoints} checkpoint(s) verified"
        if self.pruned:
            head += f", {self.pruned} pruned"
        if self.finding is not None:
            return f"FAIL {head}\n  {self.finding}"
        return "\n  ".join([f"ok {head}", *self.notes])


class _Found(Exception):
    def __init__(self, finding: Finding, span: tuple[int, int] | None = None) -> None:
        self.finding = finding
        self.span = span
        """For rewritten leaves: the leaf range the failing checkpoint added."""


def _fail(problem: Problem, message: str, span: tuple[int, int] | None = None) -> _Found:
    return _Found(Finding(problem, message), span)


@dataclass(frozen=True, slots=True)
class _Signed:
    checkpoint: Checkpoint
    source: str


def _checkpoints(
    notes: Iterable[tuple[str, str]], verifier: Verifier, belongs: Any
) -> list[_Signed]:
    """The checkpoints of one log among ``(note, source)`` pairs, each signature checked
    (:class:`_Found` at the first that fails), sorted by size, duplicates dropped."""
    found: dict[tuple[int, bytes], _Signed] = {}
    for note, source in notes:
        try:
            unverified = Checkpoint.parse(split(note)[0])
        except NoteError as exc:
            raise _fail(
                Problem.BAD_SIGNATURE, f"a checkpoint from {source} is malformed: {exc}"
            ) from None
        if not belongs(unverified.origin):
            continue
        try:
            checkpoint = Checkpoint.open(note, verifier)
        except NoteError as exc:
            raise _fail(
                Problem.BAD_SIGNATURE,
                f"checkpoint of size {unverified.size} from {source}: {exc}",
            ) from None
        found.setdefault((checkpoint.size, checkpoint.root), _Signed(checkpoint, source))
    return sorted(found.values(), key=lambda s: s.checkpoint.size)


def _check_tree(leaves: Sequence[bytes], signed: Sequence[_Signed], where: str) -> int:
    """Each checkpoint against the tree of ``leaves``; returns how many matched."""
    roots: dict[int, bytes] = {}
    frontier = Frontier()
    wanted = sorted({s.checkpoint.size for s in signed if s.checkpoint.size <= len(leaves)})
    for size in wanted:
        while frontier.size < size:
            frontier.append(leaves[frontier.size])
        roots[size] = frontier.root()
    previous = 0
    for n, s in enumerate(signed):
        c = s.checkpoint
        if c.size > len(leaves):
            raise _fail(
                Problem.TRUNCATED,
                f"the checkpoint from {s.source} covers {c.size} leaves, {where} has only"
                f" {len(leaves)}: its tail was cut off (a truncated WAL, an older copy"
                " restored, or events deleted from the end)",
            )
        if roots[c.size] == c.root:
            previous = c.size
            continue
        for later in signed[n + 1 :]:
            d = later.checkpoint
            if d.size <= len(leaves) and roots[d.size] == d.root:
                proof = consistency_proof(leaves, c.size, d.size)
                if not verify_consistency(c.size, d.size, c.root, d.root, proof):
                    raise _fail(
                        Problem.INCONSISTENT,
                        f"the checkpoint of size {d.size} (from {later.source}) does not"
                        f" extend the checkpoint of size {c.size} (from {s.source}): the"
                        " consistency proof between them fails; the log was rewritten"
                        " after the first was signed",
                    )
        raise _fail(
            Problem.REWRITTEN,
            f"the leaves {previous}..{c.size - 1} of {where} do not give the root that the"
            f" checkpoint of size {c.size} (from {s.source}) signed",
            span=(previous, c.size),
        )
    return len(signed)


# --- a store shard -------------------------------------------------------------------------


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no store at {path}")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _as_schema_10(conn: sqlite3.Connection) -> None:
    """Let a store from before schema 10, which ``log verify`` reads as it is (it does not
    migrate what it checks), be read as one: its tiles are all in ``log_hashes``, and an
    empty ``log_tiles`` (a temporary table, beside the file) says so."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'log_tiles'").fetchone() is None:
        conn.execute("CREATE TEMP TABLE log_tiles (idx INTEGER PRIMARY KEY, hashes BLOB NOT NULL)")


def _ranges(indexes: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def verify_store(path: Path, verifier: Verifier, notes: Sequence[tuple[str, str]] = ()) -> Report:
    """Check the shard at ``path`` against its own checkpoints and ``notes`` (signed
    checkpoints from elsewhere, each with where it came from)."""
    report = Report(name=str(path))
    with contextlib.closing(_read_only(path)) as conn:
        try:
            _as_schema_10(conn)
            _verify_store(conn, verifier, notes, report)
        except _Found as found:
            report.finding = found.finding
        except sqlite3.DatabaseError as exc:
            report.finding = Finding(Problem.UNREADABLE, f"the store cannot be read: {exc}")
    return report


def _verify_store(
    conn: sqlite3.Connection,
    verifier: Verifier,
    notes: Sequence[tuple[str, str]],
    report: Report,
) -> None:
    (log_id,) = conn.execute("SELECT value FROM log_meta WHERE key = 'id'").fetchone()
    own = [(note, "the store") for (note,) in conn.execute("SELECT note FROM log_checkpoints")]
    signed = _checkpoints([*own, *notes], verifier, lambda o: o.endswith(f"/{log_id}"))
    report.origin = signed[-1].checkpoint.origin if signed else None
    stored = _stored_leaves(conn)
    report.leaves = len(stored)
    codec = BodyCodec(shipped_dictionary(), dict(conn.execute("SELECT id, data FROM dictionaries")))
    present = bytearray(len(stored))
    mismatched: list[tuple[int, int, str, bytes]] = []
    last = (-1, -1)
    for seq, leaf, event_id, event in _stored_events(conn, codec):
        if (leaf, seq) < last or leaf >= len(stored):
            raise _fail(
                Problem.EDITED,
                f"event seq {seq} ({event_id}) is out of the log's order (leaf {leaf})",
            )
        last = (leaf, seq)
        if event is None:
            raise _fail(Problem.EDITED, f"event seq {seq} ({event_id}) cannot be read")
        present[leaf] = 1
        computed = leaf_hash(entry_of(event))
        if computed != stored[leaf]:
            mismatched.append((seq, leaf, event_id, computed))
    if mismatched:
        raise _fail(*_explain(mismatched, stored))
    pruned = bytearray(len(stored))
    for first, end in conn.execute("SELECT first, last FROM log_pruned"):
        pruned[first : end + 1] = b"\x01" * (min(end, len(stored) - 1) - first + 1)
    report.pruned = sum(pruned)
    gone = [i for i in range(len(stored)) if not present[i] and not pruned[i]]
    if gone:
        a, b = _ranges(gone)[0]
        seqs = _neighbours(conn, a, b)
        raise _fail(
            Problem.DELETED,
            f"the events of leaves {a}..{b} are gone from the store ({seqs}) and were not pruned",
        )
    missing = [i for i, h in enumerate(stored) if h is None]
    if missing:
        a, b = _ranges(missing)[0]
        raise _fail(Problem.REWRITTEN, f"the leaf hashes of leaves {a}..{b} are gone")
    leaves = [h for h in stored if h is not None]
    report.checkpoints = _check_tree(leaves, signed, "the store")
    if signed and signed[-1].checkpoint.size < len(leaves):
        report.notes.append(
            f"{len(leaves) - signed[-1].checkpoint.size} leaves after the last checkpoint"
            " (checked against their events only)"
        )


def _stored_leaves(conn: sqlite3.Connection) -> list[bytes | None]:
    """Every leaf hash the store keeps, by leaf: the complete tiles', else the tile
    hashes', else the row's."""
    size = tree_size(conn)
    stored: list[bytes | None] = [None] * size
    for tile, joined in conn.execute("SELECT idx, CAST(hashes AS BLOB) FROM log_tiles"):
        for leaf, digest in enumerate(split_hashes(joined)[:TILE_WIDTH], start=tile * TILE_WIDTH):
            if 0 <= leaf < size:
                stored[leaf] = digest
    for idx, digest in conn.execute(
        "SELECT idx, CAST(hash AS BLOB) FROM log_hashes WHERE level = 0 AND idx < ?", (size,)
    ):
        if stored[idx] is None:
            stored[idx] = digest
    for leaf, fan, hashes in conn.execute(
        "SELECT leaf, COALESCE(fan, 1), CAST(leaf_hashes AS BLOB) FROM events"
        " WHERE leaf IS NOT NULL AND leaf_hashes IS NOT NULL"
    ):
        for i in range(fan):
            if 0 <= leaf + i < size and stored[leaf + i] is None:
                stored[leaf + i] = hashes[32 * i : 32 * i + 32]
    return stored


def _neighbours(conn: sqlite3.Connection, a: int, b: int) -> str:
    """Where a leaf range sits in queue order: the stored events around it."""
    before = conn.execute(
        "SELECT seq FROM events WHERE leaf < ? ORDER BY leaf DESC LIMIT 1", (a,)
    ).fetchone()
    after = conn.execute(
        "SELECT seq FROM events WHERE leaf > ? ORDER BY leaf LIMIT 1", (b,)
    ).fetchone()
    lo = f"after seq {before[0]}" if before else "at the start"
    hi = f"before seq {after[0]}" if after else "at the end"
    return f"{lo}, {hi}"


def _explain(
    mismatched: Sequence[tuple[int, int, str, bytes]], leaves: Sequence[bytes | None]
) -> tuple[Problem, str]:
    """Two events that each hash to the other's leaf were swapped; else the first edited."""
    for i, (seq_a, leaf_a, id_a, hash_a) in enumerate(mismatched):
        for seq_b, leaf_b, id_b, hash_b in mismatched[i + 1 :]:
            if hash_a == leaves[leaf_b] and hash_b == leaves[leaf_a]:
                return (
                    Problem.SWAPPED,
                    f"events seq {seq_a} ({id_a}) and seq {seq_b} ({id_b}) each hold what"
                    f" the other's leaf ({leaf_a}, {leaf_b}) was made from",
                )
    seq, leaf, event_id, _ = mismatched[0]
    return (
        Problem.EDITED,
        f"event seq {seq} ({event_id}) is not what its leaf {leaf} was made from",
    )


def _stored_events(
    conn: sqlite3.Connection, codec: BodyCodec
) -> Iterator[tuple[int, int, str, dict[str, Any] | None]]:
    """Every event in the log, in queue order: seq, leaf, id, the event (None when its
    body cannot be read)."""
    for seq, fan, leaf, event_id, patients, body in conn.execute(
        "SELECT seq, fan, leaf, event_id, patients, CAST(body AS BLOB) FROM events"
        " WHERE leaf IS NOT NULL ORDER BY seq"
    ):
        if fan is None:
            try:
                event: dict[str, Any] | None = codec.decode(body)
            except (CodecError, ValueError):
                event = None
            yield seq, leaf, event_id, event
            continue
        first = seq - fan + 1
        try:
            fanned = fan_of(event_id, patients, codec.decompress(body))
            members = [fanned.event(i) for i in range(fan)]
            decoded: list[tuple[str, dict[str, Any] | None]] = [
                (member, orjson.loads(json)) for member, json in members
            ]
        except (CodecError, ValueError):
            decoded = [(event_id, None)] * fan
        for i, (member, member_event) in enumerate(decoded):
            yield first + i, leaf + i, member, member_event


# --- a repository's copy ---------------------------------------------------------------


def read_resources(path: Path) -> list[dict[str, Any]]:
    """The resources of an NDJSON file or of a JSON Bundle (or of one resource)."""
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        try:
            whole = orjson.loads(data)
        except orjson.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            if whole.get("resourceType") == "Bundle":
                return [e["resource"] for e in whole.get("entry") or () if "resource" in e]
            return [whole]
    out = []
    for n, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    return out


def verify_resources(
    resources: Sequence[dict[str, Any]],
    verifier: Verifier,
    where: str,
    notes: Sequence[tuple[str, str]] = (),
) -> list[Report]:
    """Check a repository's AuditEvents against the checkpoints among ``resources`` and
    ``notes``: one report per log origin found."""
    by_origin: dict[str, dict[int, dict[bytes, str]]] = defaultdict(lambda: defaultdict(dict))
    for resource in resources:
        if resource.get("resourceType") != "AuditEvent":
            continue
        position = position_of(resource)
        if position is None:
            continue
        origin, index = position
        by_origin[origin][index][leaf_hash(entry_of(resource))] = str(resource.get("id"))
    all_notes = [*((n, where) for n in notes_in(resources)), *notes]
    origins = set(by_origin)
    for note, _ in all_notes:
        with contextlib.suppress(NoteError):
            origins.add(Checkpoint.parse(split(note)[0]).origin)
    reports = []
    for origin in sorted(origins):
        report = Report(name=f"{where} [{origin}]", origin=origin)
        try:
            _verify_origin(by_origin[origin], all_notes, verifier, origin, report)
        except _Found as found:
            report.finding = found.finding
        reports.append(report)
    return reports


def _verify_origin(
    claimed: dict[int, dict[bytes, str]],
    notes: Sequence[tuple[str, str]],
    verifier: Verifier,
    origin: str,
    report: Report,
) -> None:
    signed = _checkpoints(notes, verifier, lambda o: o == origin)
    report.leaves = len(claimed)
    for index in sorted(claimed):
        if len(claimed[index]) > 1:
            ids = sorted(claimed[index].values())
            raise _fail(
                Problem.FORKED,
                f"events {', '.join(ids)} all claim leaf {index} with different contents:"
                " one was edited, or the log was rewritten after the other left",
            )
    size = signed[-1].checkpoint.size if signed else 0
    missing = [i for i in range(size) if i not in claimed]
    if missing:
        a, b = _ranges(missing)[0]
        raise _fail(
            Problem.DELETED,
            f"no event holds leaves {a}..{b} (below the checkpoint of size {size}): deleted,"
            " or never delivered (dead-lettered)",
        )
    leaves = [next(iter(claimed[i])) for i in range(size)]
    report.checkpoints = _check_tree_repository(leaves, signed, claimed)
    beyond = sum(1 for i in claimed if i >= size)
    if beyond:
        report.notes.append(f"{beyond} events after the last checkpoint (not yet covered)")


def _check_tree_repository(
    leaves: Sequence[bytes], signed: Sequence[_Signed], claimed: dict[int, dict[bytes, str]]
) -> int:
    try:
        return _check_tree(leaves, signed, "the repository")
    except _Found as found:
        if found.span is None:
            raise
        # No stored hashes here: the edit lies among the leaves the failing checkpoint
        # added; name their events.
        lo, hi = found.span
        ids = [next(iter(claimed[i].values())) for i in range(lo, min(hi, lo + 5))]
        more = " ..." if hi - lo > 5 else ""
        raise _fail(
            Problem.EDITED,
            f"{found.finding.message}: one of the events {', '.join(ids)}{more} was edited"
            " or moved",
        ) from None
