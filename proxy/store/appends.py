"""The writer face of one store file (:class:`~proxy.store.faces.EventWriter`): appends
and intents, committed by the shard's commit engine (group commit, fsync)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.log.entry import EntryTemplate
from proxy.store.engine import Append
from proxy.store.faces import EventWriter, StoreError, StoreFull
from proxy.store.index import event_row
from proxy.store.records import Capture, EventRow, FanOut, Intent
from proxy.store.shard import Shard, ShardPart
from proxy.store.wire import Submission


class ShardWriter(ShardPart, EventWriter):
    """Appends and intents of one store file."""

    def __init__(self, shard: Shard) -> None:
        super().__init__(shard)
        self._refusing: str | None = None

    @property
    def refusing(self) -> str | None:
        return self._refusing

    async def append(
        self, events: Sequence[dict[str, Any]], *, complete_intent: int | None = None
    ) -> None:
        try:
            rows = [event_row(e) for e in events]
        except (TypeError, KeyError, orjson.JSONEncodeError) as exc:
            raise StoreError(f"event cannot be stored: {exc}") from exc
        await self.append_rows(rows, complete_intent=complete_intent)

    async def append_rows(
        self,
        rows: Sequence[EventRow | FanOut],
        *,
        complete_intent: int | None = None,
        capture: Capture | None = None,
        entries: Sequence[EntryTemplate | None] | None = None,
    ) -> None:
        await self._submit(
            Submission(
                rows=list(rows),
                complete_intent=complete_intent,
                intent=None,
                capture=capture,
                entries=None if entries is None else list(entries),
            )
        )

    async def record_intent(self, summary: dict[str, Any]) -> int:
        intent_id = await self._submit(
            Submission(rows=[], complete_intent=None, intent=orjson.dumps(summary), capture=None)
        )
        assert intent_id is not None
        return intent_id

    async def _submit(self, submission: Submission) -> int | None:
        """Commit ``submission``, and keep :attr:`refusing` up to date."""
        engine = self._shard.engine
        try:
            result = await engine.submit(Append(submission, engine.new_future()))
        except StoreFull:
            self._refusing = "store full"
            raise
        except StoreError as exc:
            self._refusing = str(exc)[:200]
            raise
        self._refusing = None
        return result

    async def orphan_intents(self) -> list[Intent]:
        conn = self._shard.conn

        def read() -> list[tuple[int, float, bytes, str | None]]:
            return conn.execute(
                "SELECT id, created_at, summary, reason FROM intents ORDER BY id"
            ).fetchall()

        return [
            Intent(
                id=intent_id,
                created_at=datetime.fromtimestamp(created_at, UTC),
                summary=orjson.loads(summary),
                reason=reason,
            )
            for intent_id, created_at, summary, reason in await self._shard.run(read)
        ]

    async def note_intent_reasons(self, reasons: Mapping[int, str]) -> None:
        await self._shard.write_many(
            "UPDATE intents SET reason = ? WHERE id = ? AND reason IS NULL",
            [(why, intent_id) for intent_id, why in reasons.items()],
        )
