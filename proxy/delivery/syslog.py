"""The ``syslog`` mode: IHE ATNA Record Audit Event [ITI-20] to an Audit Record Repository.

Each event goes as an RFC 5424 message, ``MSGID`` ``IHE+RFC-3881``, facility 10
(security/authorization), severity 5 (notice), whose MSG is the DICOM audit message
(:mod:`proxy.delivery.atna`, UTF-8 after a BOM).

``tls://host:6514`` (the default port): RFC 5425, TLS 1.2 or later, mutual TLS with the
certificate and key files given, octet-counting framing (``MSG-LEN SP SYSLOG-MSG``, the
length in bytes). Syslog has no application acknowledgement, so each batch travels on a
connection of its own that this sink closes: it sends the batch, then TLS
``close_notify``, and the batch counts as delivered only when the receiver has closed its
side after reading everything (its own ``close_notify``, or a clean close with every byte
acknowledged by its TCP). A reset, a timeout or unacknowledged bytes make the batch
:class:`RepositoryUnavailable`, to be sent again: at least once, never exactly once (a
receiver that stores a batch and dies before closing gets it twice).

``udp://host:514``: RFC 5426, explicitly lossy: a datagram sent counts as delivered.
An event whose message exceeds ``max_udp_bytes`` is :class:`RepositoryRejected`.

An ATNA repository holds audit messages only: the Merkle log's checkpoints (FHIR
DocumentReferences) are not shipped to it (:attr:`SyslogRepository.holds_documents`), and
a resource other than an AuditEvent in a batch (a relay passing on a stream's checkpoints)
is skipped, counted as delivered. The DICOM audit message has no element for an event's
place in the log, so that leaves out too (see :mod:`proxy.delivery.atna`).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import ssl
import struct
import termios
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from proxy.delivery.sink import (
    Origin,
    PartialDelivery,
    RepositoryBase,
    RepositoryRejected,
    RepositoryUnavailable,
    Sink,
)
from proxy.delivery.tls import TlsFiles
from proxy.settings_base import PositiveInt

log = logging.getLogger(__name__)

MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
DEFAULT_PORTS = {"tls": 6514, "udp": 514}


class SyslogRepository(RepositoryBase):
    """An ATNA Audit Record Repository over syslog as the repository."""

    url: str | None = None
    """``tls://arr.example.org:6514`` (RFC 5425) or ``udp://arr.example.org:514`` (RFC
    5426, lossy)."""
    mode: Literal["syslog"] = "syslog"
    holds_documents: ClassVar[bool] = False
    tls: TlsFiles = TlsFiles()
    """The CA of the receiver's certificate and, for mutual TLS, this client's pair."""
    hostname: str | None = None
    """HOSTNAME of the messages (default: this machine's fully qualified name)."""
    app_name: str = Field(default="fhir-audit-proxy", pattern=r"^[!-~]{1,48}$")
    facility: int = Field(default=10, ge=0, le=23)
    severity: int = Field(default=5, ge=0, le=7)
    max_udp_bytes: PositiveInt = 8192
    """Largest datagram sent over UDP; a larger message is rejected (dead-lettered)."""

    @field_validator("url")
    @classmethod
    def _syslog_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            parts = urlsplit("")
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(
                "mode syslog takes tls://host:6514 (RFC 5425) or udp://host:514 (RFC 5426,"
                f" lossy), not {value!r}"
            )
        return value

    @property
    def transport(self) -> str:
        assert self.url is not None
        return urlsplit(self.url).scheme

    @property
    def address(self) -> tuple[str, int]:
        assert self.url is not None
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        return parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]

    def target(self) -> str:
        return f"ATNA syslog {self.url}"

    def path_problems(self) -> list[str]:
        return self.tls.path_problems("repository.tls")

    async def open_sink(self, origin: Origin) -> Sink:
        context = self.tls.client_context("repository.tls") if self.transport == "tls" else None
        return SyslogSink(self, context)


def syslog_message(
    event: dict[str, Any], *, hostname: str, app_name: str, procid: int, pri: int
) -> bytes:
    """``event`` as one RFC 5424 message: header, no structured data, BOM and XML."""
    # The ATNA builder (and the XML library it loads) only for a proxy that sends syslog.
    from proxy.delivery.atna import audit_message

    header = (f"<{pri}>1 {_timestamp(event)} {hostname} {app_name} {procid} {MSGID} - ").encode(
        "ascii"
    )
    return header + BOM + audit_message(event)


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 framing: the message's length in bytes, a space, the message."""
    return b"%d " % len(message) + message


def _timestamp(event: dict[str, Any]) -> str:
    """RFC 5424 TIMESTAMP (UTC, microseconds at most) of the event's recorded time."""
    recorded = str(event.get("recorded") or "")
    try:
        at = datetime.fromisoformat(recorded.replace("Z", "+00:00"))
    except ValueError:
        at = datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _printable(value: str) -> str:
    return "".join(c if "!" <= c <= "~" else "_" for c in value)[:255] or "-"


class SyslogSink:
    """Sends batches to one receiver: a TLS connection per batch, or datagrams."""

    def __init__(self, settings: SyslogRepository, context: ssl.SSLContext | None) -> None:
        self._settings = settings
        self._context = context
        self._hostname = _printable(settings.hostname or socket.getfqdn())
        self._pri = settings.facility * 8 + settings.severity

    def message(self, event: dict[str, Any]) -> bytes:
        """The syslog message ``event`` is sent as."""
        return syslog_message(
            event,
            hostname=self._hostname,
            app_name=self._settings.app_name,
            procid=os.getpid(),
            pri=self._pri,
        )

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        # Each message with its index in the batch, so that a partial delivery counts
        # the resources skipped before the failure as delivered too.
        indexed = [(i, e) for i, e in enumerate(events) if e.get("resourceType") == "AuditEvent"]
        if len(indexed) < len(events):
            log.info(
                "%d resources other than AuditEvents (the log's checkpoints) skipped: an ATNA"
                " repository holds audit messages only",
                len(events) - len(indexed),
            )
        messages = [(i, self.message(event)) for i, event in indexed]
        if not messages:
            return
        if self._context is None:
            await asyncio.to_thread(self._send_datagrams, messages)
            return
        frames = b"".join(octet_counted(m) for _, m in messages)
        await asyncio.to_thread(self._send_batch, frames)

    def _send_batch(self, frames: bytes) -> None:
        assert self._context is not None
        host, port = self._settings.address
        name = self._settings.tls.server_name or host
        try:
            with (
                socket.create_connection((host, port), timeout=self._settings.timeout_s) as raw,
                self._context.wrap_socket(raw, server_hostname=name) as tls,
            ):
                tls.sendall(frames)
                try:
                    tls.unwrap()  # our close_notify; returns on the receiver's
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    # It closed without close_notify: it read everything only if its
                    # TCP acknowledged every byte (unread bytes make a reset instead).
                    if _unacknowledged(tls) > 0:
                        raise RepositoryUnavailable(
                            f"syslog receiver {host}:{port} closed before reading the batch"
                        ) from None
        except (OSError, ssl.SSLError) as exc:
            raise RepositoryUnavailable(
                f"syslog receiver {host}:{port}: {type(exc).__name__}: {exc}"
            ) from None

    def _send_datagrams(self, messages: list[tuple[int, bytes]]) -> None:
        host, port = self._settings.address
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as sock:
            for done, message in messages:
                try:
                    if len(message) > self._settings.max_udp_bytes:
                        raise RepositoryRejected(
                            None,
                            f"{len(message)} bytes: more than max_udp_bytes"
                            f" ({self._settings.max_udp_bytes}) for one datagram",
                        )
                    sock.sendto(message, address)
                except (RepositoryRejected, OSError) as exc:
                    error = (
                        exc
                        if isinstance(exc, RepositoryRejected)
                        else RepositoryUnavailable(f"syslog over UDP to {host}:{port}: {exc}")
                    )
                    if done:
                        raise PartialDelivery(done, error) from None
                    raise error from None

    async def close(self) -> None:
        return None


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its peer's TCP has not acknowledged (Linux)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count
