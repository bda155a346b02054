"""The ``jetstream`` mode: each event published to a NATS JetStream stream (nats-py).

An event is published with ``Nats-Msg-Id`` set to its id, so the stream drops a
redelivery inside its duplicate window; the batch is acknowledged in the store only after
the stream's publish acknowledgement of each event. Events are published one after the
other, each waiting for its acknowledgement: a failure stops the batch there
(:class:`PartialDelivery`), so an event never lands in the stream after one recorded
later, and a retry resumes at the first event not acknowledged. The subject is a
template: ``{site}`` (the event's ``source.site``), ``{host}`` (this machine's name),
``{shard}`` (the store shard) and ``{patient}`` (a hash of the event's patient).

At start-up a stream that does not exist is an error naming it, unless
``create_stream`` is set; a NATS server that cannot be reached is not (events wait in the
store, and the stream is checked once it answers). A publish that times out, finds no
stream leader or loses its connection is :class:`RepositoryUnavailable`; only an event
larger than the server or stream takes is :class:`RepositoryRejected`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import SecretStr, field_serializer, field_validator

from proxy.delivery.routing import event_site, patient_hash, subject_token
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
    from nats.aio.client import Client as NatsClient
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)

NATS_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
SUBJECT_FIELDS = frozenset({"site", "host", "shard", "patient"})
_PLACEHOLDER = re.compile(r"\{([^}]*)\}")
MSG_TOO_LARGE = 10054
"""JetStream's error code for a message over the stream's ``max_msg_size``."""


class StreamMisfit(RepositoryUnavailable):
    """The stream does not exist or does not take the subject: at start-up a
    :class:`SinkUnusable`; found later (the server was down at start), a retry that logs."""


def _servers(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


class JetStreamConnection(Frozen):
    """A NATS JetStream stream and how to reach it: what the sidecars publish to and the
    relay consumes (``relay.source``)."""

    url: str | None = None
    """NATS server URLs, comma-separated (``nats://nats-0:4222,nats://nats-1:4222``);
    ``tls://`` requires TLS. User and password may be given as ``nats://user:pw@host``."""
    stream: str = "AUDIT"
    """The stream the events are published to (it must take the subjects below)."""
    subject: str = "audit.{site}.{patient}"
    """Each event's subject: ``{site}``, ``{host}``, ``{shard}`` and ``{patient}`` are
    filled in per event (each one token; the patient as a hash)."""
    token: SecretStr | None = None
    token_file: Path | None = None
    """A file holding the token (a Kubernetes Secret mount)."""
    nkey_seed_file: Path | None = None
    """A file holding the NKey seed (``SU...``) this client signs the server's nonce with."""
    creds_file: Path | None = None
    """A ``.creds`` file (user JWT and NKey seed) for decentralized authentication."""
    tls: TlsFiles = TlsFiles()
    timeout_s: Positive = 30.0
    """Most time to connect, or to wait for one acknowledgement."""

    @field_validator("url")
    @classmethod
    def _nats_urls(cls, value: str | None) -> str | None:
        if value is None:
            return None
        servers = _servers(value)
        if not servers:
            raise ValueError("mode jetstream needs url: one or more nats:// server URLs")
        for server in servers:
            parts = urlsplit(server)
            if parts.scheme not in NATS_SCHEMES or not parts.hostname:
                raise ValueError(
                    f"mode jetstream takes nats:// (or tls://) server URLs such as"
                    f" nats://nats:4222, not {redact_url(server)!r}"
                )
        return value

    @field_validator("subject")
    @classmethod
    def _subject_template(cls, value: str) -> str:
        unknown = set(_PLACEHOLDER.findall(value)) - SUBJECT_FIELDS
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{sorted(unknown)[0]}}}; the subject may use"
                f" {', '.join('{' + f + '}' for f in sorted(SUBJECT_FIELDS))}"
            )
        tokens = value.split(".")
        if any(not t or " " in t or "*" in t or ">" in t for t in tokens):
            raise ValueError(
                f"{value!r} is not a subject to publish to: dot-separated tokens, no spaces"
                " or wildcards"
            )
        return value

    @field_serializer("url")
    def _url_masked(self, value: str | None) -> str | None:
        return None if value is None else self.servers_shown()

    def servers_shown(self) -> str:
        """The server URLs as logs may show them (credentials masked)."""
        return ",".join(redact_url(server) for server in _servers(self.url or ""))

    def target(self) -> str:
        return f"JetStream stream {self.stream} at {self.servers_shown()}"

    def secret_values(self) -> set[str]:
        found = {secret for server in _servers(self.url or "") if (secret := url_secret(server))}
        return found | given_secrets(self.token, self.token_file)

    def path_problems(self) -> list[str]:
        problems = [
            readable_file_problem(f"repository.{name}", getattr(self, name), what)
            for name, what in (
                ("token_file", "the token"),
                ("nkey_seed_file", "the NKey seed"),
                ("creds_file", "the .creds file"),
            )
        ]
        return [p for p in problems if p] + self.tls.path_problems("repository.tls")

    def stream_subject(self) -> str:
        """The subject filter the stream takes: the template with ``*`` per placeholder."""
        return _PLACEHOLDER.sub("*", self.subject)


class JetStreamRepository(JetStreamConnection, RepositoryBase):
    """A NATS JetStream stream as the repository."""

    mode: Literal["jetstream"] = "jetstream"
    create_stream: bool = False
    """Create the stream when it does not exist (else that is a start-up error)."""
    replicas: PositiveInt = 1
    """Replicas of a stream this proxy creates (3 for a cluster)."""
    duplicate_window_s: Positive = 120.0
    """The de-duplication window of a stream this proxy creates."""

    async def open_sink(self, origin: Origin) -> Sink:
        sink = JetStreamSink(self, origin)
        await sink.start()
        return sink


def subject_matches(subject: str, pattern: str) -> bool:
    """Whether NATS subject ``subject`` (its tokens may be ``*``) falls under ``pattern``."""
    got, want = subject.split("."), pattern.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(got) == len(want)


async def connect(s: JetStreamConnection) -> NatsClient:
    """A NATS connection for ``s`` (its servers, TLS and credentials) that, once made,
    reconnects without end. Raises :class:`RepositoryUnavailable` when no server answers
    within ``timeout_s``."""
    import nats
    import nats.errors

    assert s.url is not None
    options: dict[str, Any] = {
        "servers": _servers(s.url),
        "name": "fhir-audit-proxy",
        "connect_timeout": max(1, int(s.timeout_s)),
        "allow_reconnect": True,
        # The first connection tries each server twice and gives up (the caller retries
        # later); once connected, the client reconnects without end.
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "error_cb": _log_error,
        "disconnected_cb": _log_disconnected,
        "reconnected_cb": _log_reconnected,
    }
    servers: list[str] = options["servers"]
    if s.tls.enabled or s.tls.ca_file or any(u.startswith("tls://") for u in servers):
        options["tls"] = s.tls.client_context("repository.tls")
        if s.tls.server_name:
            options["tls_hostname"] = s.tls.server_name
    if s.token is not None:
        options["token"] = s.token.get_secret_value()
    elif s.token_file is not None:
        options["token"] = s.token_file.read_text().strip()
    if s.nkey_seed_file is not None:
        options["nkeys_seed"] = str(s.nkey_seed_file)
    if s.creds_file is not None:
        options["user_credentials"] = str(s.creds_file)
    try:
        # Bounded from outside too: nats-py waits for ever after a failed TLS handshake.
        nc = await asyncio.wait_for(nats.connect(**options), s.timeout_s)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise RepositoryUnavailable(
            f"NATS at {s.servers_shown()} unreachable: {type(exc).__name__}: {exc}"
        ) from None
    nc.options["max_reconnect_attempts"] = -1
    return nc


class JetStreamSink:
    """Publishes events to one stream over one NATS connection."""

    def __init__(self, settings: JetStreamRepository, origin: Origin) -> None:
        self._settings = settings
        self._fields = {"host": subject_token(socket.gethostname()), "shard": str(origin.shard)}
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_checked = False

    def subject_of(self, event: dict[str, Any]) -> str:
        """The subject ``event`` is published to."""
        fields = {**self._fields, "site": event_site(event), "patient": patient_hash(event)}
        return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], self._settings.subject)

    async def start(self) -> None:
        """Connect and check the stream. Unreachable servers are retried at each send; a
        missing stream (when not created) raises :class:`SinkUnusable`."""
        try:
            await self._connect()
        except RepositoryUnavailable as exc:
            log.warning("%s; events wait in the store until it answers", exc)
            return
        try:
            await self._check_stream()
        except StreamMisfit as exc:
            raise SinkUnusable(str(exc)) from None
        except RepositoryUnavailable as exc:
            log.warning("%s; checked again before the first publish", exc)

    async def _connect(self) -> None:
        self._nc = await connect(self._settings)
        self._js = self._nc.jetstream(timeout=self._settings.timeout_s)

    async def _check_stream(self) -> None:
        import nats.errors
        import nats.js.errors
        from nats.js.api import StorageType, StreamConfig

        s = self._settings
        assert self._js is not None
        try:
            try:
                info = await self._js.stream_info(s.stream)
            except nats.js.errors.NotFoundError:
                if not s.create_stream:
                    raise StreamMisfit(
                        f"JetStream stream {s.stream!r} does not exist: create it for subjects"
                        f" {s.stream_subject()!r} or set repository.create_stream: true"
                    ) from None
                info = await self._js.add_stream(
                    StreamConfig(
                        name=s.stream,
                        subjects=[s.stream_subject()],
                        storage=StorageType.FILE,
                        num_replicas=s.replicas,
                        duplicate_window=s.duplicate_window_s,
                    )
                )
                log.info("created JetStream stream %s for %s", s.stream, s.stream_subject())
        except (nats.errors.Error, TimeoutError) as exc:
            raise RepositoryUnavailable(
                f"JetStream stream {s.stream!r} cannot be looked up: {type(exc).__name__}: {exc}"
            ) from None
        subjects = list(info.config.subjects or [])
        if not any(subject_matches(s.stream_subject(), pattern) for pattern in subjects):
            raise StreamMisfit(
                f"JetStream stream {s.stream!r} does not take subject {s.stream_subject()!r}"
                f" (its subjects: {', '.join(subjects) or 'none'})"
            )
        self._stream_checked = True

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        if self._js is None:
            await self._connect()
        if not self._stream_checked:
            await self._check_stream()
        assert self._js is not None
        for done, event in enumerate(events):
            try:
                await self._publish(event)
            except DeliveryError as exc:
                if done:
                    raise PartialDelivery(done, exc) from exc
                raise

    async def _publish(self, event: dict[str, Any]) -> None:
        import nats.errors
        import nats.js.errors

        s = self._settings
        assert self._js is not None
        subject = self.subject_of(event)
        try:
            await self._js.publish(
                subject,
                orjson.dumps(event),
                timeout=s.timeout_s,
                stream=s.stream,
                headers={"Nats-Msg-Id": str(event["id"])},
            )
        except nats.errors.MaxPayloadError as exc:
            raise RepositoryRejected(None, f"larger than the NATS server takes: {exc}") from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == MSG_TOO_LARGE:
                raise RepositoryRejected(exc.code, f"{exc.description}") from None
            raise RepositoryUnavailable(f"JetStream refused the publish: {exc}") from None
        except nats.errors.NoRespondersError:
            raise RepositoryUnavailable(
                f"no JetStream stream answers {subject} (a leader election, or the stream is gone)"
            ) from None
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise RepositoryUnavailable(
                f"no publish acknowledgement from JetStream: {type(exc).__name__} {exc}".strip()
            ) from None

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()


async def _log_error(exc: Exception) -> None:
    log.info("NATS connection: %s: %s", type(exc).__name__, exc)


async def _log_disconnected() -> None:
    log.info("NATS connection lost; reconnecting")


async def _log_reconnected() -> None:
    log.info("NATS connection re-established")
