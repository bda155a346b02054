"""The writer process's transaction: one group commit, as a sequence of named steps.

:data:`STEPS` lists them in the order they run: assign seqs, append leaves (the Merkle
log's, :mod:`proxy.store.leaves`), insert events, settle intents, record intents, insert
captures. :class:`Committer` makes each step for a batch
(that is its *prepare*), checks the disk budget against what they will add, then calls
each step's ``write`` inside one transaction and commits it (one fsync).

The contract of a step (:class:`Step`), which a new one (the Merkle log's leaves, say)
keeps too, and then is one more entry in :data:`STEPS`:

- **prepare**: calling the step's class with the :class:`Transaction` makes the step. It
  runs before the transaction begins and writes nothing to the database (it may read).
  It does the step's work that needs no database (encoding, hashing) and says on the
  transaction what its ``write`` will cost: :meth:`Transaction.plan` with the statements
  it will run and the bytes it will add (held against the disk budget). Every new
  row's seq is known once ``assign seqs`` has written (:attr:`Transaction.seqs`).
- **write**: runs inside the transaction, after every step was prepared, in the order of
  :data:`STEPS`. It reads what earlier steps left on the transaction (:attr:`Transaction.seqs`,
  :attr:`Transaction.intent_ids`) and leaves there what later steps or the answer need
  (and :attr:`Transaction.ends`, where what it appends to ends now).
  It neither commits nor rolls back: an ``sqlite3.Error`` fails the batch, which the
  committer then retries one submission at a time, so that the submission at fault fails
  alone.
- A step with nothing to do for a batch plans nothing and writes nothing. A batch without
  events whose steps plan one statement in all runs it without BEGIN and COMMIT (the
  statement is its own transaction): a group commit of intents alone is one INSERT.

Where the events and the log end (the next seq, the next leaf) the committer keeps
between commits (:class:`Ends`), and reads again only when another connection committed
since its last transaction (``PRAGMA data_version``, read once the write lock is held): a
second writer on the same file (another engine, an admin command) may have appended. A
batch of events is therefore always an explicit transaction: BEGIN, that pragma, its
statements, COMMIT.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

from proxy.log.tree import TILE_WIDTH, split_hashes
from proxy.store.codec import BodyCodec
from proxy.store.database import database_budget, is_full, used_bytes
from proxy.store.faces import StoreError, StoreFull
from proxy.store.leaves import (
    HASH_BYTES,
    append_leaves,
    event_leaves,
    template_leaves,
    tree_size,
)
from proxy.store.records import Capture, EventRow, FanOut
from proxy.store.tables import (
    BODY_AT,
    INSERT_CAPTURE,
    ROW_WIDTH,
    ROWS_PER_STATEMENT,
    StoredCapture,
    insert_events_sql,
)
from proxy.store.wire import Submission

_ROW_OVERHEAD = 300
"""Bytes a row takes beside its body (columns and three index entries), overestimated."""


class NewRow(NamedTuple):
    """An ``events`` row to insert."""

    fan: int | None
    """How many events it holds (a fan-out's), None for one."""
    row: EventRow
    """As stored (a fan-out's :meth:`~proxy.store.records.FanOut.stored`); its body JSON."""


@dataclass(slots=True)
class Ends:
    """Where the ``events`` table and the Merkle log end, as the committer's last commit
    left them: None where not known (before the first commit, after a failed one, after
    another connection committed), which the steps then read in the transaction."""

    seq: int | None = None
    """The seq the next new row's first event takes."""
    leaf: int | None = None
    """The leaf index of the next new event: the tree's size."""
    tile: bytes | None = None
    """The leaf hashes of the log's partial tile (its leaves below ``leaf``), joined:
    a commit that completes the tile need not read them back."""


@dataclass(slots=True)
class Transaction:
    """One batch as its steps see it: what was submitted, and what the steps say and leave
    for each other."""

    conn: sqlite3.Connection
    codec: BodyCodec
    """The writer's: compresses new bodies."""
    submissions: Sequence[Submission]
    rows: list[NewRow]
    """Every new ``events`` row of the batch, in submission order."""
    now: float
    """POSIX time of the commit."""
    ends: Ends
    """Where the events and the log end before this batch (None where not known); the
    steps set them to where they end after it, which the committer keeps once the batch
    is committed."""
    statements: int = 0
    """Statements the steps will run (:meth:`plan`)."""
    incoming: int = 0
    """Bytes the steps will add (:meth:`plan`)."""
    seqs: list[int] | None = None
    """Each row's seq, as ``assign seqs`` placed them (None when the batch has no rows)."""
    intent_ids: list[int | None] | None = None
    """Each submission's recorded intent's id, or None (``record intents``); None when
    the batch recorded no intent."""
    leaves: list[int] | None = None
    """Each row's leaf index in the log, its first event's (``append leaves``); None when
    no step placed the rows in the log."""
    leaf_hashes: list[bytes] | None = None
    """Each row's events' leaf hashes, one after the other (``append leaves``)."""

    @classmethod
    def of(
        cls,
        conn: sqlite3.Connection,
        codec: BodyCodec,
        batch: Sequence[Submission],
        ends: Ends | None = None,
    ) -> Transaction:
        rows = [
            NewRow(fan=len(row.patients), row=row.stored())
            if isinstance(row, FanOut)
            else NewRow(fan=None, row=row)
            for submission in batch
            for row in submission.rows
        ]
        return cls(
            conn=conn,
            codec=codec,
            submissions=batch,
            rows=rows,
            now=time.time(),
            ends=Ends() if ends is None else Ends(seq=ends.seq, leaf=ends.leaf, tile=ends.tile),
        )

    def plan(self, *, statements: int, incoming: int = 0) -> None:
        """A step will run ``statements`` statements and add about ``incoming`` bytes."""
        self.statements += statements
        self.incoming += incoming

    def results(self) -> list[int | None]:
        """Each submission's result: the id of the intent it recorded, or None."""
        return self.intent_ids or [None] * len(self.submissions)


class Step(Protocol):
    """One named part of the transaction (the contract is the module's)."""

    name: ClassVar[str]
    """What the step does, as errors name it."""

    def __init__(self, tx: Transaction) -> None:
        """Prepare: before the transaction, no database writes; :meth:`Transaction.plan`
        what :meth:`write` will cost."""

    def write(self, tx: Transaction) -> None:
        """This step's statements, inside the transaction."""


class AssignSeqs:
    """Each new row's seq, from the first free one on: a fan-out's seq is its last
    event's, the seqs of its other events kept free below it. Where the table ends is
    read (one statement) only when the committer does not know it."""

    name: ClassVar[str] = "assign seqs"

    def __init__(self, tx: Transaction) -> None:
        if tx.rows and tx.ends.seq is None:
            tx.plan(statements=1)

    def write(self, tx: Transaction) -> None:
        if not tx.rows:
            return
        next_seq = tx.ends.seq
        if next_seq is None:
            (next_seq,) = tx.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()
        seqs = []
        for new in tx.rows:
            next_seq += new.fan or 1
            seqs.append(next_seq - 1)
        tx.seqs = seqs
        tx.ends.seq = next_seq


class AppendLeaves:
    """The Merkle log's leaves of the new events (:mod:`proxy.log`), in the commit that
    stores them: no event is acknowledged without its leaf. Prepare makes each event's
    entry and leaf hash (a fan-out's events one by one, in queue order): joined from the
    parts its submission brought (:mod:`proxy.audit.encoding`), or from its JSON for a
    submission that brought none (events from outside, R5 events); write takes
    where the tree ends (read only when the committer does not know it), writes every
    tile the new leaves complete, one row each (:mod:`proxy.store.leaves`), and
    leaves each row's first leaf and its leaf hashes on the transaction for ``insert
    events``, which stores them in the row."""

    name: ClassVar[str] = "append leaves"

    def __init__(self, tx: Transaction) -> None:
        self._rows = _row_leaves(tx)
        if self._rows:
            # Where the tree ends when not known, a completed tile's hashes when one is.
            added = sum(len(h) for h in self._rows) // 32
            tx.plan(statements=int(tx.ends.leaf is None), incoming=HASH_BYTES * added)

    def write(self, tx: Transaction) -> None:
        if not self._rows:
            return
        first, tile = tx.ends.leaf, tx.ends.tile
        if first is None:
            first, tile = tree_size(tx.conn), None
        if first % TILE_WIDTH == 0:
            tile = b""
        leaves = []
        at = first
        for new in tx.rows:
            leaves.append(at)
            at += new.fan or 1
        tx.leaves = leaves
        tx.leaf_hashes = self._rows
        tx.ends.leaf = at
        joined = b"".join(self._rows)
        if at // TILE_WIDTH > first // TILE_WIDTH:
            partial = None if tile is None else split_hashes(tile)
            append_leaves(tx.conn, first, split_hashes(joined), partial)
            # The new partial tile is among this batch's leaves.
            tx.ends.tile = joined[32 * (at - at % TILE_WIDTH - first) :]
        else:
            tx.ends.tile = None if tile is None else tile + joined


def _row_leaves(tx: Transaction) -> list[bytes]:
    """Each new row's leaf hashes: their entries joined as the template its submission
    brought for it says (:attr:`~proxy.store.wire.Submission.entries`), else made from
    the events' JSON."""
    out: list[bytes] = []
    rows = iter(tx.rows)
    for submission in tx.submissions:
        templates = submission.entries
        if templates is None or len(templates) != len(submission.rows):
            templates = [None] * len(submission.rows)
        for template in templates:
            new = next(rows)
            if template is None:
                out.append(b"".join(event_leaves(new.fan, new.row)))
            else:
                out.append(b"".join(template_leaves(template, new.fan, new.row)))
    return out


class InsertEvents:
    """The new rows, their bodies compressed, in multi-row INSERTs."""

    name: ClassVar[str] = "insert events"

    def __init__(self, tx: Transaction) -> None:
        self._frames = tx.codec.compress_many([new.row.body for new in tx.rows])
        if self._frames:
            n_rows = len(tx.rows)
            tx.plan(
                statements=-(-n_rows // ROWS_PER_STATEMENT),
                incoming=sum(map(len, self._frames)) + _ROW_OVERHEAD * n_rows,
            )

    def write(self, tx: Transaction) -> None:
        if not tx.rows:
            return
        values: list[Any] = []
        unplaced: list[int | None] = [None] * len(tx.rows)
        seqs: Sequence[int | None] = tx.seqs or unplaced
        leaves: Sequence[int | None] = tx.leaves or unplaced
        hashes: Sequence[bytes | None] = tx.leaf_hashes or [None] * len(tx.rows)
        for seq, leaf, leaf_hashes, new in zip(seqs, leaves, hashes, tx.rows, strict=True):
            values += (seq, new.fan, leaf, leaf_hashes, *new.row)
        values[BODY_AT::ROW_WIDTH] = self._frames
        width = ROWS_PER_STATEMENT * ROW_WIDTH
        for start in range(0, len(values), width):
            chunk = values[start : start + width]
            tx.conn.execute(insert_events_sql(len(chunk) // ROW_WIDTH), chunk)


class SettleIntents:
    """The intents the batch's appends complete, deleted."""

    name: ClassVar[str] = "settle intents"

    def __init__(self, tx: Transaction) -> None:
        self._done = [s.complete_intent for s in tx.submissions if s.complete_intent is not None]
        if self._done:
            tx.plan(statements=1)

    def write(self, tx: Transaction) -> None:
        if self._done:
            marks = ",".join("?" * len(self._done))
            tx.conn.execute(f"DELETE FROM intents WHERE id IN ({marks})", self._done)


class RecordIntents:
    """The batch's new intents, in one INSERT; their ids go to :attr:`Transaction.intent_ids`."""

    name: ClassVar[str] = "record intents"

    def __init__(self, tx: Transaction) -> None:
        self._summaries = [s.intent for s in tx.submissions if s.intent is not None]
        if self._summaries:
            tx.plan(statements=1, incoming=sum(len(summary) + 50 for summary in self._summaries))

    def write(self, tx: Transaction) -> None:
        if not self._summaries:
            return
        values = ",".join(["(?, ?)"] * len(self._summaries))
        args = [v for summary in self._summaries for v in (tx.now, summary)]
        cur = tx.conn.execute(f"INSERT INTO intents (created_at, summary) VALUES {values}", args)
        # Rowids of one multi-row insert, which holds the write lock from its first row to
        # its last, are consecutive (max(rowid) + 1 each), so the first is derived.
        assert cur.lastrowid is not None
        next_id = cur.lastrowid - len(self._summaries) + 1
        ids: list[int | None] = []
        for submission in tx.submissions:
            if submission.intent is None:
                ids.append(None)
            else:
                ids.append(next_id)
                next_id += 1
        tx.intent_ids = ids


class InsertCaptures:
    """The exchanges' captured bodies, compressed as event bodies are."""

    name: ClassVar[str] = "insert captures"

    def __init__(self, tx: Transaction) -> None:
        captures = [s.capture for s in tx.submissions if s.capture is not None]
        self._rows = [self._row(capture, tx) for capture in captures]
        if self._rows:
            tx.plan(
                statements=1,
                incoming=sum(
                    len(c.request or b"") + len(c.response or b"") + 80 for c in self._rows
                ),
            )

    @staticmethod
    def _row(capture: Capture, tx: Transaction) -> StoredCapture:
        compress = tx.codec.compress_many
        return StoredCapture(
            request_id=capture.request_id,
            created_at=tx.now,
            request=None if capture.request is None else compress([capture.request])[0],
            response=None if capture.response is None else compress([capture.response])[0],
        )

    def write(self, tx: Transaction) -> None:
        if self._rows:
            tx.conn.executemany(INSERT_CAPTURE, self._rows)


STEPS: tuple[type[Step], ...] = (
    AssignSeqs,
    AppendLeaves,
    InsertEvents,
    SettleIntents,
    RecordIntents,
    InsertCaptures,
)
"""The transaction's steps, in order: each prepared by making it, then written."""


class Committer:
    """Commits batches on one connection (in the writer process), within the disk budget."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        codec: BodyCodec,
        *,
        max_bytes: int,
        steps: Sequence[type[Step]] = STEPS,
    ) -> None:
        self._conn = conn
        self._codec = codec
        self._steps = steps
        self._max_bytes = max_bytes
        self._db_budget = database_budget(max_bytes)
        self._used_estimate = 0
        """Bytes in use as last measured, plus what was committed since."""
        self._commits_since_measure = 256
        self._ends = Ends()
        """Where the events and the log end, as the last commit left them."""
        self._data_version: int | None = None
        """``PRAGMA data_version`` as the last transaction read it: it changes when
        another connection commits."""

    def commit_batch(self, batch: Sequence[Submission]) -> list[int | Exception | None]:
        """One transaction for the whole batch: each submission's intent id (or None), or
        the error. If the transaction fails for a reason one submission brought (a
        duplicate id), each is retried alone."""
        try:
            return list(self._transaction(batch))
        except StoreError as exc:
            if isinstance(exc, StoreFull) or len(batch) == 1:
                return [exc] * len(batch)
        out: list[int | Exception | None] = []
        for submission in batch:
            try:
                out.extend(self._transaction([submission]))
            except StoreError as exc:
                out.append(exc)
        return out

    def _transaction(self, batch: Sequence[Submission]) -> list[int | None]:
        """Prepare every step, check the budget, write every step in one transaction."""
        conn = self._conn
        at = "commit"
        try:
            tx = Transaction.of(conn, self._codec, batch, self._ends)
            steps = [step(tx) for step in self._steps]
            # Intents count too: a write whose intent fits no more must not be forwarded.
            if tx.incoming and not self._has_room(tx.incoming):
                raise StoreFull(f"audit store is full (max_bytes={self._max_bytes})")
            # Events need the ends: read with the write lock held, so that nobody appends
            # between the check and the insert.
            explicit = tx.statements > 1 or bool(tx.rows)
            if explicit:
                conn.execute("BEGIN IMMEDIATE")
            if tx.rows:
                (version,) = conn.execute("PRAGMA data_version").fetchone()
                if version != self._data_version:
                    tx.ends = Ends()
                    self._data_version = version
            for step in steps:
                at = step.name
                step.write(tx)
            at = "commit"
            if explicit:
                conn.execute("COMMIT")
        except BaseException as exc:
            self._ends = Ends()  # read again in the next transaction
            self._data_version = None
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                if is_full(exc):
                    raise StoreFull(f"audit store disk is full ({at}): {exc}") from exc
                raise StoreError(f"audit store write failed ({at}): {exc}") from exc
            raise
        self._used_estimate += tx.incoming
        self._ends = tx.ends
        return tx.results()

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
