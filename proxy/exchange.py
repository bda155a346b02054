"""``Exchange``: the one mutable object per proxied request.

Forwarding (:mod:`proxy.http.forward`) and the audit pipeline fill it as the request
travels (request, interaction, identity, response, timings); classification
(:func:`proxy.fhir.interaction.classify`) and the builder
(:func:`proxy.audit.balp.build_events`) read it. Bodies are parsed at most
once, lazily, through :meth:`Exchange.request_json` and :meth:`Exchange.response_json`,
from JSON, FHIR XML or YAML as their content types say (:mod:`proxy.fhir.formats`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from proxy.fhir.formats import parse_resource
from proxy.fhir.interaction import Interaction

if TYPE_CHECKING:
    from proxy.audit.identity import Identity
    from proxy.store.records import Capture

_UNPARSED: Any = object()


@dataclass(slots=True, eq=False)
class Exchange:
    """One request through the proxy and what came of it."""

    request_id: str
    """``X-Request-Id`` as received, or generated; sent upstream and back to the client."""
    method: str
    """HTTP method, upper case."""
    path: str
    """The normalized path below the FHIR base, without leading slash
    (``Patient/1/_history/2``); for a path outside the base, the whole normalized path
    with its leading slash (``/.well-known/smart-configuration``)."""
    query_string: str
    """The query string as recorded: raw, undecoded, without ``?``, with the values of
    credential parameters (``access_token``...) replaced by ``REDACTED``."""
    request_headers: Mapping[str, str]
    """Request headers with lower-case names, valid UTF-8 (undecodable bytes replaced).
    Holds ``authorization``: never copy it out."""
    client_address: str
    """The client's network address (``X-Forwarded-For`` only through trusted proxies)."""
    started_at: datetime
    """When the request arrived (UTC)."""
    base_url: str = ""
    """The FHIR base as the client addressed it (``http://host/fhir``)."""
    request_body: bytes | None = None
    """The request body when buffered, as recorded (a form body's credential parameters
    redacted); None when absent or streamed."""
    request_content_type: str = ""
    interaction: Interaction | None = None
    """The classification, set before forwarding."""
    prior_patients: tuple[str, ...] = ()
    """Patients of the resource a DELETE removes, as the proxy read it just before
    forwarding (``audit.read_before_delete``)."""
    identity: Identity | None = None
    """Who is calling, from the bearer token's claims (never the token itself)."""
    status: int | None = None
    """The status the client gets; None while no answer exists."""
    response_headers: Mapping[str, str] = field(default_factory=dict)
    """Response headers with lower-case names."""
    response_body: bytes | None = None
    """The buffered response body; None when absent or streamed."""
    response_streamed: bool = False
    """The response was larger than the buffer limit and is audited from its head only."""
    error: str | None = None
    """Why the proxy, not the upstream, produced the answer (``upstream timed out``)."""
    finished_at: datetime | None = None
    intent_id: int | None = None
    """The durable intent record written before forwarding a state-changing request."""
    upstream_path: str = ""
    """The normalized absolute path the request is forwarded to (``/fhir/Patient/1``)."""
    capture: Capture | None = None
    """The bodies as kept with ``audit.capture_bodies``, taken before they are let go."""
    _request_json: Any = _UNPARSED
    _response_json: Any = _UNPARSED

    def request_json(self) -> dict[str, Any] | None:
        """The request body's resource in its JSON form (parsed once, from JSON, FHIR XML
        or YAML), or None."""
        if self._request_json is _UNPARSED:
            self._request_json = parse_resource(self.request_body, self.request_content_type)
        result: dict[str, Any] | None = self._request_json
        return result

    def drop_parsed(self) -> None:
        """Let go of the parsed bodies, and of a response body held only for the audit,
        once the events are built: they need not wait in memory for the commit."""
        self._request_json = self._response_json = _UNPARSED
        self.response_body = None

    def use_response_json(self, parsed: dict[str, Any]) -> None:
        """The response as the audit reads it, made without :attr:`response_body` (a
        large Bundle read entry by entry)."""
        self._response_json = parsed

    def response_json(self) -> dict[str, Any] | None:
        """The response body's resource in its JSON form (parsed once, from JSON, FHIR
        XML or YAML), or None."""
        if self._response_json is _UNPARSED:
            self._response_json = parse_resource(
                self.response_body, self.response_headers.get("content-type", "")
            )
        result: dict[str, Any] | None = self._response_json
        return result
