"""What ``fhir-audit-proxy relay`` (:mod:`proxy.relay`) consumes: its settings, and the
flusher's queue over the stream: a JetStream durable pull consumer (:class:`StreamQueue`)
or a Kafka consumer group (:class:`TopicQueue`), chosen by ``relay.source.url``
(``kafka://`` for Kafka). The relay is the other end of the stream: the consumer feeds the
flusher (the same batching, backoff, bisection and dead letters as a sidecar's) and a
sink of ``repository:`` delivers; a message is acknowledged to the stream only after the
repository has taken it (its 2xx). Several relays with the same ``consumer`` share the
work: JetStream's pull hands each relay messages no other relay holds, and one that dies
leaves its unacknowledged messages to be redelivered to the others after ``ack_wait_s``;
Kafka's group gives each relay partitions of its own, and when one dies (after the
group's session timeout) its partitions go to the others from the last committed offset.
``transaction`` mode (PUT by id) makes such a redelivery harmless.

A message the repository rejects (after bisection) is published to
``dead_letter_subject`` (a subject, or for Kafka a topic) with the repository's answer in
its ``Audit-Error`` header, when one is set, and then counts as done: the stream never
offers it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from pydantic import Discriminator, Field, Tag

from proxy.delivery.jetstream import JetStreamConnection
from proxy.delivery.kafka import KafkaConnection
from proxy.delivery.sink import RepositoryUnavailable
from proxy.settings_base import Frozen, Positive, PositiveInt

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from proxy.store.records import QueuedEvent

log = logging.getLogger(__name__)


def _source_kind(value: Any) -> str:
    """``kafka`` when the source's URL is ``kafka://``, else ``jetstream``."""
    url = value.get("url") if isinstance(value, Mapping) else getattr(value, "url", None)
    return "kafka" if isinstance(url, str) and url.lstrip().startswith("kafka://") else "jetstream"


RelaySource = Annotated[
    Annotated[JetStreamConnection, Tag("jetstream")] | Annotated[KafkaConnection, Tag("kafka")],
    Discriminator(_source_kind),
]
"""``relay.source``: a JetStream stream, or a Kafka topic when its URL is ``kafka://``."""


class RelaySettings(Frozen):
    """``relay:``: the stream a relay consumes (``repository:`` is where it delivers)."""

    source: RelaySource = Field(default_factory=JetStreamConnection)
    """The stream, as the sidecars' ``repository:`` names it: for JetStream url, stream,
    subject and credentials (the relay consumes every subject the template can make); for
    Kafka ``kafka://`` brokers, topic and credentials."""
    consumer: str = Field(default="fhir-audit-relay", pattern=r"^[A-Za-z0-9_-]+$")
    """The durable consumer's name (Kafka: the consumer group): relays with the same name
    share the work."""
    ack_wait_s: Positive = 60.0
    """How long a message may stay unacknowledged before the stream offers it again (to
    any relay): longer than a batch's delivery, backoff included. Kafka: the group's
    session timeout, after which a silent relay's partitions go to the others."""
    max_ack_pending: PositiveInt = 1000
    """Most messages held unacknowledged by all the consumer's relays together (Kafka: by
    one relay)."""
    dead_letter_subject: str | None = None
    """Where rejected events are published (a stream should take it; Kafka: a topic);
    None: only logged."""


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


@dataclass
class _Partition:
    """What a relay holds of one assigned partition: offset -> settled, in offset order."""

    offsets: dict[int, bool] = field(default_factory=dict)


class TopicQueue:
    """A Kafka consumer group member as the flusher's queue. ``claim`` polls; ``ack`` and
    ``dead_letter`` settle records and commit, per partition, the offset after the
    longest settled run (a record is committed only once every record before it in its
    partition is settled); ``nack`` seeks the partition back to its first unsettled record
    and holds the queue until the retry time. A partition taken away by a rebalance is
    forgotten: its unsettled records go to its next owner from the committed offset."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer | None,
        settings: RelaySettings,
        wait_s: float,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._settings = settings
        self._wait_s = wait_s
        self._held: dict[int, tuple[TopicPartition, int, bytes]] = {}
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._next = 0
        self._retry_at: datetime | None = None

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """The group took ``partitions`` away: their records are no longer this relay's."""
        for tp in partitions:
            self._partitions.pop(tp, None)

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        from aiokafka.errors import KafkaError

        from proxy.store.records import EventStatus, QueuedEvent

        if self._retry_at is not None and now < self._retry_at:
            return []
        self._retry_at = None
        room = min(limit, self._settings.max_ack_pending - len(self._held))
        if room <= 0:
            return []
        try:
            batches = await self._consumer.getmany(
                timeout_ms=int(self._wait_s * 1000), max_records=room
            )
        except KafkaError as exc:
            log.warning("relay cannot fetch from Kafka: %s", exc)
            await asyncio.sleep(self._wait_s)
            return []
        claimed: list[QueuedEvent] = []
        for tp, records in batches.items():
            partition = self._partitions.setdefault(tp, _Partition())
            for record in records:
                try:
                    event = orjson.loads(record.value or b"")
                    event_id = str(event["id"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    log.error("Kafka record %s@%d is no AuditEvent; skipped", tp, record.offset)
                    partition.offsets[record.offset] = True
                    continue
                partition.offsets[record.offset] = False
                self._next += 1
                self._held[self._next] = (tp, record.offset, record.value or b"")
                claimed.append(
                    QueuedEvent(
                        seq=self._next,
                        event_id=event_id,
                        event=event,
                        status=EventStatus.PENDING,
                        attempts=0,
                        next_attempt_at=None,
                        last_error=None,
                        recorded=str(event.get("recorded", "")),
                    )
                )
        await self._commit({tp for tp, _ in batches.items()})
        return claimed

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        await self._commit(self._settle(seqs))

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        first: dict[TopicPartition, int] = {}
        for seq in seqs:
            tp, offset, _ = self._held.pop(seq)
            first[tp] = min(offset, first.get(tp, offset))
        for tp, offset in first.items():
            partition = self._partitions.get(tp)
            if partition is None:
                continue  # no longer ours: its next owner starts from the committed offset
            partition.offsets = {o: s for o, s in partition.offsets.items() if o < offset}
            self._held = {q: h for q, h in self._held.items() if h[0] != tp or h[1] < offset}
            self._consumer.seek(tp, offset)
        self._retry_at = retry_at.astimezone(UTC)

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        """Produce the records to the dead-letter topic, then settle them. A producer that
        fails raises :class:`RepositoryUnavailable`: the flusher then nacks them, and they
        come again rather than block their partition's commits."""
        from aiokafka.errors import KafkaError

        topic = self._settings.dead_letter_subject
        if topic is not None and self._producer is not None:
            header = error[:1024].replace("\n", " ").encode()
            for seq in seqs:
                _, _, value = self._held[seq]
                try:
                    await self._producer.send_and_wait(
                        topic, value, headers=[("Audit-Error", header)]
                    )
                except KafkaError as exc:
                    raise RepositoryUnavailable(
                        f"dead-letter topic {topic!r} takes nothing: {exc}"
                    ) from None
        await self._commit(self._settle(seqs))

    def _settle(self, seqs: Sequence[int]) -> set[TopicPartition]:
        touched: set[TopicPartition] = set()
        for seq in seqs:
            held = self._held.pop(seq, None)
            if held is None:
                continue
            tp, offset, _ = held
            partition = self._partitions.get(tp)
            if partition is not None and offset in partition.offsets:
                partition.offsets[offset] = True
                touched.add(tp)
        return touched

    async def _commit(self, partitions: set[TopicPartition]) -> None:
        """Commit, for each of ``partitions``, the offset after its longest settled run."""
        from aiokafka.errors import KafkaError

        offsets: dict[TopicPartition, int] = {}
        for tp in partitions:
            partition = self._partitions.get(tp)
            if partition is None:
                continue
            done = None
            for offset in sorted(partition.offsets):
                if not partition.offsets[offset]:
                    break
                done = offset
            if done is not None:
                partition.offsets = {o: s for o, s in partition.offsets.items() if o > done}
                offsets[tp] = done + 1
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took a partition: its next owner redelivers from the last
            # committed offset, and transaction mode makes that harmless.
            log.warning("relay cannot commit to Kafka (%s): those records go again", exc)
