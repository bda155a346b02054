"""The store's writer process: it alone commits appends, intents and captures.

The proxy's event loop (:class:`proxy.store.engine.CommitEngine`) hands it batches over a
socket (:mod:`proxy.store.wire`); it commits each batch in one transaction, one fsync
(:mod:`proxy.store.transaction`), on its own ``sqlite3`` connection and answers with each
submission's result. It is a process, not a thread, so that its Python work and the
``sqlite3`` module's GIL hand-offs around every statement never stall the event loop.

It ignores SIGINT and SIGTERM (the proxy decides when to stop) and ends when its socket
reaches end of file: once the proxy has closed it, or the proxy is gone (even ``kill -9``).
It then checkpoints the WAL and exits. Nothing it commits is acknowledged to anyone before
the proxy reads its answer, so a batch committed after the proxy died is only an event
recorded whose answer nobody got.

Started by the engine as ``main([FD, PATH, MAX_BYTES])``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from proxy.store.database import connect, load_codec
from proxy.store.faces import StoreError
from proxy.store.records import events_in
from proxy.store.transaction import Committer
from proxy.store.wire import (
    FRAME,
    Committed,
    Failed,
    Ready,
    Submission,
    decode_batch,
    encode_answer,
)

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


def _read_batch(stream: BinaryIO) -> list[Submission] | None:
    """The next batch, or None at end of file (or when the proxy's end was torn down
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
    return decode_batch(body)


def _send(sock: socket.socket, message: Ready | Failed | Committed) -> None:
    sock.sendall(encode_answer(message))


def serve(sock: socket.socket, path: Path, max_bytes: int) -> None:
    """Open the store, say so (:class:`Ready` or :class:`Failed`), then commit each batch
    received and answer it (:class:`Committed`) until end of file."""
    try:
        conn = connect(path, False, max_bytes)
        committer = Committer(conn, load_codec(conn), max_bytes=max_bytes)
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
        checkpointer = Checkpointer(path, max_bytes)
    except (OSError, sqlite3.Error) as exc:
        _send(sock, Failed(reason=f"cannot open the audit store at {path}: {exc}"))
        return
    _send(sock, Ready(journal_mode=mode, synchronous=synchronous))
    with sock.makefile("rb") as stream:
        while (batch := _read_batch(stream)) is not None:
            t0 = time.perf_counter()
            try:
                results = committer.commit_batch(batch)
            except BaseException as exc:  # never leave callers hanging
                results = [StoreError(f"audit store write failed: {exc}")] * len(batch)
            spent = time.perf_counter() - t0
            checkpointer.committed()
            records = sum(events_in(submission.rows) + 1 for submission in batch)
            try:
                _send(sock, Committed(results=results, seconds=spent, records=records))
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
