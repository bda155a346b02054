"""The checkpointer: signs a checkpoint of a shard's tree now and then, off the request
path, and keeps it in the store.

It looks at the tree's size twice a second (or every ``checkpoint_interval_s``, when
shorter) and signs when the tree has grown and either ``checkpoint_interval_s`` has passed
since the last checkpoint or ``checkpoint_events`` events were added since. The root comes
from the stored tile hashes on the store's reading thread; the Ed25519 signature, a
fraction of a millisecond, on the event loop. At shutdown it signs the tail once more.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.log.checkpoint import Checkpoint
from proxy.log.note import Signer, split
from proxy.settings import LogSettings
from proxy.store.faces import StoreError, TransparencyLog

log = logging.getLogger(__name__)

POLL_S = 0.5


def shard_origin(settings: LogSettings, log_id: str) -> str:
    """The checkpoint origin of the shard whose log has ``log_id``."""
    return f"{settings.origin}/{log_id}"


@dataclass(slots=True)
class Checkpointer:
    """Signs the checkpoints of one shard's log."""

    tlog: TransparencyLog
    signer: Signer
    origin: str
    settings: LogSettings
    signed_size: int = 0
    """The size of the last checkpoint signed (or found at start)."""
    signed_at: float = 0.0
    """When it was signed (event loop time)."""

    async def checkpoint(self) -> Checkpoint | None:
        """Sign and keep a checkpoint of the tree as it is, if it grew; returns it."""
        size, root = await self.tlog.tree_head()
        if size <= self.signed_size:
            return None
        checkpoint = Checkpoint(origin=self.origin, size=size, root=root)
        await self.tlog.add_checkpoint(size, checkpoint.sign(self.signer), datetime.now(UTC))
        self.signed_size = size
        self.signed_at = asyncio.get_running_loop().time()
        return checkpoint

    async def run(self) -> None:
        """Checkpoint as the settings ask until cancelled; store errors are logged."""
        loop = asyncio.get_running_loop()
        latest = await self.tlog.latest_checkpoint()
        if latest is not None:  # perhaps signed by an earlier key: its size is what counts
            self.signed_size = Checkpoint.parse(split(latest)[0]).size
        self.signed_at = loop.time()
        interval = self.settings.checkpoint_interval_s
        while True:
            await asyncio.sleep(min(POLL_S, interval))
            try:
                size = await self.tlog.tree_size()
                due = loop.time() - self.signed_at >= interval
                if size > self.signed_size and (
                    due or size - self.signed_size >= self.settings.checkpoint_events
                ):
                    await self.checkpoint()
            except StoreError as exc:
                log.warning("checkpoint not made: %s", exc)
