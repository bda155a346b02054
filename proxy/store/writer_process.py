"""The store's writer process: it alone commits appends, intents and captures.

The proxy's event loop (:class:`proxy.store.writer.CommitEngine`) hands it batches over a
socket; it commits each batch in one transaction (a few multi-row statements, one fsync)
on its own ``sqlite3`` connection and answers with each item's result. It is a process,
not a thread, so that its Python work and the ``sqlite3`` module's GIL hand-offs around
every statement never stall the event loop.

It ignores SIGINT and SIGTERM (the proxy decides when to stop) and ends when its socket
reaches end of file: once the proxy has closed it, or the proxy is gone (even ``kill -9``).
It then checkpoints the WAL and exits. Nothing it commits is acknowledged to anyone before
the proxy reads its answer, so a batch committed after the proxy died is only an event
recorded whose answer nobody got.

Also here, because both processes need them: how the store file is opened
(:func:`connect`), its dictionaries (:func:`load_codec`) and the disk budget.

Started by the engine as ``main([FD, PATH, MAX_BYTES])``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import signal
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

from proxy.store.codec import BodyCodec, dictionary_id, shipped_dictionary
from proxy.store.records import Capture, FanOut, events_in
from proxy.store.schema import migrate

_EVENT_ARITY = 16
_BODY: Final = 10
"""Where the body is in a row as inserted (seq, fan, then an :data:`EventRow`): JSON from
the event loop, a zstd frame once the writer has compressed it."""
_ROWS_PER_STATEMENT = 256
"""Rows per multi-row INSERT: 256 x 16 parameters stays far below SQLite's 32766 limit."""
_ROW_OVERHEAD = 300
"""Bytes a row takes beside its body (columns and three index entries), overestimated."""

FRAME = struct.Struct("!I")
"""Each message on the socket: its length, then its pickle."""

WireAppend = tuple[Sequence[tuple[Any, ...]], int | None, bytes | None, tuple[Any, ...] | None]
"""An append as sent to the writer: its rows (each an :class:`EventRow` as a plain tuple,
which pickles in half the time, or a :class:`FanOut` of several), the intent it
completes, the intent it records (its summary), the exchange's captured bodies (a
:class:`Capture` as a plain tuple)."""


class StoreError(Exception):
    """The audit could not be made durable (the client gets 503)."""


class StoreFull(StoreError):
    """``max_bytes`` is reached or the disk is full (the client gets 507)."""


# --- the store file --------------------------------------------------------------------


def _insert_rows(batch: Sequence[WireAppend], next_seq: int | None) -> list[Any]:
    """The values of every row of ``batch`` as inserted (seq, fan, then the row), flat.
    A :class:`FanOut` is one row whose seq is its last event's, the seqs of its other
    events kept free below it: so from ``next_seq`` on, every row's seq is given; without
    a fan-out (``next_seq`` None) SQLite numbers them."""
    out: list[Any] = []
    for item in batch:
        for row in item[0]:
            if type(row) is FanOut:
                assert next_seq is not None
                n = len(row.patients)
                next_seq += n
                out += (next_seq - 1, n, *row.stored())
            else:
                out += (next_seq, None, *row)
                if next_seq is not None:
                    next_seq += 1
    return out


@functools.cache
def _insert_events_sql(n_rows: int) -> str:
    values = ",".join(["(" + ", ".join("?" * _EVENT_ARITY) + ")"] * n_rows)
    return (
        "INSERT INTO events (seq, fan, event_id, recorded, recorded_ts, action, outcome,"
        " subtypes, patients, user_id, body, terms, type_code, entity_types, request_id,"
        " updated_ts)"
        f" VALUES {values}"
    )


def used_bytes(conn: sqlite3.Connection) -> int:
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


def is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


def create_private(path: Path) -> None:
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


def connect(path: Path, migrate_schema: bool, max_bytes: int) -> sqlite3.Connection:
    """A connection to the store at ``path`` in WAL mode with ``synchronous=FULL`` (every
    commit fsynced), the WAL bounded by :func:`wal_budget`; migrated when asked."""
    create_private(path)
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


def load_codec(conn: sqlite3.Connection) -> BodyCodec:
    """The shipped dictionary, recorded in the store before any row uses it, and every
    dictionary older rows were written with."""
    shipped = shipped_dictionary()
    conn.execute(
        "INSERT OR IGNORE INTO dictionaries (id, data) VALUES (?, ?)",
        (dictionary_id(shipped), shipped),
    )
    known = dict(conn.execute("SELECT id, data FROM dictionaries").fetchall())
    return BodyCodec(shipped, known)


# --- committing ------------------------------------------------------------------------


class Committer:
    """Commits batches of appends on one connection (in the writer process)."""

    def __init__(self, conn: sqlite3.Connection, codec: BodyCodec, *, max_bytes: int) -> None:
        self._conn = conn
        self._codec = codec
        self._max_bytes = max_bytes
        self._db_budget = database_budget(max_bytes)
        self._used_estimate = 0
        """Bytes in use as last measured, plus what was committed since."""
        self._commits_since_measure = 256

    def commit_batch(self, batch: Sequence[WireAppend]) -> list[int | Exception | None]:
        """One transaction for the whole batch: each item's intent id (or None), or the
        error. If the transaction fails for a reason one item brought (a duplicate id),
        each item is retried alone."""
        try:
            return list(self._transaction(batch))
        except StoreError as exc:
            if isinstance(exc, StoreFull) or len(batch) == 1:
                return [exc] * len(batch)
        out: list[int | Exception | None] = []
        for item in batch:
            try:
                out.extend(self._transaction([item]))
            except StoreError as exc:
                out.append(exc)
        return out

    def _transaction(self, batch: Sequence[WireAppend]) -> list[int | None]:
        """One transaction for the batch, in as few statements as possible."""
        conn = self._conn
        fans = any(type(row) is FanOut for item in batch for row in item[0])
        intents = [item[2] for item in batch if item[2] is not None]
        done = [item[1] for item in batch if item[1] is not None]
        captures = [self._capture_row(Capture(*item[3])) for item in batch if item[3] is not None]
        try:
            # The common batch, plain events only, is one statement: its own transaction.
            # A fan-out's seq is given, so its batch reads where seqs start inside one.
            alone = not fans and not intents and not done and not captures
            next_seq: int | None = None
            if fans:
                conn.execute("BEGIN IMMEDIATE")
                (next_seq,) = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM events"
                ).fetchone()
            rows = _insert_rows(batch, next_seq)
            frames = self._codec.compress_many(rows[_BODY::_EVENT_ARITY])
            rows[_BODY::_EVENT_ARITY] = frames
            n_rows = len(rows) // _EVENT_ARITY
            incoming = sum(map(len, frames)) + _ROW_OVERHEAD * n_rows
            incoming += sum(len(i) + 50 for i in intents)
            incoming += sum(len(c[2] or b"") + len(c[3] or b"") + 80 for c in captures)
            # Intents count too: a write whose intent fits no more must not be forwarded.
            if (n_rows or intents) and not self._has_room(incoming):
                raise StoreFull(f"audit store is full (max_bytes={self._max_bytes})")
            if alone and n_rows <= _ROWS_PER_STATEMENT:
                conn.execute(_insert_events_sql(n_rows), rows)
                self._used_estimate += incoming
                return [None] * len(batch)
            if not fans:
                conn.execute("BEGIN IMMEDIATE")
            for offset in range(0, n_rows, _ROWS_PER_STATEMENT):
                chunk = rows[offset * _EVENT_ARITY : (offset + _ROWS_PER_STATEMENT) * _EVENT_ARITY]
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
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                if is_full(exc):
                    raise StoreFull(f"audit store disk is full: {exc}") from exc
                raise StoreError(f"audit store write failed: {exc}") from exc
            raise
        results: list[int | None] = []
        for item in batch:
            if item[2] is not None:
                results.append(first_intent)
                first_intent += 1
            else:
                results.append(None)
        return results

    def _capture_row(self, capture: Capture) -> tuple[str, float, bytes | None, bytes | None]:
        """A capture as its row, bodies compressed."""
        request, response = (
            None if body is None else self._codec.compress_many([body])[0]
            for body in (capture.request, capture.response)
        )
        return capture.request_id, time.time(), request, response

    def _has_room(self, incoming: int) -> bool:
        """Whether ``incoming`` bytes fit under ``max_bytes``. Far from the limit, the pages
        in use are read from SQLite only every 256 commits and a running estimate is used
        in between; within 10% of the limit they are read before every commit, as a full
        store needs."""
        self._commits_since_measure += 1
        if (
            self._commits_since_measure >= 256
            or self._used_estimate + incoming > self._db_budget * 0.9
        ):
            self._used_estimate = used_bytes(self._conn)
            self._commits_since_measure = 0
        return self._used_estimate + incoming <= self._db_budget


# --- checkpointing ---------------------------------------------------------------------

CHECKPOINT_EVERY = 0.05
"""Seconds between background checkpoints while commits keep coming."""


class Checkpointer:
    """Copies the WAL's committed pages into the database from a thread of its own, on
    its own connection, so that a commit seldom waits for a checkpoint.

    Left to itself, SQLite checkpoints inline, in the commit that takes the WAL past
    ``wal_autocheckpoint`` pages, and that commit's callers wait while everything written
    since the last checkpoint is copied and fsynced. A passive checkpoint here, at most
    every :data:`CHECKPOINT_EVERY` seconds while commits come, leaves the inline one only
    the last pages. ``wal_autocheckpoint`` remains the WAL's bound: a checkpoint restarts
    the WAL only if it caught up with every commit, which one running beside a busy
    committer seldom does, so the committer's connection still checkpoints past it."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self._conn = connect(path, False, max_bytes)
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Pages were committed: checkpoint them soon."""
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._stopping:
                return
            self._wanted.clear()
            with contextlib.suppress(sqlite3.Error):  # the inline checkpoint still bounds it
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            time.sleep(CHECKPOINT_EVERY)

    def close(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()
        self._conn.close()


# --- the process -----------------------------------------------------------------------


def _read_message(stream: BinaryIO) -> Any:
    """The next message, or None at end of file (or when the proxy's end was torn down
    with unread answers: a reset)."""
    try:
        head = stream.read(FRAME.size)
        if len(head) < FRAME.size:
            return None
        (length,) = FRAME.unpack(head)
        body = stream.read(length)
    except ConnectionError:
        return None
    if len(body) < length:
        return None
    return pickle.loads(body)


def _send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=5)
    sock.sendall(FRAME.pack(len(data)) + data)


def serve(sock: socket.socket, path: Path, max_bytes: int) -> None:
    """Open the store, say so (``("ready", journal_mode, synchronous)`` or
    ``("failed", reason)``), then commit each batch received and answer
    ``(results, seconds, rows)`` until end of file."""
    try:
        conn = connect(path, False, max_bytes)
        committer = Committer(conn, load_codec(conn), max_bytes=max_bytes)
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
        checkpointer = Checkpointer(path, max_bytes)
    except (OSError, sqlite3.Error) as exc:
        _send(sock, ("failed", f"cannot open the audit store at {path}: {exc}"))
        return
    _send(sock, ("ready", mode, synchronous))
    with sock.makefile("rb") as stream:
        while (batch := _read_message(stream)) is not None:
            t0 = time.perf_counter()
            try:
                results = committer.commit_batch(batch)
            except BaseException as exc:  # never leave callers hanging
                results = [StoreError(f"audit store write failed: {exc}")] * len(batch)
            spent = time.perf_counter() - t0
            checkpointer.committed()
            try:
                _send(sock, (results, spent, sum(events_in(item[0]) + 1 for item in batch)))
            except OSError:
                break  # the proxy is gone
    checkpointer.close()
    with contextlib.suppress(sqlite3.Error):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def main(argv: Sequence[str]) -> int:
    # The proxy decides when the writer stops: a Ctrl-C or a SIGTERM sent to the whole
    # process group must not cut a commit short. End of file on the socket stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd, path, max_bytes = int(argv[0]), Path(argv[1]), int(argv[2])
    with socket.socket(fileno=fd) as sock:
        serve(sock, path, max_bytes)
    return 0
