"""The seam between the flusher and a repository: the :class:`Sink` contract, the errors
that carry its answers, the settings every repository mode shares, and
:class:`MemorySink`, a sink for tests that keeps what it is sent.

The contract of ``await sink.send(events)`` (the flusher relies on nothing else):

- It is called with one batch at a time, never concurrently, events in queue order, each
  a resource as a dict with a stable ``id``: an AuditEvent, or (when the repository
  :attr:`~RepositoryBase.holds_documents`) a checkpoint of the Merkle log as a
  DocumentReference (:mod:`proxy.log.fhir`); a relay passes on whatever its stream holds.
- It **returns** only when the repository holds every event of the batch durably by its
  own standard (a 2xx, a stream's publish acknowledgement, a broker's ``acks=all``, a
  syslog receiver's clean close after reading the batch). The flusher then acknowledges
  the events in the store; they are never sent again.
- :class:`RepositoryUnavailable`: the cause is not in the events (an outage, a timeout, a
  refused connection, a leader election, credentials the repository refuses). None of the
  batch counts as delivered; the flusher keeps the events and retries with backoff. Some
  may have arrived anyway: delivery is at least once, and a sink that can make a
  redelivery harmless does so (``transaction`` mode's PUT by id, JetStream's
  ``Nats-Msg-Id``).
- :class:`RepositoryRejected`: the repository refuses the batch for what it holds. The
  flusher bisects the batch until the events it refuses are isolated, and moves those to
  the dead letters with this answer. Raise it only when resending the same event could
  never succeed, or bisection dead-letters good events.
- :class:`PartialDelivery`: the first ``delivered`` events are held by the repository, then
  ``cause`` (one of the two above) stopped the batch. The flusher acknowledges the prefix
  and treats the rest as ``cause`` says.
- Any other exception is a defect of the sink; the flusher logs it and backs off as for an
  outage.

``await sink.close()`` releases connections and sessions the sink owns; ``send`` is not
called after it. A mode's settings (a :class:`RepositoryBase` subclass) open its sink with
:meth:`RepositoryBase.open_sink`, which may raise :class:`SinkUnusable` when the
configuration cannot work (a stream that does not exist, a certificate file that will not
load): a start-up error, never a retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from proxy.settings_base import Frozen, Positive, PositiveInt, redact_url, url_secret

Event = dict[str, Any]


class DeliveryError(Exception):
    """A batch was not delivered."""


class RepositoryUnavailable(DeliveryError):
    """Not the events' fault: retry the batch later, with backoff."""


class RepositoryRejected(DeliveryError):
    """The repository refuses something in the batch: bisect and dead-letter it.
    ``status`` is the HTTP status when the repository speaks HTTP, else None."""

    def __init__(self, status: int | None, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}" if status is not None else body)
        self.status = status
        self.body = body


class PartialDelivery(DeliveryError):
    """The first ``delivered`` events went through, then ``cause``."""

    def __init__(self, delivered: int, cause: DeliveryError) -> None:
        super().__init__(str(cause))
        self.delivered = delivered
        self.cause = cause


class SinkUnusable(Exception):
    """The sink cannot start with this configuration (a missing stream, an unreadable
    certificate): one line naming the setting and what to do. The proxy refuses to start."""


class Sink(Protocol):
    """Takes batches of events; see the module's docstring for what each outcome means."""

    async def send(self, events: Sequence[Event]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the events a sink ships come from."""

    shard: int = 0
    """The store shard (the worker's index with ``workers: N``) the flusher drains."""


class RepositoryBase(Frozen):
    """What every repository mode has: where, how, and the flusher's batching and backoff.
    A mode subclasses it with ``mode`` as a ``Literal`` of its names and its own settings,
    and is registered in :data:`proxy.delivery.modes.REPOSITORY_MODES`."""

    url: str | None = None
    """Where the events go, in the form the mode takes. None keeps events local."""
    mode: str = "bundle"
    flush_interval_ms: PositiveInt = 1000
    max_flush_interval_ms: PositiveInt = 60000
    batch_count: PositiveInt = 100
    timeout_s: Positive = 30.0
    """Most time one batch may take to be acknowledged before it counts as unavailable."""
    holds_documents: ClassVar[bool] = True
    """Whether the repository takes resources other than AuditEvents: the log's signed
    checkpoints are shipped to it (as DocumentReferences) only then."""

    def target(self) -> str:
        """The repository as logs may show it (credentials masked)."""
        return redact_url(self.url) if self.url else "(none: local only)"

    def secret_values(self) -> set[str]:
        """Every secret these settings hold, in clear, for masking in logs."""
        secret = url_secret(self.url)
        return {secret} if secret else set()

    def path_problems(self) -> list[str]:
        """One line per file these settings name that cannot be used."""
        return []

    async def open_sink(self, origin: Origin) -> Sink:
        """Connect to the repository and return the sink (a start-up step). Raises
        :class:`SinkUnusable` when the configuration cannot work."""
        raise NotImplementedError(f"repository mode {self.mode} opens no sink")


Behaviour = Callable[[Sequence[Event]], Awaitable[None]]


@dataclass
class MemorySink:
    """A :class:`Sink` for tests: keeps each batch it accepts. ``behaviour``, when set, is
    awaited first with the batch and may raise any of the contract's errors (the batch is
    then not kept)."""

    batches: list[list[Event]] = field(default_factory=list)
    """Accepted batches, in the order they came."""
    behaviour: Behaviour | None = None
    closed: bool = False

    @property
    def events(self) -> list[Event]:
        """Every accepted event, in order."""
        return [event for batch in self.batches for event in batch]

    async def send(self, events: Sequence[Event]) -> None:
        assert not self.closed, "send after close"
        if self.behaviour is not None:
            await self.behaviour(events)
        self.batches.append(list(events))

    async def close(self) -> None:
        self.closed = True
