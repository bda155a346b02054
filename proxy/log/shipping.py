"""What the flusher adds to a shard's delivery for its log: each event's place in the log
(the position extension, :mod:`proxy.log.entry`) and the signed checkpoints, as
DocumentReferences (:mod:`proxy.log.fhir`), once the events they cover have left."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.log.checkpoint import Checkpoint
from proxy.log.entry import with_position
from proxy.log.fhir import checkpoint_document
from proxy.log.note import split
from proxy.store.faces import TransparencyLog
from proxy.store.records import QueuedEvent

CHECKPOINTS_PER_ROUND = 20


@dataclass(frozen=True, slots=True)
class LogShipping:
    """One shard's log, as its flusher ships it."""

    tlog: TransparencyLog
    origin: str
    """The shard's checkpoint origin."""
    checkpoints: bool
    """Whether checkpoints are shipped too (``log.ship_checkpoints``)."""

    def resource(self, item: QueuedEvent) -> dict[str, Any]:
        """The event as shipped: with its place in the log, when it has one."""
        if item.leaf is None:
            return item.event
        return with_position(item.event, self.origin, item.leaf)

    async def documents(self, now: datetime) -> list[tuple[int, dict[str, Any]]]:
        """The checkpoints due to ship (their sizes and DocumentReferences)."""
        if not self.checkpoints:
            return []
        out = []
        for size, note in await self.tlog.checkpoints_to_ship(CHECKPOINTS_PER_ROUND):
            text, _ = split(note)
            out.append((size, checkpoint_document(note, Checkpoint.parse(text), now)))
        return out
