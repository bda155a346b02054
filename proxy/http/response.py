"""The one answer model of the proxy listener: what its handler returns for every request,
whether the body is whole or written as it comes, and whoever made it (the forwarding
handler, the refusal of a malformed request, the listener's own 408 and 500)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import orjson

from proxy.fhir.operation_outcome import FHIR_JSON, operation_outcome


class BodyStream(Protocol):
    """A body written as it comes: ``async for`` gives its chunks. The listener calls
    :meth:`aclose` once, whether or not it read the stream to its end (the client may
    have left): the stream then lets go of what it holds (a connection, a file)."""

    def __aiter__(self) -> BodyStream: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """An answer to one request."""

    status: int
    headers: Mapping[str, str]
    """Sent as given (names as cased here), then ``Date`` unless given, the framing
    (``Content-Length`` or ``Transfer-Encoding``) and ``Connection``, which the listener
    writes: none of them may be given. No name or value may hold a line break (the
    answer is then not sent and the connection is aborted)."""
    body: bytes = b""
    """The whole body (unless :attr:`stream`)."""
    stream: BodyStream | None = None
    """A body sent as it comes, instead of :attr:`body`. If it raises, the answer is cut
    short (the connection is aborted): a client never takes a broken body for whole."""
    length: int | None = None
    """The length of :attr:`stream` when known (sent as ``Content-Length``); else it is
    sent chunked (to an HTTP/1.0 client: delimited by the connection's close)."""
    keep_alive: bool = True
    """False: the connection closes once this answer is sent."""

    @classmethod
    def outcome(
        cls,
        status: int,
        code: str,
        diagnostics: str,
        *,
        headers: Mapping[str, str] | None = None,
        keep_alive: bool = True,
    ) -> Response:
        """An OperationOutcome with one issue (``code`` from the FHIR issue-type value
        set) as ``application/fhir+json``, with ``headers`` besides."""
        return cls(
            status=status,
            headers={"Content-Type": FHIR_JSON, **headers} if headers else _FHIR_JSON_ONLY,
            body=orjson.dumps(operation_outcome(code, diagnostics)),
            keep_alive=keep_alive,
        )


_FHIR_JSON_ONLY: Mapping[str, str] = {"Content-Type": FHIR_JSON}
