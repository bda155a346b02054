"""The ``kafka`` mode: each event produced to a Kafka topic (aiokafka).

The producer is idempotent (unless ``idempotent: false``) with ``acks=all``: a batch is
acknowledged in the store only after the broker has written each event to every in-sync
replica. The key is the event's
patient (``Patient/123``), so one patient's events stay in one partition, in order;
events about no patient have no key. A batch's events are produced together and awaited
together; a failure acknowledges the events before it (:class:`PartialDelivery`) and the
producer is replaced before the next batch (a restarted broker knows nothing of the old
producer's sequence numbers). Only an event larger than the broker or the producer takes
is :class:`RepositoryRejected`; every other failure is :class:`RepositoryUnavailable`.

A topic that does not exist is a start-up error naming it unless ``create_topic`` is set;
brokers that cannot be reached at start are tried again at each batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import SecretStr, field_serializer, field_validator

from proxy.delivery.routing import event_patient
from proxy.delivery.sink import (
    DeliveryError,
    Origin,
    PartialDelivery,
    RepositoryBase,
    RepositoryRejected,
    RepositoryUnavailable,
    Sink,
    SinkUnusable,
)
from proxy.delivery.tls import TlsFiles
from proxy.settings_base import (
    Frozen,
    Positive,
    PositiveInt,
    given_secrets,
    readable_file_problem,
    redact_url,
    url_secret,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = logging.getLogger(__name__)


def _brokers(url: str) -> list[str]:
    """``host:port`` of each broker in ``kafka://a:9092,b:9092`` (scheme optional)."""
    return [part.strip().removeprefix("kafka://") for part in url.split(",") if part.strip()]


class KafkaConnection(Frozen):
    """A Kafka topic and how to reach it: what the sidecars produce to and the relay
    consumes (``relay.source`` with a ``kafka://`` URL)."""

    url: str | None = None
    """Bootstrap brokers, comma-separated: ``kafka://kafka-0:9092,kafka-1:9092``."""
    topic: str = "audit"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    """A file holding the SASL password (a Kubernetes Secret mount)."""
    tls: TlsFiles = TlsFiles()
    timeout_s: Positive = 30.0
    """Most time one request to the brokers may take."""

    @field_validator("url")
    @classmethod
    def _broker_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        brokers = _brokers(value)
        for broker in brokers:
            parts = urlsplit(f"kafka://{broker}")
            try:
                port = parts.port
            except ValueError:
                port = None
            if not parts.hostname or port is None:
                raise ValueError(
                    f"mode kafka takes broker addresses such as kafka://kafka-0:9092,"
                    f" not {redact_url(broker)!r}"
                )
        if not brokers:
            raise ValueError("mode kafka needs url: one or more kafka://host:port brokers")
        return value

    @field_serializer("url")
    def _url_masked(self, value: str | None) -> str | None:
        return None if value is None else ",".join(_brokers(value))

    def target(self) -> str:
        return f"Kafka topic {self.topic} at {','.join(_brokers(self.url or ''))}"

    def secret_values(self) -> set[str]:
        found: set[str] = set()
        for broker in _brokers(self.url or ""):
            secret = url_secret(f"kafka://{broker}")
            if secret:
                found.add(secret)
        return found | given_secrets(self.sasl_password, self.sasl_password_file)

    def path_problems(self) -> list[str]:
        problem = readable_file_problem(
            "repository.sasl_password_file", self.sasl_password_file, "the password"
        )
        return ([problem] if problem else []) + self.tls.path_problems("repository.tls")

    def client_options(self) -> dict[str, Any]:
        """aiokafka's options for these settings (secrets read from their files)."""
        assert self.url is not None
        options: dict[str, Any] = {
            "bootstrap_servers": _brokers(self.url),
            "client_id": "fhir-audit-proxy",
            "request_timeout_ms": int(self.timeout_s * 1000),
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.tls.client_context("repository.tls")
        if self.security_protocol.startswith("SASL"):
            password = self.sasl_password.get_secret_value() if self.sasl_password else None
            if self.sasl_password_file is not None:
                password = self.sasl_password_file.read_text().strip()
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = password
        return options


class KafkaRepository(KafkaConnection, RepositoryBase):
    """A Kafka topic as the repository."""

    mode: Literal["kafka"] = "kafka"
    create_topic: bool = False
    """Create the topic when it does not exist (else that is a start-up error)."""
    partitions: PositiveInt = 3
    """Partitions of a topic this proxy creates."""
    replication_factor: PositiveInt = 1
    """Replicas of a topic this proxy creates (3 in a production cluster)."""
    idempotent: bool = True
    """Kafka's idempotent producer: the broker drops what the producer's own retries
    would write twice. Brokers without ``InitProducerId`` (the Tansu build the tests run)
    need it off; ``acks=all`` holds either way."""

    async def open_sink(self, origin: Origin) -> Sink:
        sink = KafkaSink(self)
        await sink.start()
        return sink


class KafkaSink:
    """Produces events to one topic with one idempotent producer at a time."""

    def __init__(self, settings: KafkaRepository) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._topic_checked = False

    async def start(self) -> None:
        """Check the topic (a missing one raises :class:`SinkUnusable` unless created)
        and start the producer; brokers that cannot be reached are tried at each send."""
        try:
            await self._check_topic()
        except _TopicMissing as exc:
            raise SinkUnusable(str(exc)) from None
        except RepositoryUnavailable as exc:
            log.warning("%s; events wait in the store until it answers", exc)

    async def _check_topic(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import KafkaError, TopicAlreadyExistsError

        s = self._settings
        options = s.client_options()
        admin = AIOKafkaAdminClient(
            **{k: v for k, v in options.items() if k != "client_id"},
            client_id="fhir-audit-proxy-admin",
        )
        try:
            await admin.start()
            topics = await admin.list_topics()
            if s.topic not in topics:
                if not s.create_topic:
                    raise _TopicMissing(
                        f"Kafka topic {s.topic!r} does not exist: create it or set"
                        " repository.create_topic: true"
                    )
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [NewTopic(s.topic, s.partitions, s.replication_factor)]
                    )
                log.info("created Kafka topic %s (%d partitions)", s.topic, s.partitions)
        except (KafkaError, OSError, TimeoutError, ssl.SSLError) as exc:
            raise RepositoryUnavailable(
                f"Kafka at {','.join(options['bootstrap_servers'])} unreachable:"
                f" {type(exc).__name__}: {exc}"
            ) from None
        finally:
            await admin.close()
        self._topic_checked = True

    async def _started_producer(self) -> AIOKafkaProducer:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(
            **self._settings.client_options(),
            acks="all",
            enable_idempotence=self._settings.idempotent,
        )
        try:
            await producer.start()
        except (KafkaError, OSError, TimeoutError, ssl.SSLError) as exc:
            await producer.stop()
            raise RepositoryUnavailable(
                f"Kafka producer cannot start: {type(exc).__name__}: {exc}"
            ) from None
        self._producer = producer
        return producer

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        if not self._topic_checked:
            await self._check_topic()
        producer = await self._started_producer()
        outcomes = await asyncio.gather(
            *(self._produce(producer, event) for event in events), return_exceptions=True
        )
        for done, outcome in enumerate(outcomes):
            if outcome is None:
                continue
            await self._replace_producer()
            error = _classified(outcome)
            if done:
                raise PartialDelivery(done, error) from outcome
            raise error from outcome

    async def _produce(self, producer: AIOKafkaProducer, event: dict[str, Any]) -> None:
        patient = event_patient(event)
        acknowledged = await producer.send(
            self._settings.topic,
            orjson.dumps(event),
            key=patient.encode() if patient else None,
            headers=[("event-id", str(event["id"]).encode())],
        )
        await acknowledged

    async def _replace_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), self._settings.timeout_s)

    async def close(self) -> None:
        await self._replace_producer()


class _TopicMissing(RepositoryUnavailable):
    """The topic does not exist: a start-up error, a retry once running."""


def _classified(exc: BaseException) -> DeliveryError:
    from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

    if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
        return RepositoryRejected(None, f"larger than Kafka takes: {exc}")
    if isinstance(exc, DeliveryError):
        return exc
    return RepositoryUnavailable(f"no acknowledgement from Kafka: {type(exc).__name__}: {exc}")
