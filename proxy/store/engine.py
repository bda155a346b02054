"""The commit engine: appends made durable by group commit, in a writer process.

Appends collect on the event loop while the writer is busy; when it is free, everything
collected is sent at once to the writer process (:mod:`proxy.store.writer_process`), which
commits it in one transaction (one fsync) and answers once for the whole batch, releasing
all its callers. Durability per event gets cheaper as load rises: one message each way per
commit, not per append.

The writer is a process, not a thread of the proxy, so that its Python work (SQLite
statements, compression) never takes the GIL from the event loop. If it dies, the batch
it held fails (its callers get 503: their events may or may not be stored) and a new
writer is started for the appends that follow. The engine knows nothing of what a commit
writes (:mod:`proxy.store.transaction` does) and reports each commit to the callback it
is given (:data:`CommitReport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.store.faces import StoreError
from proxy.store.records import events_in
from proxy.store.wire import (
    FRAME,
    Committed,
    Failed,
    Ready,
    Submission,
    decode_answer,
    encode_batch,
)

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory the ``proxy`` package is imported from: the writer imports the same."""


def _interpreter() -> str:
    """This interpreter, to run the writer with. ``sys.executable`` may be a path this
    user cannot execute (a virtualenv's link into a directory closed to it, when the
    proxy was started under another user id); the running binary itself then serves."""
    if os.access(sys.executable, os.X_OK) or not os.path.exists("/proc/self/exe"):
        return sys.executable
    return "/proc/self/exe"


_WRITER_MAIN = (
    "import sys; from proxy.store.writer_process import main; sys.exit(main(sys.argv[1:]))"
)
"""The writer's command (not ``-m``: its exceptions must pickle as the module's own)."""

START_TIMEOUT_S = 60.0
"""How long a new writer process may take to open the store."""

CommitReport = Callable[[float, int], None]
"""Told of each group commit, on the event loop: the seconds the writer spent on it and
the records (events and intents) it wrote. It must not raise."""


@dataclass(frozen=True, slots=True, eq=False)
class Append:
    """One caller's share of a group commit, waiting on the event loop."""

    submission: Submission
    """What the writer process commits for it."""
    future: asyncio.Future[int | None] = field(repr=False)
    """Resolved with its result (the id of the intent it recorded, or None) or its error."""


class _WriterLink(asyncio.Protocol):
    """The event loop's end of the socket to the writer process: whole messages to the
    engine, end of file or an error as the writer lost."""

    def __init__(self, engine: CommitEngine) -> None:
        self._engine = engine
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= FRAME.size:
            (length,) = FRAME.unpack_from(buffer)
            end = FRAME.size + length
            if len(buffer) < end:
                return
            message = decode_answer(buffer[FRAME.size : end])
            del buffer[:end]
            self._engine._received(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._engine._writer_lost()


class CommitEngine:
    """Group commits of appends, intents and captures, made by one writer process."""

    def __init__(
        self, path: Path, *, max_bytes: int, batch_max: int, on_commit: CommitReport | None
    ) -> None:
        """Use :meth:`start`."""
        self._path = path
        self._on_commit = on_commit
        self._max_bytes = max_bytes
        self._batch_max = batch_max
        self._loop = asyncio.get_running_loop()
        self._pending: list[Append] = []
        """Appends waiting for the writer."""
        self._in_flight: list[Append] | None = None
        """The batch the writer is committing."""
        self._kick_scheduled = False
        self._kick_at = 1
        """Pending appends that start a commit without waiting for the loop iteration."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False
        self.commits = 0
        """Group commits done (tests and the benchmark read it)."""
        self.commit_seconds = 0.0
        """Time the writer spent committing (the benchmark reads it)."""
        self.writer_settings: tuple[str, int] | None = None
        """``(journal_mode, synchronous)`` as the writer's connection reports them."""
        self._process: asyncio.subprocess.Process | None = None
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[None] | None = None
        self._starting: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        path: Path,
        *,
        max_bytes: int,
        batch_max: int,
        start_writer: bool = True,
        on_commit: CommitReport | None = None,
    ) -> CommitEngine:
        """The engine for a store that exists, migrated, with its writer process running:
        a :class:`StoreError` when the writer cannot open the store. With
        ``start_writer=False`` the writer starts at the first append (for a store that is
        mostly read, as the admin API reads other workers' shards). ``on_commit`` is told
        of every group commit."""
        engine = cls(path, max_bytes=max_bytes, batch_max=batch_max, on_commit=on_commit)
        if start_writer:
            await engine._start_writer()
        return engine

    @property
    def writer_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _start_writer(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            # The writer imports what this process imports, from where it imports it.
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *(p for p in sys.path if p)])
            self._process = await asyncio.create_subprocess_exec(
                _interpreter(),
                "-c",
                _WRITER_MAIN,
                str(theirs.fileno()),
                str(self._path),
                str(self._max_bytes),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise StoreError(f"cannot start the audit store's writer process: {exc}") from exc
        finally:
            theirs.close()
        self._ready = self._loop.create_future()
        transport, _ = await self._loop.create_unix_connection(lambda: _WriterLink(self), sock=ours)
        self._transport = transport
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT_S)
        except BaseException as exc:
            await self._stop_writer()
            if isinstance(exc, TimeoutError):
                raise StoreError(
                    f"the audit store's writer process did not open the store within"
                    f" {START_TIMEOUT_S:.0f} s"
                ) from exc
            raise

    def new_future(self) -> asyncio.Future[int | None]:
        """A future for an :class:`Append`, on the engine's loop."""
        return self._loop.create_future()

    def _received(self, message: Ready | Failed | Committed) -> None:
        """On the event loop: the writer's answer to a batch, or its first word."""
        ready = self._ready
        if ready is not None and not ready.done():
            if isinstance(message, Ready):
                self.writer_settings = (message.journal_mode, message.synchronous)
                ready.set_result(None)
            elif isinstance(message, Failed):
                ready.set_exception(StoreError(message.reason))
            return
        assert isinstance(message, Committed)
        batch, self._in_flight = self._in_flight, None
        assert batch is not None
        self.commits += 1
        self.commit_seconds += message.seconds
        if self._on_commit is not None:
            self._on_commit(message.seconds, message.records)
        self._resolve(batch, message.results)
        # The callers just released are about to append again (under load they are most
        # of the traffic). Start the next commit once half as many are waiting, rather
        # than at the end of the loop iteration: the writer commits one half while the
        # loop serves the other, so the disk does not wait for the loop. Under light
        # load the threshold is 1: no waiting.
        self._kick_at = max(1, len(batch) // 2)
        self._after_commit()

    def _writer_lost(self) -> None:
        """On the event loop: the writer's socket closed (it exited, or we closed it)."""
        self._transport = None
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(StoreError("the audit store's writer process exited at start"))
        batch, self._in_flight = self._in_flight, None
        if batch is not None:
            log.error("the audit store's writer process exited during a commit")
            self._resolve(
                batch,
                [StoreError("the audit store's writer process exited during the commit")]
                * len(batch),
            )
        self._after_commit()

    def _after_commit(self) -> None:
        if self._pending:
            self._hand_over()
        else:
            self._idle.set()

    async def close(self) -> None:
        """Commit what was accepted, then stop the writer (it checkpoints the WAL)."""
        if self.closed:
            return
        self.closed = True
        while self._pending or self._in_flight is not None or self._starting is not None:
            self._idle.clear()
            if self._pending and self._in_flight is None:
                self._kick()
            if self._starting is not None:
                with contextlib.suppress(Exception):
                    await self._starting
                continue
            await self._idle.wait()
        await self._stop_writer()

    async def _stop_writer(self) -> None:
        if self._transport is not None:
            self._transport.close()  # end of file: the writer checkpoints and exits
            self._transport = None
        process, self._process = self._process, None
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), START_TIMEOUT_S)
        except TimeoutError:
            log.error("the audit store's writer process did not stop: killing it")
            process.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)

    async def submit(self, item: Append) -> int | None:
        """Return once ``item`` is committed: its intent id, or None."""
        if self.closed:
            raise StoreError("the audit store is closed")
        self._pending.append(item)
        self._hand_over()
        return await item.future

    def _hand_over(self) -> None:
        """On the event loop, with appends pending: start a commit now if ``_kick_at`` of
        them are waiting, else at the end of this loop iteration at the latest, so every
        append made by the callbacks now ready joins the same commit. A busy writer takes
        everything pending when it is done."""
        if self._in_flight is not None:
            return
        if len(self._pending) >= self._kick_at:
            self._kick()
        elif not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        """On the event loop: send the writer everything pending (up to ``batch_max``
        rows), in one message."""
        self._kick_scheduled = False
        if self._in_flight is not None or not self._pending:
            return
        if self._transport is None:
            self._restart_writer()
            return
        size = 0
        take = 0
        for item in self._pending:
            size += events_in(item.submission.rows) + 1
            take += 1
            if size >= self._batch_max:
                break
        batch, self._pending = self._pending[:take], self._pending[take:]
        self._in_flight = batch
        self._idle.clear()
        data = encode_batch([item.submission for item in batch])
        self._transport.writelines((FRAME.pack(len(data)), data))

    def _restart_writer(self) -> None:
        """A writer for the pending appends: the first, or after the last one exited; if
        none can be started, the pending appends fail."""
        if self._starting is not None:
            return

        first = self._process is None and self.commits == 0

        async def restart() -> None:
            if first:
                log.debug("starting the audit store's writer process at its first append")
            else:
                log.warning("starting a new audit store writer process")
            try:
                await self._stop_writer()
                await self._start_writer()
            except (StoreError, OSError) as exc:
                pending, self._pending = self._pending, []
                self._resolve(pending, [StoreError(str(exc))] * len(pending))
            finally:
                self._starting = None
            self._after_commit()

        self._idle.clear()
        self._starting = self._loop.create_task(restart())

    @staticmethod
    def _resolve(batch: list[Append], results: list[int | Exception | None]) -> None:
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
