"""The store's tables as its records declare them, and the SQL made from those
declarations: no column list is written twice.

An ``events`` row is, in this order of columns (the order only the SQL here relies on):
where the writer placed it (``seq``, ``fan``, ``leaf``, ``leaf_hashes``), the event as the
builder describes it (:class:`~proxy.store.records.EventRow`), and its delivery state
(:class:`DeliveryState`).
The readers read :class:`StoredRow`. A ``captures`` row is a :class:`StoredCapture`.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable
from typing import NamedTuple

from proxy.store.records import EventRow


class DeliveryState(NamedTuple):
    """The ``events`` columns that delivery changes (the rest of a row never changes)."""

    status: str
    """An :class:`~proxy.store.records.EventStatus` value."""
    attempts: int
    """Failed delivery attempts so far."""
    next_attempt_at: float | None
    """Not to be sent before this POSIX time (backoff)."""
    last_error: str | None
    """The last delivery failure, or the repository's rejection."""
    delivered_at: float | None
    """When the repository acknowledged it (POSIX time): retention counts from it."""


class StoredRow(NamedTuple):
    """An ``events`` row as delivery and the admin reads read it back: enough to give its
    events (one, or a fan-out's ``fan``) with their delivery state."""

    seq: int
    """The row's seq: its last event's (a fan-out's events have the ``fan`` seqs up to it)."""
    fan: int | None
    """How many events a fan-out row holds; None for a row of one event."""
    event_id: str
    """The event's id (a fan-out's first event's)."""
    body: bytes
    """As stored: a zstd frame (or plain JSON, rows older than compression)."""
    status: str
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    recorded: str
    recorded_ts: float
    patients: str
    """``|Patient/1|…|``: a fan-out's events' patients, in their order."""
    leaf: int | None
    """The log's leaf index of the row's first event (its others follow); None for rows
    stored before the log."""

    @property
    def seqs(self) -> range:
        """The seqs of the row's events."""
        return range(self.seq - (self.fan or 1) + 1, self.seq + 1)


class StoredCapture(NamedTuple):
    """A ``captures`` row: the bodies of one exchange, compressed like event bodies."""

    request_id: str
    created_at: float
    """POSIX time: captures are pruned as delivered events are."""
    request: bytes | None
    response: bytes | None


def columns(names: Iterable[str], prefix: str = "") -> str:
    """``a, b, c`` (each name after ``prefix``, a table's alias as ``e.``)."""
    return ", ".join(prefix + name for name in names)


INSERTED: tuple[str, ...] = ("seq", "fan", "leaf", "leaf_hashes", *EventRow._fields)
"""The columns of a new ``events`` row, in the order of its values: where the writer
places it (queue and log), then the builder's :class:`~proxy.store.records.EventRow`."""

ROW_WIDTH = len(INSERTED)
"""Values per inserted row."""

BODY_AT = INSERTED.index("body")
"""Where the body is among an inserted row's values (the writer compresses it there)."""

ROWS_PER_STATEMENT = 256
"""Rows per multi-row INSERT."""

assert ROWS_PER_STATEMENT * ROW_WIDTH < 32766, "SQLite's limit on parameters per statement"


@functools.cache
def insert_events_sql(n_rows: int) -> str:
    """One INSERT of ``n_rows`` new rows, each given as :data:`INSERTED`."""
    row = "(" + ", ".join("?" * ROW_WIDTH) + ")"
    return f"INSERT INTO events ({columns(INSERTED)}) VALUES {', '.join([row] * n_rows)}"


SPLIT_INSERT = (
    f"INSERT INTO events ({columns(('seq', 'leaf', 'leaf_hashes', *EventRow._fields))}"
    f", {columns(DeliveryState._fields)})"
    f" VALUES ({', '.join('?' * (3 + len(EventRow._fields) + len(DeliveryState._fields)))})"
)
"""Insert one event of a fan-out being split: its seq, leaf and leaf hash, its row, the
fan-out's state."""

SELECT_ROW = f"SELECT {columns(EventRow._fields)} FROM events WHERE seq = ?"
"""The :class:`~proxy.store.records.EventRow` of the row ``seq``, as stored."""

SELECT_LEAF = "SELECT leaf, leaf_hashes FROM events WHERE seq = ?"
"""The leaf index of the row ``seq`` (its first event's), and its events' leaf hashes."""

SELECT_STATE = f"SELECT {columns(DeliveryState._fields)} FROM events WHERE seq = ?"
"""The :class:`DeliveryState` of the row ``seq``."""

STORED = columns(StoredRow._fields)
"""The select list of a :class:`StoredRow`, from ``events``."""

STORED_E = columns(StoredRow._fields, "e.")
"""The same, from ``events`` aliased ``e``."""

INSERT_CAPTURE = (
    f"INSERT OR REPLACE INTO captures ({columns(StoredCapture._fields)})"
    f" VALUES ({', '.join('?' * len(StoredCapture._fields))})"
)


def stored_rows(cursor: sqlite3.Cursor) -> list[StoredRow]:
    """The rows of a query that selected :data:`STORED` (or :data:`STORED_E`)."""
    return list(map(StoredRow._make, cursor))
