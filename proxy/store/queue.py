"""The durable write-ahead queue: one store file, SQLite in WAL mode with
``synchronous=FULL``, as the proxy opens it.

:class:`AuditQueue` is the faces of :mod:`proxy.store.faces` over one
:class:`~proxy.store.shard.Shard`: the writer face (:mod:`proxy.store.appends`), the
delivery face (:mod:`proxy.store.delivery`), the reader face (:mod:`proxy.store.reads`), the
report face (:mod:`proxy.store.reports`) and the Merkle log's (:mod:`proxy.store.log`).
Whoever opens it hands each user the face it uses.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from proxy.store.appends import ShardWriter
from proxy.store.database import connect, load_codec
from proxy.store.delivery import ShardDelivery
from proxy.store.engine import CommitEngine, CommitReport
from proxy.store.faces import StoreError
from proxy.store.log import ShardLog
from proxy.store.reads import ShardReader
from proxy.store.reports import ShardReports
from proxy.store.shard import Shard


class AuditQueue(ShardWriter, ShardDelivery, ShardReader, ShardReports, ShardLog):
    """One store file's faces: the three of the audit trail, the report face and the
    Merkle log's. Open it with :meth:`open`; one per store file."""

    @property
    def engine(self) -> CommitEngine:
        """The commit engine (tests read its writer process)."""
        return self._shard.engine

    @property
    def commits(self) -> int:
        """Group commits done (tests and the benchmark read it)."""
        return self._shard.engine.commits

    @property
    def commit_seconds(self) -> float:
        """Time the writer spent committing (the benchmark reads it)."""
        return self._shard.engine.commit_seconds

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        max_bytes: int,
        commit_batch_max: int = 512,
        create: bool = True,
        start_writer: bool = True,
        on_commit: CommitReport | None = None,
    ) -> AuditQueue:
        """Open (creating and migrating) the store at ``path`` and start the writer.
        With ``create=False`` (commands that only read or tidy a store) a missing store is
        a :class:`StoreError` instead of a new empty one; with ``start_writer=False`` the
        writer process starts at the first append, if one comes. ``on_commit`` is told of
        every group commit (the proxy's metrics)."""
        path = Path(path)
        if not create and not path.is_file():
            raise StoreError(
                f"no audit store at {path}: check store.path in the configuration given with"
                " -c/--config (or $FHIR_AUDIT_CONFIG)"
            )
        try:
            setup = await asyncio.to_thread(connect, path, True, max_bytes)
            try:
                codec = await asyncio.to_thread(load_codec, setup)
            finally:
                setup.close()
            reader = await asyncio.to_thread(connect, path, False, max_bytes)
        except (OSError, sqlite3.Error, RuntimeError) as exc:  # RuntimeError: schema too new
            raise StoreError(f"cannot open the audit store at {path}: {exc}") from exc
        try:
            engine = await CommitEngine.start(
                path,
                max_bytes=max_bytes,
                batch_max=commit_batch_max,
                start_writer=start_writer,
                on_commit=on_commit,
            )
        except BaseException:
            reader.close()
            raise
        return cls(Shard(engine, reader, codec))

    async def close(self) -> None:
        """Finish pending appends, checkpoint the WAL and close."""
        await self._shard.close()
