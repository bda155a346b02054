"""What ``fhir-audit-proxy relay`` (:mod:`proxy.relay`) consumes: its settings, and the
JetStream durable pull consumer that is its flusher's queue. The relay is the other end
of the stream: the consumer feeds the flusher (the same batching, backoff, bisection and
dead letters as a sidecar's) and a sink of ``repository:`` delivers; a message is
acknowledged to the stream only after the repository has taken it (its 2xx). Several
relays with the same ``consumer`` share the work: each pull takes messages no other relay
holds, and a relay that dies leaves its unacknowledged messages to be redelivered to the
others after ``ack_wait_s``. ``transaction`` mode (PUT by id) makes such a redelivery
harmless.

A message the repository rejects (after bisection) is published to
``dead_letter_subject`` with the repository's answer in its ``Audit-Error`` header, when
one is set, and then terminated: the stream never offers it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import Field

from proxy.delivery.jetstream import JetStreamConnection
from proxy.settings_base import Frozen, Positive, PositiveInt

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from proxy.store.records import QueuedEvent

log = logging.getLogger(__name__)


class RelaySettings(Frozen):
    """``relay:``: the stream a relay consumes (``repository:`` is where it delivers)."""

    source: JetStreamConnection = Field(default_factory=JetStreamConnection)
    """The stream, as the sidecars' ``repository:`` names it (url, stream, subject,
    credentials); the relay consumes every subject the template can make."""
    consumer: str = Field(default="fhir-audit-relay", pattern=r"^[A-Za-z0-9_-]+$")
    """The durable consumer's name: relays with the same name share the work."""
    ack_wait_s: Positive = 60.0
    """How long a message may stay unacknowledged before the stream offers it again (to
    any relay): longer than a batch's delivery, backoff included."""
    max_ack_pending: PositiveInt = 1000
    """Most messages held unacknowledged by all the consumer's relays together."""
    dead_letter_subject: str | None = None
    """Where rejected events are published (a stream should take it); None: only logged."""


class StreamQueue:
    """A JetStream pull consumer as the flusher's queue: ``claim`` fetches, ``ack`` and
    ``nack`` acknowledge or ask for a delayed redelivery, ``dead_letter`` terminates."""

    def __init__(
        self, js: JetStreamContext, subscription: Any, settings: RelaySettings, wait_s: float
    ) -> None:
        self._js = js
        self._subscription = subscription
        self._settings = settings
        self._wait_s = wait_s
        self._held: dict[int, Msg] = {}
        self._next = 0

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        import nats.errors

        from proxy.store.records import EventStatus, QueuedEvent

        try:
            messages = await self._subscription.fetch(batch=limit, timeout=self._wait_s)
        except TimeoutError:  # nats-py raises its own subclass or asyncio's: nothing to fetch
            return []
        except nats.errors.Error as exc:
            log.warning("relay cannot fetch from the stream: %s", exc)
            await asyncio.sleep(self._wait_s)
            return []
        claimed: list[QueuedEvent] = []
        for message in messages:
            try:
                event = orjson.loads(message.data)
                event_id = str(event["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("stream message %s is no AuditEvent; terminated", message.subject)
                await message.term()
                continue
            self._next += 1
            self._held[self._next] = message
            claimed.append(
                QueuedEvent(
                    seq=self._next,
                    event_id=event_id,
                    event=event,
                    status=EventStatus.PENDING,
                    attempts=message.metadata.num_delivered - 1,
                    next_attempt_at=None,
                    last_error=None,
                    recorded=str(event.get("recorded", "")),
                )
            )
        return claimed

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        for seq in seqs:
            await self._held.pop(seq).ack()

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        delay = max((retry_at - datetime.now(retry_at.tzinfo)).total_seconds(), 0.0)
        for seq in seqs:
            await self._held.pop(seq).nak(delay=delay)

    async def release(self) -> None:
        """Hand back every message still held (a relay stopping): redelivered at once."""
        held, self._held = self._held, {}
        for message in held.values():
            await message.nak()

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        subject = self._settings.dead_letter_subject
        for seq in seqs:
            message = self._held.pop(seq)
            if subject is not None:
                await self._js.publish(
                    subject, message.data, headers={"Audit-Error": error[:1024].replace("\n", " ")}
                )
            await message.term()
