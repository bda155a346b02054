"""Several store shards (one per worker process) read as one store, for the admin API
and the ``dlq`` commands.

Each shard numbers its events with its own ``seq``. Outside the shards an event is named by
a *global* seq, ``seq * shards + shard``: unique, and the same as ``seq`` with one shard,
so cursors, ``dlq list`` and ``dlq retry --seq`` keep their form. Searches ask every shard
for a page and merge by the query's order key (recorded time, then global seq), which is a
total order, so keyset cursors stay exact across shards.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from proxy.settings import StoreSettings
from proxy.store.faces import EventReader, ReportReader, Requeue
from proxy.store.queue import AuditQueue
from proxy.store.records import (
    ActivityCount,
    Capture,
    Cursor,
    EventPage,
    EventQuery,
    IndexedEvent,
    Pair,
    QueuedEvent,
    QueueStats,
    SortKey,
    UserAccess,
    Window,
)
from proxy.store.reports import summed

OpenShard = Callable[[Path], Awaitable[AuditQueue]]


def existing_shard_opener(store: StoreSettings) -> OpenShard:
    """Opens a shard at a path with the store's settings, never creating one: a missing
    shard is a :class:`~proxy.store.faces.StoreError` (its worker has not made it yet)."""

    async def open_shard(path: Path) -> AuditQueue:
        return await AuditQueue.open(
            path,
            max_bytes=store.max_bytes,
            commit_batch_max=store.commit_batch_max,
            create=False,
            start_writer=False,  # its own worker appends; a writer starts here only if needed
        )

    return open_shard


class ShardedStore(EventReader, ReportReader, Requeue):
    """Every shard read as one store: the reader face, the report face and the requeue
    of dead letters (:class:`~proxy.store.faces.AdminStore`), for the admin API and the ``dlq``
    commands. Shards not yet created (a worker still starting) read as empty and are
    opened on a later call. It writes no events: the admin API appends to its own
    worker's shard."""

    def __init__(
        self, paths: Sequence[Path], *, opened: dict[int, AuditQueue], open_shard: OpenShard
    ) -> None:
        self._paths = list(paths)
        self._queues = dict(opened)
        self._owned: list[AuditQueue] = []
        """Shards this object opened and closes."""
        self._open_shard = open_shard
        self._lock = asyncio.Lock()

    @property
    def count(self) -> int:
        return len(self._paths)

    async def _shards(self) -> list[tuple[int, AuditQueue]]:
        """Every shard that exists, opening the ones that appeared since the last call."""
        async with self._lock:
            for n, path in enumerate(self._paths):
                if n not in self._queues and path.is_file():
                    queue = await self._open_shard(path)
                    self._queues[n] = queue
                    self._owned.append(queue)
        return sorted(self._queues.items())

    async def shard(self, n: int) -> AuditQueue | None:
        """Shard ``n``, or None when it does not exist (yet)."""
        return dict(await self._shards()).get(n)

    async def shard_sizes(self, skip: int) -> list[tuple[int, Path, int | None]]:
        """Each shard but ``skip``: its number, path and bytes in use; None for a shard
        that does not exist yet (its worker is starting)."""
        opened = dict(await self._shards())
        return [
            (n, path, await opened[n].bytes_in_use() if n in opened else None)
            for n, path in enumerate(self._paths)
            if n != skip
        ]

    async def close(self) -> None:
        """Close the shards this object opened (not those it was given)."""
        for queue in self._owned:
            await queue.close()
        self._owned.clear()

    def _global(self, shard: int, item: QueuedEvent) -> QueuedEvent:
        return dataclasses.replace(item, seq=item.seq * self.count + shard)

    def _local_cursor(self, cursor: Cursor, shard: int, descending: bool) -> Cursor:
        """The shard-local keyset bound equivalent to the global ``cursor``: local seqs
        ``s`` with ``s * count + shard`` before (descending) or after the global seq."""
        ts, global_seq = cursor
        offset = global_seq - shard
        local = -(-offset // self.count) if descending else offset // self.count
        return ts, local

    # --- the reader face -------------------------------------------------------------

    async def get_capture(self, request_id: str) -> Capture | None:
        """The bodies captured for the exchange ``request_id``, from whichever shard has them."""
        for _, queue in await self._shards():
            capture = await queue.get_capture(request_id)
            if capture is not None:
                return capture
        return None

    async def list_dead(self, limit: int = 100) -> list[QueuedEvent]:
        """Dead-lettered events of every shard, oldest recorded first."""
        found = [
            self._global(n, item)
            for n, queue in await self._shards()
            for item in await queue.list_dead(limit)
        ]
        found.sort(key=lambda item: (item.recorded_ts, item.seq))
        return found[:limit]

    async def get_event(self, event_id: str) -> QueuedEvent | None:
        for n, queue in await self._shards():
            item = await queue.get_event(event_id)
            if item is not None:
                return self._global(n, item)
        return None

    async def search_page(self, query: EventQuery) -> EventPage:
        """:meth:`EventReader.search_page` over every shard: each gives its first
        ``offset + limit`` events past the cursor, and the merge keeps the page's."""
        reverse = query.before is not None
        descending = query.newest_first != reverse
        cursor = query.before if reverse else query.after
        wanted = query.offset + query.limit
        pages: list[tuple[int, EventPage]] = []
        for n, queue in await self._shards():
            local = self._local_cursor(cursor, n, descending) if cursor is not None else None
            shard_query = dataclasses.replace(
                query,
                offset=0,
                limit=wanted,
                after=None if reverse else local,
                before=local if reverse else None,
            )
            pages.append((n, await queue.search_page(shard_query)))
        walk = [self._global(n, item) for n, page in pages for item in page.items]
        walk.sort(key=lambda item: self._key(item, query.sort), reverse=descending)
        more = len(walk) > wanted or any(
            page.more_before if reverse else page.more_after for _, page in pages
        )
        total = sum(page.total or 0 for _, page in pages) if query.count_total else None
        return EventPage.walked(query, walk[query.offset : wanted], total, more=more)

    @staticmethod
    def _key(item: QueuedEvent, sort: SortKey) -> tuple[float, int]:
        return (item.recorded_ts if sort is SortKey.RECORDED else 0.0, item.seq)

    async def stats(self) -> QueueStats:
        """Every shard's counts and sizes added up."""
        each = [await queue.stats() for _, queue in await self._shards()]
        return QueueStats(
            pending=sum(s.pending for s in each),
            delivered=sum(s.delivered for s in each),
            dead=sum(s.dead for s in each),
            intents=sum(s.intents for s in each),
            size_bytes=sum(s.size_bytes for s in each),
            oldest_pending_recorded=min(
                (s.oldest_pending_recorded for s in each if s.oldest_pending_recorded is not None),
                default=None,
            ),
        )

    # --- the report face ---------------------------------------------------------------

    async def first_accesses(self, pairs: Sequence[Pair]) -> dict[Pair, Cursor]:
        """:meth:`ReportReader.first_accesses` over every shard: the earliest of theirs."""
        best: dict[Pair, Cursor] = {}
        for n, queue in await self._shards():
            for pair, (ts, seq) in (await queue.first_accesses(pairs)).items():
                position = (ts, seq * self.count + n)
                if pair not in best or position < best[pair]:
                    best[pair] = position
        return best

    async def user_accesses(self, windows: Sequence[Window]) -> dict[str, list[UserAccess]]:
        """:meth:`ReportReader.user_accesses` over every shard, merged in time order."""
        merged: dict[str, list[UserAccess]] = {}
        for n, queue in await self._shards():
            for user, own in (await queue.user_accesses(windows)).items():
                merged.setdefault(user, []).extend(
                    a._replace(seq=a.seq * self.count + n) for a in own
                )
        for own in merged.values():
            own.sort(key=lambda access: (access.ts, access.seq))
        return merged

    async def activity(self, query: EventQuery) -> list[ActivityCount]:
        """:meth:`ReportReader.activity` over every shard, added up."""
        return summed([await queue.activity(query) for _, queue in await self._shards()])

    async def indexed(self, query: EventQuery) -> list[IndexedEvent]:
        """:meth:`ReportReader.indexed` over every shard, merged newest first."""
        merged = [
            item._replace(seq=item.seq * self.count + n)
            for n, queue in await self._shards()
            for item in await queue.indexed(query)
        ]
        merged.sort(key=lambda item: (item.ts, item.seq), reverse=True)
        return merged[: query.limit]

    async def events_at(self, seqs: Sequence[int]) -> list[QueuedEvent]:
        """:meth:`ReportReader.events_at`: each seq asked of the shard that has it."""
        found: dict[int, QueuedEvent] = {}
        for n, queue in await self._shards():
            local = [s // self.count for s in seqs if s % self.count == n]
            for item in await queue.events_at(local) if local else ():
                found[item.seq * self.count + n] = self._global(n, item)
        return [found[s] for s in seqs if s in found]

    # --- the requeue of the delivery face ------------------------------------------------

    async def requeue_dead(self, seqs: Sequence[int] | None = None) -> int:
        """Dead events (by global seq; all when None) back to pending."""
        shards = await self._shards()
        if seqs is None:
            return sum([await queue.requeue_dead(None) for _, queue in shards])
        count = 0
        for n, queue in shards:
            local = [s // self.count for s in seqs if s % self.count == n]
            if local:
                count += await queue.requeue_dead(local)
        return count
