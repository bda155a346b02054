"""The messages between the commit engine (the proxy's event loop) and the store's writer
process, and how they travel: each is framed by its length (:data:`FRAME`), then pickled.

The engine sends a batch (:func:`encode_batch`, one message per group commit); the writer
answers first :class:`Ready` or :class:`Failed`, then one :class:`Committed` per batch.
A record crosses as the tuple of its fields in their declared order and is made again
from it on the other side (``_make``): plain tuples pickle in a fraction of the time of
the records themselves, and the order is the records' own declaration, not a second one.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from typing import NamedTuple

from proxy.log.entry import EntryTemplate
from proxy.store.records import Capture, EventRow, FanOut

FRAME = struct.Struct("!I")
"""Each message on the socket: its length, then its pickle."""


class Submission(NamedTuple):
    """One caller's share of a group commit, as the writer process commits it."""

    rows: list[EventRow | FanOut]
    """The events, each one's row or a fan-out of several."""
    complete_intent: int | None
    """The intent this append completes (deleted in the same commit)."""
    intent: bytes | None
    """An intent to record (its summary as JSON); its id is the append's result."""
    capture: Capture | None
    """The exchange's captured bodies."""
    entries: list[EntryTemplate | None] | None = None
    """How the log entries of each row's events are joined, as the builder could say;
    None (for a row, or for all): the writer makes them from the events' JSON."""


class Ready(NamedTuple):
    """The writer opened the store and takes batches."""

    journal_mode: str
    synchronous: int
    """As the writer's connection reports them (``wal`` and 2, FULL)."""


class Failed(NamedTuple):
    """The writer could not open the store, and exits."""

    reason: str


class Committed(NamedTuple):
    """The answer to one batch."""

    results: list[int | Exception | None]
    """Each submission's: the id of the intent it recorded, None, or the error that
    failed it."""
    seconds: float
    """The writer's time on the batch."""
    records: int
    """Events and submissions the batch held."""


def encode_batch(batch: Sequence[Submission]) -> bytes:
    """A batch as the engine sends it (on the event loop: kept cheap)."""
    return pickle.dumps(
        [
            (
                [row if type(row) is FanOut else tuple(row) for row in s.rows],
                s.complete_intent,
                s.intent,
                None if s.capture is None else tuple(s.capture),
                None if s.entries is None else _plain_entries(s.entries),
            )
            for s in batch
        ],
        protocol=5,
    )


def _plain_entries(entries: list[EntryTemplate | None]) -> list[tuple[bytes, ...] | None]:
    """``entries`` as plain tuples, one per template (the rows of one interaction share
    theirs, which then crosses once)."""
    plain: dict[int, tuple[bytes, ...]] = {}
    return [None if t is None else plain.setdefault(id(t), tuple(t)) for t in entries]


def decode_batch(data: bytes) -> list[Submission]:
    """A batch as the writer process receives it."""
    return [
        Submission(
            rows=[row if type(row) is FanOut else EventRow._make(row) for row in rows],
            complete_intent=complete_intent,
            intent=intent,
            capture=None if capture is None else Capture._make(capture),
            entries=None
            if entries is None
            else [None if t is None else EntryTemplate._make(t) for t in entries],
        )
        for rows, complete_intent, intent, capture, entries in pickle.loads(data)
    ]


def encode_answer(message: Ready | Failed | Committed) -> bytes:
    """One of the writer's answers, framed (these records pickle whole: one a batch)."""
    data = pickle.dumps(message, protocol=5)
    return FRAME.pack(len(data)) + data


def decode_answer(data: bytes | bytearray) -> Ready | Failed | Committed:
    """One of the writer's answers, as the engine receives it (without its frame)."""
    message: Ready | Failed | Committed = pickle.loads(data)
    return message
