"""The store as its users see it: three faces, and the errors they raise.

- :class:`EventWriter`, the writer face: what the audit pipeline writes (events, with the
  captured bodies of their exchange) and the write intents it records and settles.
- :class:`DeliveryQueue`, the delivery face: what a flusher claims and acknowledges, the
  dead letters, pruning; :class:`Claims` is its part a flusher uses, :class:`Requeue` its
  part an operator uses.
- :class:`EventReader`, the reader face: what the admin API, the ``dlq`` commands and
  telemetry read; :class:`ReportReader`, the report face, what the privacy reports read
  beyond it.

One store file implements each face in a module of its own (:mod:`proxy.store.appends`,
:mod:`proxy.store.delivery`, :mod:`proxy.store.reads`), and the object the proxy opens,
:class:`~proxy.store.queue.AuditQueue`, is all three. Several shards read as one,
:class:`~proxy.store.shards.ShardedStore`, serve :class:`AdminStore`. Code that uses the
store takes the face it uses, so that what it may do to the store is in its signature.
A new kind of read (the Merkle log's tiles and checkpoints, say) is a face of its own
declared here, implemented in a module of its own over a :class:`~proxy.store.shard.Shard`
and served by ``AuditQueue`` as one more base; its writes are one more step of the
writer's transaction (:mod:`proxy.store.transaction`).

Every method of every face that touches the store raises :class:`StoreError` when the
store cannot do it, and :class:`StoreFull` when that is for want of room. Events are named
by their seq (queue order, unique in one store; global across shards, see
:mod:`proxy.store.shards`) and their id; what each method returns or changes is events,
never rows (a row may hold several events: :mod:`proxy.store.fans`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from proxy.log.entry import EntryTemplate
from proxy.store.records import (
    ActivityCount,
    Capture,
    Cursor,
    EventPage,
    EventQuery,
    EventRow,
    FanOut,
    IndexedEvent,
    Intent,
    Pair,
    QueuedEvent,
    QueueStats,
    UserAccess,
    Window,
)


class StoreError(Exception):
    """The store could not do what was asked: for an append, the audit could not be made
    durable (the client gets 503)."""


class StoreFull(StoreError):
    """``max_bytes`` is reached or the disk is full (the client gets 507)."""


class EventWriter(Protocol):
    """The writer face: appends made durable (group commit, fsync) before they return, and
    the intents of state-changing requests. An append either commits every event it was
    given, with the completion of its intent and its capture, or none of them."""

    @property
    def refusing(self) -> str | None:
        """Why the last append or intent failed (``store full``, or the error), until one
        succeeds again: the store is failing requests closed (readiness reads it)."""

    async def append(
        self, events: Sequence[dict[str, Any]], *, complete_intent: int | None = None
    ) -> None:
        """Commit AuditEvents made elsewhere (their indexed columns are read out of them);
        ``complete_intent`` is settled in the same commit. An event that cannot be stored
        as it is (no id, not JSON) is a :class:`StoreError`."""

    async def append_rows(
        self,
        rows: Sequence[EventRow | FanOut],
        *,
        complete_intent: int | None = None,
        capture: Capture | None = None,
        entries: Sequence[EntryTemplate | None] | None = None,
    ) -> None:
        """Commit the events whose rows the builder made, the completion of
        ``complete_intent`` and the exchange's captured bodies, in one commit.
        ``entries``: how the writer joins the log entries of each row's events, where
        the builder could say (:func:`proxy.audit.rows.store_entries`); else it makes
        them from the events' JSON."""

    async def record_intent(self, summary: dict[str, Any]) -> int:
        """Commit an intent (before a write is forwarded); returns its id, which the
        append of the write's events completes."""

    async def orphan_intents(self) -> list[Intent]:
        """Intents never completed, oldest first (a restart, or a request whose events the
        store refused, left them)."""

    async def note_intent_reasons(self, reasons: Mapping[int, str]) -> None:
        """Keep why these intents (by id) were abandoned, so that a restart does not
        forget it; a reason already noted stays."""


class Requeue(Protocol):
    """The part of the delivery face an operator uses (``dlq retry``, the admin API)."""

    async def requeue_dead(self, seqs: Sequence[int] | None = None) -> int:
        """Dead events back to pending (every one when ``seqs`` is None); returns how
        many."""


class Claims(Protocol):
    """The part of the delivery face a flusher uses: events leave in queue order, each
    acknowledged, retried or set aside by its seq. The relay's stream consumer
    (:class:`proxy.delivery.relay.StreamQueue`) keeps it too."""

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        """The oldest pending events, in queue order, up to ``limit``, stopping at the
        first one still in backoff at ``now`` (delivery stays in order). An event whose
        body cannot be read is dead-lettered rather than returned."""

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        """Mark delivered (the repository answered 2xx) at ``now``."""

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        """Count a failed attempt and hold the events back until ``retry_at``."""

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        """Set aside events the repository rejected, with its answer."""


class DeliveryQueue(Claims, Requeue, Protocol):
    """The delivery face: the flusher's claims, the operator's requeue, and pruning."""

    async def prune(self, now: datetime, retention: timedelta) -> int:
        """Delete events delivered longer than ``retention`` ago (and the captures no
        undelivered event needs); returns how many events. The room they took is reused."""

    async def oldest_pending_recorded(self) -> float | None:
        """``recorded`` (POSIX time) of the oldest undelivered event, or None."""


class EventReader(Protocol):
    """The reader face: searches and reads of stored events, for the admin API, the
    ``dlq`` commands and telemetry."""

    async def search_page(self, query: EventQuery) -> EventPage:
        """A page of the events matching ``query``, in its order, with keyset paging
        (``after``, ``before``) and the total when asked for."""

    async def search(self, query: EventQuery) -> tuple[list[QueuedEvent], int]:
        """A page of matching events and the total number matching."""
        page = await self.search_page(query)
        return page.items, page.total if page.total is not None else len(page.items)

    async def get_event(self, event_id: str) -> QueuedEvent | None:
        """The event with this id, or None."""

    async def get_capture(self, request_id: str) -> Capture | None:
        """The bodies captured for the exchange ``request_id``, or None."""

    async def list_dead(self, limit: int = 100) -> list[QueuedEvent]:
        """Dead-lettered events, at most ``limit``; one whose body cannot be read is
        listed with its id alone and its ``last_error``."""

    async def stats(self) -> QueueStats:
        """Events by status, intents, bytes in use and the oldest pending event's time."""


class ReportReader(Protocol):
    """The report face: what the privacy reports and the activity chart read beyond a
    search (:mod:`proxy.store.reports`), from tables triggers keep (schema 7) and the
    columns of the events' rows (who acted: schema 8). Events and rows are named by their
    seq, global across shards."""

    async def first_accesses(self, pairs: Sequence[Pair]) -> dict[Pair, Cursor]:
        """For each (user, patient) pair that has any, the position (recorded time, row
        seq) of the user's first access to the patient in the retained history, admin
        reads of the trail left out. An event of that user about that patient is the
        first access when no position precedes its own (recorded time, seq)."""

    async def user_accesses(self, windows: Sequence[Window]) -> dict[str, list[UserAccess]]:
        """Each user's events recorded in that user's windows that name a patient, admin
        reads left out, each row once, in time order."""

    async def activity(self, query: EventQuery) -> list[ActivityCount]:
        """The events ``query`` matches (its filters, not its order or paging) counted per
        quarter hour, action and outcome, in slot order; slots with none left out."""

    async def indexed(self, query: EventQuery) -> list[IndexedEvent]:
        """The events ``query`` matches (its filters), newest first, at most
        ``query.limit`` of them, each as its row's columns say it: no event's JSON is
        read. Of a fan-out row, the events its patient and entity filters name (as
        :meth:`EventReader.search_page` takes them)."""

    async def events_at(self, seqs: Sequence[int]) -> list[QueuedEvent]:
        """The events with these seqs, in that order; those no longer stored (pruned)
        left out."""


class TransparencyLog(Protocol):
    """The Merkle log face (:mod:`proxy.log`): what the checkpointer, the tile routes and
    the flusher's shipping of checkpoints read and write. The leaves are appended by the
    writer's transaction, with their events; leaf ``i`` is the ``i``-th event stored
    since the log began, in queue order."""

    async def log_id(self) -> str:
        """The log's random id, made with the store: it names the log in its origin."""

    async def tree_size(self) -> int:
        """Leaves in the tree."""

    async def tree_head(self) -> tuple[int, bytes]:
        """The tree's size and its RFC 6962 root, as of one moment."""

    async def tile_hashes(self, level: int, start: int, count: int) -> list[bytes]:
        """Up to ``count`` stored hashes of tile level ``level`` from index ``start`` (as
        many as the tree has)."""

    async def leaf_events(self, start: int, count: int) -> list[QueuedEvent] | None:
        """The events of leaves ``start`` to ``start + count - 1``, in order; None when
        any of them is no longer (or not yet) in the store."""

    async def latest_checkpoint(self) -> str | None:
        """The signed note of the largest checkpoint, or None before the first."""

    async def add_checkpoint(self, size: int, note: str, now: datetime) -> None:
        """Keep a signed checkpoint of the tree at ``size``."""

    async def checkpoints_to_ship(self, limit: int) -> list[tuple[int, str]]:
        """Checkpoints not shipped yet (size and note, smallest first, at most ``limit``)
        whose events have all left the queue (delivered or dead-lettered)."""

    async def checkpoints_shipped(
        self, sizes: Sequence[int], now: datetime, error: str | None = None
    ) -> None:
        """Mark checkpoints shipped at ``now``; with ``error``, refused for good."""


class AdminStore(EventReader, ReportReader, Requeue, Protocol):
    """What the admin API and the ``dlq`` commands use of a store or of every shard as
    one: the reader face, the report face, and the requeue of dead letters."""
