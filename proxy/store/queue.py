"""The durable write-ahead queue: SQLite in WAL mode with ``synchronous=FULL``.

Appends are group-committed: one writer thread takes every append waiting at that
moment into one transaction and one fsync, then releases all their callers. Durability
per event gets cheaper as load rises (DESIGN.md invariant 4).

The writer is a dedicated thread with its own ``sqlite3`` connection. Appends collect on
the event loop while the writer is busy; when it is free, everything collected is handed
over at once and committed in one transaction (a few multi-row statements, one fsync),
and one callback into the loop releases all the callers. Two thread hand-overs per commit,
not two per append: each costs a GIL round trip, which is what limits a Python writer.

Reads and delivery bookkeeping (claim, ack, search) run on a
second connection on a second thread; WAL lets them read while the writer commits.
aiosqlite, which DESIGN.md first named, hops to its thread per statement and only
completes a batch when the event loop gets round to it; measured at 64 concurrent writers
that halved throughput, so the queue owns its two threads instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue as thread_queue
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson

from proxy import telemetry
from proxy.store.codec import BodyCodec, CodecError, dictionary_id, shipped_dictionary
from proxy.store.records import (
    Capture,
    EventPage,
    EventQuery,
    EventRow,
    EventStatus,
    Intent,
    QueuedEvent,
    QueueStats,
)
from proxy.store.schema import migrate
from proxy.store.search import SearchSql

log = logging.getLogger(__name__)

T = TypeVar("T")

_EVENT_COLUMNS = (
    "seq, event_id, body, status, attempts, next_attempt_at, last_error, recorded, recorded_ts"
)
_EVENT_ARITY = 14
_BODY: Final = 8
"""Where the body is in an :data:`EventRow`: JSON from the event loop, a zstd frame once
the writer has compressed it."""
_ROWS_PER_STATEMENT = 256
"""Rows per multi-row INSERT: 256 x 14 parameters stays far below SQLite's 32766 limit."""
_EVENT_COLUMNS_E = ", ".join(f"e.{c.strip()}" for c in _EVENT_COLUMNS.split(","))
_ROW_OVERHEAD = 300
"""Bytes a row takes beside its body (columns and three index entries), overestimated."""


@functools.cache
def _insert_events_sql(n_rows: int) -> str:
    values = ",".join(["(" + ", ".join("?" * _EVENT_ARITY) + ")"] * n_rows)
    return (
        "INSERT INTO events (event_id, recorded, recorded_ts, action, outcome, subtypes,"
        " patients, user_id, body, terms, type_code, entity_types, request_id, updated_ts)"
        f" VALUES {values}"
    )


class StoreError(Exception):
    """The audit could not be made durable (the client gets 503)."""


class StoreFull(StoreError):
    """``max_bytes`` is reached or the disk is full (the client gets 507)."""


def _timestamp(value: str) -> float:
    known = _last_timestamp.get(value)
    if known is not None:  # every event of an exchange has the same time
        return known
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    _last_timestamp.clear()
    _last_timestamp[value] = timestamp = parsed.timestamp()
    return timestamp


_last_timestamp: dict[str, float] = {}
"""The last ``recorded`` value parsed and its timestamp (event loop thread only)."""


def _joined(values: Sequence[str]) -> str:
    """``|a|b|``: searchable with ``LIKE '%|a|%'``."""
    return "|" + "|".join(values) + "|" if values else "|"


def _codes(value: Any) -> list[str]:
    """The codes of a Coding (R4) or a CodeableConcept (R5)."""
    if not isinstance(value, dict):
        return []
    if "code" in value:
        return [str(value["code"])]
    return [str(c["code"]) for c in value.get("coding", ()) if isinstance(c, dict) and "code" in c]


def _resource_type(reference: str) -> str:
    """``Observation`` from ``Observation/1``, ``Observation/1/_history/2`` or an
    absolute URL ending in either."""
    parts = reference.split("/")
    at = parts.index("_history") if "_history" in parts else len(parts)
    return parts[max(at - 2, 0)]


def _is_patient_role(entity: dict[str, Any]) -> bool:
    return "1" in _codes(entity.get("role"))


def _is_server_agent(agent: dict[str, Any]) -> bool:
    """The FHIR server the proxy records for: on every proxied event, so not worth an
    index entry each."""
    network = agent.get("network") or {}
    return not agent.get("requestor") and (network.get("type") == "5" or "networkUri" in agent)


def event_row(event: dict[str, Any]) -> EventRow:
    """The columns the queue indexes, read from an R4 or R5 AuditEvent, and the body as
    JSON (the writer thread compresses it). Runs on the event loop for every event, so it
    reads only what it indexes.

    ``terms`` (a JSON array) lists the event's searchable values, each with its kind as a
    prefix: ``e:`` entity reference (a patient is an entity referencing a Patient, as
    FHIR's ``patient`` search parameter defines it), ``r:`` resource type, ``a:`` any
    agent's id, name or network address. A trigger copies them into the ``event_terms``
    index (proxy/store/schema.py). Every term is an index entry written with the event,
    so there are as few kinds as the searches need."""
    recorded = str(event.get("recorded", ""))
    recorded_ts = _timestamp(recorded)
    outcome = event.get("outcome")
    if isinstance(outcome, dict):  # R5: outcome.code.code
        outcome = outcome.get("code", {}).get("code")
    subtype_codings = event.get("subtype")
    if subtype_codings is None:  # R5: code.coding
        subtype_codings = event.get("code", {}).get("coding", ())
    subtypes = [str(c["code"]) for c in subtype_codings if isinstance(c, dict) and "code" in c]
    terms: dict[str, None] = {}
    patients: list[str] = []
    r5_patient = event.get("patient")
    if isinstance(r5_patient, dict) and r5_patient.get("reference"):
        patients.append(str(r5_patient["reference"]))
    entity_types: list[str] = []
    request_id: str | None = None
    for entity in event.get("entity", ()):
        what = entity.get("what") or {}
        reference = what.get("reference")
        entity_types.extend(_codes(entity.get("type")))
        if reference:
            # Unversioned: ``Observation/1`` finds the event about its version 2.
            terms[f"e:{str(reference).split('/_history/')[0]}"] = None
        if _is_patient_role(entity):
            if reference and reference not in patients:
                patients.append(str(reference))
        elif reference and "/" in reference:
            terms[f"r:{_resource_type(reference)}"] = None
        elif entity.get("query") and entity.get("description"):
            terms[f"r:{str(entity['description']).split('?')[0].split('/')[0]}"] = None
        if "XrequestId" in _codes(entity.get("type")):
            request_id = what.get("identifier", {}).get("value")
    for patient in patients:  # R5's AuditEvent.patient is not an entity
        terms[f"e:{patient}"] = None
    user: str | None = None
    for agent in event.get("agent", ()):
        who = agent.get("who") or {}
        if agent.get("requestor") and user is None:
            user = (
                who.get("identifier", {}).get("value")
                or who.get("reference")
                or who.get("display")
                or agent.get("altId")
            )
        if _is_server_agent(agent):
            continue
        address = (agent.get("network") or {}).get("address") or agent.get("networkString")
        for value in (
            who.get("identifier", {}).get("value"),
            who.get("reference"),
            who.get("display"),
            agent.get("altId"),
            agent.get("name"),
            address,
        ):
            if value:
                terms[f"a:{value}"] = None
    event_type = event.get("type")
    if event_type is None:  # R5: category
        event_type = next(iter(event.get("category", ())), None)
    type_code = next(iter(_codes(event_type)), None)
    updated = (event.get("meta") or {}).get("lastUpdated")
    return EventRow(
        str(event["id"]),
        recorded,
        recorded_ts,
        event.get("action"),
        str(outcome) if outcome is not None else None,
        _joined(subtypes),
        _joined(patients),
        user,
        orjson.dumps(event),
        orjson.dumps(list(terms)).decode(),
        type_code,
        _joined(entity_types),
        str(request_id) if request_id is not None else None,
        _timestamp(str(updated)) if updated else recorded_ts,
    )


@dataclass(eq=False)
class _Append:
    """One caller's share of a group commit."""

    rows: list[EventRow]
    complete_intent: int | None
    intent: bytes | None
    future: asyncio.Future[int | None] = field(repr=False)
    capture: Capture | None = None


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in pages that hold data (free pages are reused before the file grows)."""
    page_size, pages, free = conn.execute(
        "SELECT page_size, page_count, freelist_count"
        " FROM pragma_page_size, pragma_page_count, pragma_freelist_count"
    ).fetchone()
    return int(page_size * (pages - free))


_SHM_BUDGET = 128 * 1024
"""Room kept for the WAL's shared-memory index (32 KiB per 4,096 WAL frames)."""


def wal_budget(max_bytes: int) -> int:
    """Bytes of ``max_bytes`` kept for the write-ahead log: an eighth, between 256 KiB
    and 64 MiB. The WAL is checkpointed when it holds half of it
    (``wal_autocheckpoint``) and truncated back to it (``journal_size_limit``)."""
    return min(64 * 1024 * 1024, max(256 * 1024, max_bytes // 8))


def database_budget(max_bytes: int) -> int:
    """Bytes the database's pages may use so that database, WAL and shared-memory index
    together stay under ``max_bytes``."""
    return max(0, max_bytes - wal_budget(max_bytes) - _SHM_BUDGET)


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


def _create_private(path: Path) -> None:
    """Create the store's missing directories (0700) and its file (0600), and take group and
    other access away from an existing store and its ``-wal``/``-shm``: they hold PHI. The
    modes are set explicitly, whatever the umask; SQLite gives ``-wal`` and ``-shm`` the
    database file's mode when it creates them."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another opener got there first
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if companion.stat().st_mode & 0o077:
                os.chmod(companion, 0o600)


class AuditQueue:
    """The queue. Open it with :meth:`open`; one instance per store file."""

    def __init__(
        self,
        writer_conn: sqlite3.Connection,
        reader_conn: sqlite3.Connection,
        codec: BodyCodec,
        *,
        max_bytes: int,
        batch_max: int,
    ) -> None:
        self._wconn = writer_conn
        self._conn = reader_conn
        self._codec = codec
        """Compresses on the writer thread (appends) and decodes on the event loop (reads)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-store-read")
        self._max_bytes = max_bytes
        self._db_budget = database_budget(max_bytes)
        self.refusing: str | None = None
        """Why the last append or intent failed (``store full``, or the error), until one
        succeeds again: the store is failing requests closed (readiness reads it)."""
        self._batch_max = batch_max
        self._loop = asyncio.get_running_loop()
        self._inbox: thread_queue.SimpleQueue[list[_Append] | None] = thread_queue.SimpleQueue()
        self._pending: list[_Append] = []
        """Appends waiting for the writer (event loop thread only)."""
        self._writer_busy = False
        """A batch is with the writer thread (event loop thread only)."""
        self._kick_scheduled = False
        self._kick_at = 1
        """Pending appends that start a commit without waiting for the loop iteration."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_loop, name="audit-store-writer", daemon=True
        )
        self._writer.start()
        self._used_estimate = 0
        """Bytes in use as last measured, plus what was committed since (writer only)."""
        self._commits_since_measure = 256
        self.commits = 0
        """Group commits done (tests and the benchmark read it)."""
        self.commit_seconds = 0.0
        """Time the writer spent committing (the benchmark reads it)."""

    @classmethod
    async def open(
        cls, path: Path, *, max_bytes: int, commit_batch_max: int = 512, create: bool = True
    ) -> AuditQueue:
        """Open (creating and migrating) the store at ``path`` and start the writer.
        With ``create=False`` (commands that only read or tidy a store) a missing store is
        a :class:`StoreError` instead of a new empty one."""
        path = Path(path)
        if not create and not path.is_file():
            raise StoreError(
                f"no audit store at {path}: check store.path in the configuration given with"
                " -c/--config (or $FHIR_AUDIT_CONFIG)"
            )
        try:
            writer = await asyncio.to_thread(cls._connect, path, True, max_bytes)
            codec = await asyncio.to_thread(cls._load_codec, writer)
            reader = await asyncio.to_thread(cls._connect, path, False, max_bytes)
        except (OSError, sqlite3.Error, RuntimeError) as exc:  # RuntimeError: schema too new
            raise StoreError(f"cannot open the audit store at {path}: {exc}") from exc
        return cls(writer, reader, codec, max_bytes=max_bytes, batch_max=commit_batch_max)

    @staticmethod
    def _load_codec(conn: sqlite3.Connection) -> BodyCodec:
        """The shipped dictionary, recorded in the store before any row uses it, and every
        dictionary older rows were written with."""
        shipped = shipped_dictionary()
        conn.execute(
            "INSERT OR IGNORE INTO dictionaries (id, data) VALUES (?, ?)",
            (dictionary_id(shipped), shipped),
        )
        known = dict(conn.execute("SELECT id, data FROM dictionaries").fetchall())
        return BodyCodec(shipped, known)

    @staticmethod
    def _connect(path: Path, migrate_schema: bool, max_bytes: int) -> sqlite3.Connection:
        _create_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        # Only takes effect when the file is created. Compressed events are ~200 bytes, so
        # a group commit of 64 fills a few pages, and each of the three indexes rewrites
        # its last page per commit: with 4 KiB pages that is 4x fewer bytes to fsync than
        # with 16 KiB (raw SQLite, 64 rows/commit: 60k/s against 42k/s).
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # max_bytes bounds the files, not only the pages: the WAL gets its own budget.
        budget = wal_budget(max_bytes)
        conn.execute(f"PRAGMA journal_size_limit={budget}")
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, budget // 4096 // 2)}")
        if migrate_schema:
            migrate(conn)
        return conn

    async def close(self) -> None:
        """Finish pending appends, checkpoint the WAL and close."""
        if self._closed:
            return
        self._closed = True
        while self._pending or self._writer_busy:  # appends already accepted still commit
            await self._idle.wait()
            if self._pending and not self._writer_busy:
                self._kick()
        self._inbox.put(None)
        await asyncio.to_thread(self._writer.join)
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    # --- appends (group commit) -------------------------------------------------------

    async def append(
        self, events: Sequence[dict[str, Any]], *, complete_intent: int | None = None
    ) -> None:
        """Return once ``events`` (and the completion of ``complete_intent``) are committed
        with fsync. Raises :class:`StoreFull` or :class:`StoreError`."""
        try:
            rows = [event_row(e) for e in events]
        except (TypeError, KeyError, orjson.JSONEncodeError) as exc:
            raise StoreError(f"event cannot be stored: {exc}") from exc
        await self.append_rows(rows, complete_intent=complete_intent)

    async def append_rows(
        self,
        rows: Sequence[EventRow],
        *,
        complete_intent: int | None = None,
        capture: Capture | None = None,
    ) -> None:
        """:meth:`append` for events whose rows the builder already made; ``capture``
        (the exchange's bodies) is committed with them."""
        await self._tracked(
            _Append(list(rows), complete_intent, None, self._loop.create_future(), capture)
        )

    async def record_intent(self, summary: dict[str, Any]) -> int:
        """Commit an intent (before forwarding a write); returns its id."""
        item = _Append([], None, orjson.dumps(summary), self._loop.create_future())
        intent_id = await self._tracked(item)
        assert intent_id is not None
        return intent_id

    async def _tracked(self, item: _Append) -> int | None:
        """Submit, and keep :attr:`refusing` up to date."""
        try:
            result = await self._submit(item)
        except StoreFull:
            self.refusing = "store full"
            raise
        except StoreError as exc:
            self.refusing = str(exc)[:200]
            raise
        self.refusing = None
        return result

    async def _submit(self, item: _Append) -> int | None:
        if self._closed:
            raise StoreError("the audit store is closed")
        self._pending.append(item)
        self._hand_over()
        return await item.future

    def _hand_over(self) -> None:
        """On the event loop, with appends pending: start a commit now if ``_kick_at`` of
        them are waiting, else at the end of this loop iteration at the latest, so every
        append made by the callbacks now ready joins the same commit. A busy writer takes
        everything pending when it is done."""
        if self._writer_busy:
            return
        if len(self._pending) >= self._kick_at:
            self._kick()
        elif not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        """On the event loop: give the writer everything pending (up to ``batch_max`` rows).
        Batching happens here, not per item across threads: each hand-over between the
        loop and the writer thread costs a GIL round trip, so there are two per commit
        rather than two per append."""
        self._kick_scheduled = False
        if self._writer_busy or not self._pending:
            return
        size = 0
        take = 0
        for item in self._pending:
            size += len(item.rows) + 1
            take += 1
            if size >= self._batch_max:
                break
        batch, self._pending = self._pending[:take], self._pending[take:]
        self._writer_busy = True
        self._idle.clear()
        self._inbox.put(batch)

    def _committed(self, batch: list[_Append], results: list[int | Exception | None]) -> None:
        """On the event loop: release the batch's callers, then hand over the next one."""
        self._writer_busy = False
        self._resolve(batch, results)
        # The callers just released are about to append again (under load they are most
        # of the traffic). Start the next commit once half as many are waiting, rather
        # than at the end of the loop iteration: the writer commits one half while the
        # loop serves the other, so the disk does not wait for the loop (64 writers:
        # alternating commits of 32, ~1.3x the appends/s of serial commits of 64 in
        # bench/bench_store.py). Under light load the threshold is 1: no waiting.
        self._kick_at = max(1, len(batch) // 2)
        if self._pending:
            self._hand_over()
        else:
            self._idle.set()

    def _write_loop(self) -> None:
        """The writer thread: commit each batch it is given in one transaction."""
        while True:
            batch = self._inbox.get()
            if batch is None:
                break
            t0 = time.perf_counter()
            try:
                results = self._commit_batch(batch)
            except BaseException as exc:  # never leave callers hanging
                results = [StoreError(f"audit store write failed: {exc}")] * len(batch)
            spent = time.perf_counter() - t0
            self.commit_seconds += spent
            telemetry.STORE_COMMIT_SECONDS.observe(spent)
            telemetry.STORE_COMMIT_SIZE.observe(sum(len(i.rows) + 1 for i in batch))
            try:
                self._loop.call_soon_threadsafe(self._committed, batch, results)
            except RuntimeError:  # the loop is gone (interpreter shutdown)
                return
        with contextlib.suppress(sqlite3.Error):
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._wconn.close()

    @staticmethod
    def _resolve(batch: list[_Append], results: list[int | Exception | None]) -> None:
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _commit_batch(self, batch: list[_Append]) -> list[int | Exception | None]:
        """On the writer thread: one transaction for the whole batch. If it fails for a
        reason one caller brought (a duplicate id), each caller is retried alone."""
        try:
            results = self._transaction(batch)
            self.commits += 1
            return list(results)
        except StoreError as exc:
            if isinstance(exc, StoreFull) or len(batch) == 1:
                return [exc] * len(batch)
        out: list[int | Exception | None] = []
        for item in batch:
            try:
                out.extend(self._transaction([item]))
                self.commits += 1
            except StoreError as exc:
                out.append(exc)
        return out

    def _transaction(self, batch: list[_Append]) -> list[int | None]:
        """One transaction for the batch, in as few statements as possible: the sqlite3
        module gives up and retakes the GIL around every statement step, and each retake
        waits for the busy event loop thread, so per-row statements made commits of 32
        events take 3 ms instead of 1 (bench/bench_store.py)."""
        conn = self._wconn
        rows: list[Any] = [value for item in batch for row in item.rows for value in row]
        # Compressed here, off the event loop (10-30 us per body there, cold zstd tables),
        # all in one call that lets go of the GIL once, and put back in place by one
        # slice assignment: Python work on this thread holds the GIL the loop needs.
        frames = self._codec.compress_many(rows[_BODY::_EVENT_ARITY])
        rows[_BODY::_EVENT_ARITY] = frames
        n_rows = len(rows) // _EVENT_ARITY
        intents = [i.intent for i in batch if i.intent is not None]
        done = [i.complete_intent for i in batch if i.complete_intent is not None]
        captures = [self._capture_row(i.capture) for i in batch if i.capture is not None]
        incoming = sum(map(len, frames)) + _ROW_OVERHEAD * n_rows
        incoming += sum(len(i) + 50 for i in intents)
        incoming += sum(len(c[2] or b"") + len(c[3] or b"") + 80 for c in captures)
        try:
            # Intents count too: a write whose intent fits no more must not be forwarded.
            if (n_rows or intents) and not self._has_room(incoming):
                raise StoreFull(f"audit store is full (max_bytes={self._max_bytes})")
            if not intents and not done and not captures and n_rows <= _ROWS_PER_STATEMENT:
                # The common batch, events only: one statement is its own transaction
                # (autocommit), so the writer retakes the GIL once, not three times.
                conn.execute(_insert_events_sql(n_rows), rows)
                self._used_estimate += incoming
                return [None] * len(batch)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for offset in range(0, n_rows, _ROWS_PER_STATEMENT):
                    chunk = rows[
                        offset * _EVENT_ARITY : (offset + _ROWS_PER_STATEMENT) * _EVENT_ARITY
                    ]
                    conn.execute(_insert_events_sql(len(chunk) // _EVENT_ARITY), chunk)
                if captures:
                    conn.executemany(
                        "INSERT OR REPLACE INTO captures (request_id, created_at, request,"
                        " response) VALUES (?, ?, ?, ?)",
                        captures,
                    )
                if done:
                    marks = ",".join("?" * len(done))
                    conn.execute(f"DELETE FROM intents WHERE id IN ({marks})", done)
                first_intent = 0
                if intents:
                    now = time.time()
                    values = ",".join(["(?, ?)"] * len(intents))
                    args = [v for summary in intents for v in (now, summary)]
                    cur = conn.execute(
                        f"INSERT INTO intents (created_at, summary) VALUES {values}", args
                    )
                    # Rowids of one multi-row insert in an exclusive transaction are
                    # consecutive (max(rowid) + 1 each), so the first is derived.
                    assert cur.lastrowid is not None
                    first_intent = cur.lastrowid - len(intents) + 1
                conn.execute("COMMIT")
                self._used_estimate += incoming
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if _is_full(exc):
                raise StoreFull(f"audit store disk is full: {exc}") from exc
            raise StoreError(f"audit store write failed: {exc}") from exc
        results: list[int | None] = []
        for item in batch:
            if item.intent is not None:
                results.append(first_intent)
                first_intent += 1
            else:
                results.append(None)
        return results

    def _capture_row(self, capture: Capture) -> tuple[str, float, bytes | None, bytes | None]:
        """On the writer thread: a capture as its row, bodies compressed."""
        request, response = (
            None if body is None else self._codec.compress_many([body])[0]
            for body in (capture.request, capture.response)
        )
        return capture.request_id, time.time(), request, response

    def _has_room(self, incoming: int) -> bool:
        """Whether ``incoming`` bytes fit under ``max_bytes``. Far from the limit, the pages
        in use are read from SQLite only every 256 commits and a running estimate is used
        in between (a statement per commit is a GIL round trip for the writer); within
        10% of the limit they are read before every commit, as a full store needs."""
        self._commits_since_measure += 1
        if (
            self._commits_since_measure >= 256
            or self._used_estimate + incoming > self._db_budget * 0.9
        ):
            self._used_estimate = _used_bytes(self._wconn)
            self._commits_since_measure = 0
        return self._used_estimate + incoming <= self._db_budget

    # --- intents ----------------------------------------------------------------------

    async def orphan_intents(self) -> list[Intent]:
        """Intents never completed, oldest first."""

        def read() -> list[tuple[int, float, bytes, str | None]]:
            return self._conn.execute(
                "SELECT id, created_at, summary, reason FROM intents ORDER BY id"
            ).fetchall()

        return [
            Intent(
                id=i,
                created_at=datetime.fromtimestamp(ts, UTC),
                summary=orjson.loads(s),
                reason=reason,
            )
            for i, ts, s, reason in await self._guarded(read)
        ]

    async def note_intent_reasons(self, reasons: Mapping[int, str]) -> None:
        """Keep why these intents were abandoned (by id), so a restart does not forget it;
        a reason already noted stays."""
        await self._write_many(
            "UPDATE intents SET reason = ? WHERE id = ? AND reason IS NULL",
            [(why, intent_id) for intent_id, why in reasons.items()],
        )

    # --- delivery bookkeeping ---------------------------------------------------------

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        """The oldest pending events, in queue order, stopping at the first one whose
        backoff has not expired (delivery stays in order)."""

        def read() -> list[tuple[Any, ...]]:
            return self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'pending'"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()

        cutoff = now.timestamp()
        out: list[QueuedEvent] = []
        for row in await self._guarded(read):
            if row[5] is not None and row[5] > cutoff:
                break
            try:
                out.append(self._queued(row))
            except StoreError as exc:  # a damaged body must not stall delivery behind it
                log.error("audit event %s cannot be read, moved to dead-letter: %s", row[1], exc)
                await self.dead_letter([row[0]], str(exc))
        return out

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        """Mark delivered (the repository answered 2xx)."""
        await self._write_many(
            "UPDATE events SET status = 'delivered', delivered_at = ?, last_error = NULL"
            " WHERE seq = ?",
            [(now.timestamp(), s) for s in seqs],
        )

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        """Count a failed attempt and hold the events back until ``retry_at``."""
        await self._write_many(
            "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
            " WHERE seq = ? AND status = 'pending'",
            [(retry_at.timestamp(), error[:4096], s) for s in seqs],
        )

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        """Set aside events the repository rejected, with its answer."""
        await self._write_many(
            "UPDATE events SET status = 'dead', attempts = attempts + 1, last_error = ?"
            " WHERE seq = ?",
            [(error[:4096], s) for s in seqs],
        )

    async def requeue_dead(self, seqs: Sequence[int] | None = None) -> int:
        """Dead events back to pending (all of them when ``seqs`` is None)."""

        def write() -> int:
            with self._tx():
                if seqs is None:
                    cur = self._conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead'"
                    )
                    return cur.rowcount
                return sum(
                    self._conn.execute(
                        "UPDATE events SET status = 'pending', next_attempt_at = NULL"
                        " WHERE status = 'dead' AND seq = ?",
                        (s,),
                    ).rowcount
                    for s in seqs
                )

        result: int = await self._guarded(write)
        return result

    async def list_dead(self, limit: int = 100) -> list[QueuedEvent]:
        def read() -> list[tuple[Any, ...]]:
            return self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'dead' ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()

        return [self._queued(r, damaged_ok=True) for r in await self._guarded(read)]

    async def prune(self, now: datetime, retention: timedelta) -> int:
        """Delete delivered events older than ``retention``. SQLite reuses the freed pages,
        and the size check counts only pages in use, so a full store recovers."""
        cutoff = (now - retention).timestamp()

        def write() -> int:
            with self._tx():
                cur = self._conn.execute(
                    "DELETE FROM events WHERE status = 'delivered' AND delivered_at < ?", (cutoff,)
                )
                # Captured bodies are kept as long as delivered events are, and for as
                # long as an event of their exchange is undelivered (those are few: the
                # status index finds them).
                self._conn.execute(
                    "DELETE FROM captures WHERE created_at < ? AND request_id NOT IN"
                    " (SELECT request_id FROM events WHERE status IN ('pending', 'dead')"
                    " AND request_id IS NOT NULL)",
                    (cutoff,),
                )
                return cur.rowcount

        result: int = await self._guarded(write)
        return result

    # --- reads for the admin API --------------------------------------------------------

    async def get_capture(self, request_id: str) -> Capture | None:
        """The bodies captured for the exchange ``request_id``, or None."""

        def read() -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = self._conn.execute(
                "SELECT request, response FROM captures WHERE request_id = ?", (request_id,)
            ).fetchone()
            return row

        row = await self._guarded(read)
        if row is None:
            return None
        request, response = (None if b is None else self._codec.decompress(b) for b in row)
        return Capture(request_id, request, response)

    async def get_event(self, event_id: str) -> QueuedEvent | None:
        def read() -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
            return row

        row = await self._guarded(read)
        return self._queued(row) if row is not None else None

    async def search(self, query: EventQuery) -> tuple[list[QueuedEvent], int]:
        """A page of matching events and the total number matching."""
        page = await self.search_page(query)
        return page.items, page.total if page.total is not None else len(page.items)

    async def search_page(self, query: EventQuery) -> EventPage:
        """A page of matching events in the query's order, with keyset paging (``after``,
        ``before``). A patient, entity, agent, address or resource type filter walks the
        ``event_terms`` index in date order; a date range walks ``events_recorded``."""
        sql = SearchSql(query)
        reverse = query.before is not None
        descending = query.newest_first != reverse
        order = "DESC" if descending else "ASC"
        where = list(sql.where)
        args = list(sql.args)
        cursor = query.before if reverse else query.after
        if cursor is not None:
            condition, bound = sql.after(cursor, descending)
            where.append(condition)
            args.extend(bound)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        select = (
            f"SELECT {_EVENT_COLUMNS_E} FROM {sql.source} {clause}"
            f" ORDER BY {sql.order.format(order=order)} LIMIT ? OFFSET ?"
        )
        count_clause = f"WHERE {' AND '.join(sql.where)}" if sql.where else ""

        def read() -> tuple[list[tuple[Any, ...]], int | None]:
            rows = self._conn.execute(select, [*args, query.limit + 1, query.offset]).fetchall()
            total: int | None = None
            if query.count_total:
                total = self._conn.execute(
                    f"SELECT COUNT(*) FROM {sql.source} {count_clause}", sql.args
                ).fetchone()[0]
            return rows, total

        rows, total = await self._guarded(read)
        more = len(rows) > query.limit
        items = [self._queued(r) for r in rows[: query.limit]]
        if reverse:
            items.reverse()
            return EventPage(items, total, more_after=True, more_before=more)
        return EventPage(
            items, total, more_after=more, more_before=query.after is not None or query.offset > 0
        )

    async def oldest_pending_recorded(self) -> float | None:
        """``recorded`` (POSIX time) of the oldest undelivered event, or None."""

        def read() -> float | None:
            row = self._conn.execute(
                "SELECT recorded_ts FROM events WHERE status = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
            return float(row[0]) if row else None

        result: float | None = await self._guarded(read)
        return result

    async def stats(self) -> QueueStats:
        def read() -> QueueStats:
            counts = dict(
                self._conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status").fetchall()
            )
            intents = self._conn.execute("SELECT COUNT(*) FROM intents").fetchone()[0]
            oldest = self._conn.execute(
                "SELECT recorded_ts FROM events WHERE status = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
            return QueueStats(
                pending=counts.get("pending", 0),
                delivered=counts.get("delivered", 0),
                dead=counts.get("dead", 0),
                intents=intents,
                size_bytes=_used_bytes(self._conn),
                oldest_pending_recorded=float(oldest[0]) if oldest else None,
            )

        result: QueueStats = await self._guarded(read)
        return result

    # --- plumbing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Any:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    async def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return

        def write() -> None:
            with self._tx():
                self._conn.executemany(sql, rows)

        await self._guarded(write)

    async def _guarded(self, fn: Any) -> Any:
        try:
            return await self._run(fn)
        except sqlite3.Error as exc:
            if _is_full(exc):
                raise StoreFull(f"audit store disk is full: {exc}") from exc
            raise StoreError(f"audit store failed: {exc}") from exc

    def _queued(self, row: tuple[Any, ...], *, damaged_ok: bool = False) -> QueuedEvent:
        """A row as a record. A body that cannot be decoded is a StoreError, except where
        ``damaged_ok`` (the dead-letter list, where such events are kept): there the record
        carries only the event's id, and its ``last_error`` says why."""
        seq, event_id, body, status, attempts, next_at, error, recorded, recorded_ts = row
        try:
            event = self._codec.decode(body)
        except CodecError as exc:
            if not damaged_ok:
                raise StoreError(f"audit event {event_id}: {exc}") from exc
            event = {"resourceType": "AuditEvent", "id": event_id}
        return QueuedEvent(
            seq=seq,
            event_id=event_id,
            event=event,
            status=EventStatus(status),
            attempts=attempts,
            next_attempt_at=datetime.fromtimestamp(next_at, UTC) if next_at is not None else None,
            last_error=error,
            recorded=recorded,
            recorded_ts=recorded_ts,
        )
