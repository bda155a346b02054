"""IHE BALP 1.1.4 AuditEvents (FHIR R4, or R5) for an exchange, each with the row the
store writes for it: pure, no I/O, clock passed in.

One exchange gives one event per patient (the Patient* profiles) or one basic event when
no patient is known; a batch or transaction gives one event for the Bundle and events for
each entry. Failures are recorded with their outcome but claim no BALP profile, because
the RESTful profiles fix ``outcome`` to success.

The events of one :class:`AuditedInteraction` are built in three steps: what they say
(:class:`Statement`: the outcome, the agents, the entities), how each is written
(:mod:`proxy.audit.encoding`), and the index columns of its row
(:mod:`proxy.audit.rows`). Events are plain dicts that share their constant fragments
(codings, agents, the entities of one exchange) and are never changed once built.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import quote_plus, urlsplit

import orjson

from proxy.audit.encoding import (
    PATIENT_ENTITY_PREFIX,
    DictEncoding,
    EntryParts,
    EventEncoding,
    PartsEncoding,
    entry_end,
    entry_head,
)
from proxy.audit.identity import Identity
from proxy.audit.ids import new_event_id

# What the builder hands over is declared with the rows; its callers take it from here.
from proxy.audit.rows import Built as Built
from proxy.audit.rows import BuiltEvent, EventColumns, FannedEvent, agent_terms, joined, terms_tail
from proxy.audit.rows import store_entries as store_entries
from proxy.audit.rows import store_rows as store_rows
from proxy.audit.vocabulary import (
    ACT_REASON,
    APPLICATION,
    OPERATION_SYSTEM,
    PATTERNS,
    RESTFUL_INTERACTION,
    ROLE_DOMAIN_RESOURCE,
    ROLE_QUERY,
    SECURITY_SOURCE_TYPE,
    SYSTEM_OBJECT,
    TOKEN_VERIFICATION_EXT,
    TRACEPARENT_DETAIL,
    TYPE_REST,
    USER_OAUTH,
    XREQUEST_ID,
    Pattern,
    coding,
    concept,
)
from proxy.exchange import Exchange
from proxy.fhir.bundle import bundle_entries
from proxy.fhir.formats import redacted_body
from proxy.fhir.interaction import (
    CREDENTIAL_PARAMS,
    Interaction,
    InteractionKind,
    credential_params,
)
from proxy.fhir.patients import patients_of_exchange
from proxy.settings import Settings
from proxy.store.index import who_of
from proxy.store.marks import BREAK_GLASS_PURPOSES, Mark
from proxy.store.records import FAN_MAX, FanOut, member_id

QUERY_LIMIT = 4096
"""The default of ``audit.max_query_bytes``: most bytes of the raw request kept in
``entity.query``."""


@dataclass(frozen=True, slots=True)
class AuditContext:
    """The parts of every event fixed by configuration, computed once."""

    fhir_version: str
    source: dict[str, Any]
    token_pattern: str
    max_patient_events: int = 100
    """Beyond this many patients, one event lists them (see :func:`interaction_events`)."""
    max_patients_listed: int = 1000
    """Most patient entities that one event lists."""
    max_query_bytes: int = QUERY_LIMIT
    """Most bytes of the raw request kept in a query entity (see :func:`_query_entity`)."""
    redact_params: frozenset[str] = CREDENTIAL_PARAMS
    """Parameter names (lower case) whose values an operation's recorded body never
    holds (the query string and a form body come redacted in the exchange)."""
    source_json: bytes = field(init=False, repr=False, compare=False)
    """``source`` serialized."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_json", orjson.dumps(self.source))

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditContext:
        observer = settings.audit.observer
        source: dict[str, Any] = {
            "observer": {"reference": observer.reference, "display": observer.display},
            "type": [
                coding(
                    SECURITY_SOURCE_TYPE,
                    observer.type_code,
                    "Application Server" if observer.type_code == "4" else None,
                )
            ],
        }
        if observer.site:
            source["site"] = observer.site
        return cls(
            fhir_version=settings.audit.fhir_version,
            source=source,
            token_pattern=settings.audit.identity.token_pattern,
            max_patient_events=settings.audit.max_patient_events,
            max_patients_listed=settings.audit.max_patients_listed,
            max_query_bytes=settings.audit.max_query_bytes,
            redact_params=credential_params(settings.audit.redact_params),
        )

    @classmethod
    def default(cls) -> AuditContext:
        return cls.from_settings(Settings())


class AuditedInteraction(NamedTuple):
    """One interaction as it is audited: the exchange itself, or one entry of a batch or
    transaction, or a write whose outcome is unknown (a recovered intent): what was
    asked, what came of it, and which patients it concerned."""

    interaction: Interaction
    status: int | None
    """The status it was answered with; None when no answer came."""
    error: str | None
    """Why the proxy, not the server, ended it."""
    request_resource: Mapping[str, Any] | None
    response_resource: Mapping[str, Any] | None
    location: str | None
    """``Location`` (or ``Content-Location``) of the answer."""
    patients: tuple[str, ...]
    """The patients it concerned, each once."""


# --- outcome ---------------------------------------------------------------------------------


def _outcome_text(resource: Mapping[str, Any] | None) -> str | None:
    if not resource or resource.get("resourceType") != "OperationOutcome":
        return None
    texts = []
    for issue in resource.get("issue") or ():
        if isinstance(issue, Mapping):
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            if isinstance(text, str) and text:
                texts.append(text)
    return "; ".join(texts)[:1000] or None


def outcome_of(
    status: int | None, error: str | None, response: Mapping[str, Any] | None
) -> tuple[str, str | None]:
    """``(outcome code, outcomeDesc)``: 0 success, 4 minor (4xx), 8 serious (5xx, and
    401/403 as access denied), 12 major (no answer from the server)."""
    if error is not None or status is None:
        return "12", error or "no response from the FHIR server"
    if status < 400:
        return "0", None
    detail = _outcome_text(response) or f"HTTP {status}"
    if status in (401, 403):
        return "8", f"access denied (HTTP {status}): {detail}"
    return ("4" if status < 500 else "8"), f"HTTP {status}: {detail}"


# --- agents --------------------------------------------------------------------------------


def _client_agents(
    client_address: str, identity: Identity | None, pattern: Pattern, token_pattern: str
) -> list[dict[str, Any]]:
    """The network peer that sent the request (BALP's ``client`` slice) and, in the
    comprehensive OAuth pattern, the OAuth client: an Application agent (110150) with
    ``who.identifier.value`` = ``client_id``. Where the peer already is the Application
    (Delete), it carries the client id itself."""
    peer: dict[str, Any] = {
        "type": pattern.client_type,
        "who": {"display": client_address},
        "requestor": False,
        "network": {"address": client_address, "type": "2"},
    }
    client_id = identity.client_id if identity is not None else None
    if not client_id or token_pattern != "comprehensive":
        return [peer]
    if pattern.client_type is APPLICATION:
        peer["who"]["identifier"] = {"value": client_id}
        return [peer]
    oauth_client = {
        "type": APPLICATION,
        "who": {"identifier": {"value": client_id}, "display": client_id},
        "requestor": False,
        "network": {"address": client_address, "type": "2"},
    }
    return [peer, oauth_client]


def _server_agent(base_url: str, pattern: Pattern) -> dict[str, Any]:
    base = base_url or "unknown"
    return {
        "type": pattern.server_type,
        "who": {"display": base},
        "requestor": False,
        "network": {"address": base, "type": "5"},
    }


class _Agents(NamedTuple):
    """The agents of an event, and what the row keeps of them."""

    agents: list[dict[str, Any]]
    user_id: str | None
    terms: list[str]
    """Their search terms, each once, and the break-glass mark when the user's token
    claims an emergency purpose of use."""
    json: bytes
    """``agents`` serialized."""
    terms_tail: str
    """``terms`` as the end of a JSON list that entity terms began: ``,"a:x"]``."""
    who: str
    """Who acted, as the row keeps it (``EventRow.who``)."""
    entry_head: bytes | None
    """The start of their R4 events' log entries (:func:`entry_head`)."""


@functools.lru_cache(maxsize=1024)
def _agents(
    client_address: str,
    base_url: str,
    identity: Identity | None,
    kind: InteractionKind,
    token_pattern: str,
    r5: bool,
) -> _Agents:
    """The agents of an interaction: the peer, the FHIR server, the OAuth client, the
    user. The same for every request of one client with one token: made once and shared
    (read-only, as every fragment of a built event)."""
    pattern = PATTERNS[kind]
    peer, *oauth_client = _client_agents(client_address, identity, pattern, token_pattern)
    agents = [peer, _server_agent(base_url, pattern), *oauth_client]
    user = _user_agent(identity, pattern, token_pattern)
    if user is not None:
        agents.append(user)
    terms = agent_terms(agents, r5)
    claimed = identity.purpose_of_use if identity is not None and user is not None else ()
    if not BREAK_GLASS_PURPOSES.isdisjoint(claimed):
        terms.append(Mark.BREAK_GLASS.term)
    return _Agents(
        agents,
        _user_of(user) if user is not None else None,
        terms,
        orjson.dumps(agents),
        terms_tail(terms),
        who_of(agents).column(),
        entry_head(pattern.action, agents),
    )


def _verification(identity: Identity) -> str:
    if identity.verified is None:
        return "not verified (no JWKS configured)"
    if identity.verified:
        return "verified"
    return f"verification failed: {identity.failure or 'invalid'}"


def _user_agent(
    identity: Identity | None, pattern: Pattern, token_pattern: str
) -> dict[str, Any] | None:
    if identity is None or identity.token_kind in ("none", "other"):
        return None
    codings: list[dict[str, str]] = [pattern.user_type]
    if identity.token_kind in ("jwt", "opaque"):
        codings.append(USER_OAUTH)
    who: dict[str, Any] = {}
    if identity.user_id:
        ident: dict[str, str] = {"value": identity.user_id}
        if identity.issuer and token_pattern == "comprehensive" and "://" in identity.issuer:
            ident["system"] = identity.issuer
        who["identifier"] = ident
    if identity.user_name:
        who["display"] = identity.user_name
    if identity.fhir_user and "/" in identity.fhir_user and "://" not in identity.fhir_user:
        who["reference"] = identity.fhir_user
    if not who:
        who = {"display": "unidentified token holder"}
    agent: dict[str, Any] = {"type": {"coding": codings}, "who": who, "requestor": True}
    if identity.token_kind == "jwt":
        agent["extension"] = [
            {"url": TOKEN_VERIFICATION_EXT, "valueString": _verification(identity)}
        ]
    if identity.user_name and token_pattern == "comprehensive":
        agent["name"] = identity.user_name
    if token_pattern == "comprehensive" and identity.roles:
        agent["role"] = [{"text": role} for role in identity.roles[:20]]
    if identity.purpose_of_use:
        agent["purposeOfUse"] = [concept(ACT_REASON, p, p) for p in identity.purpose_of_use[:10]]
    policy = identity.token_hash if identity.token_kind == "opaque" else identity.jti
    if policy and (token_pattern != "opaque" or identity.token_kind == "opaque"):
        agent["policy"] = [policy]
    return agent


# --- entities ------------------------------------------------------------------------------


def _transaction_entity(request_id: str) -> dict[str, Any]:
    return {"type": XREQUEST_ID, "what": {"identifier": {"value": request_id}}}


def _url_path(url: str) -> str:
    """The path of ``url``; for a URL ``urlsplit`` refuses (``http://[/fhir``, from a
    client's Host header or a server's Location), what follows the authority."""
    try:
        return urlsplit(url).path
    except ValueError:
        rest = url.split("://", 1)[-1]
        return "/" + rest.split("/", 1)[1] if "/" in rest else ""


_FORM = "application/x-www-form-urlencoded"


def _raw_request(ex: Exchange, redact: frozenset[str]) -> tuple[bytes, str | None]:
    """The request as sent, for ``entity.query``: request line, ``Accept`` and
    ``X-Request-Id`` (never credentials), and the body of a form POST (a search) or of an
    operation (``Parameters``, GraphQL, a form; JSON, XML or YAML) with the values of the
    parameters named in ``redact`` replaced; and, for an operation's body in a format in
    which credentials cannot be found, why it is not recorded."""
    base_path = _url_path(ex.base_url).rstrip("/") if ex.base_url else ""
    target = f"{base_path}/{ex.path}" if ex.path or base_path else "/"
    if ex.query_string:
        target += f"?{ex.query_string}"
    lines = [f"{ex.method} {target} HTTP/1.1"]
    accept = ex.request_headers.get("accept")
    if accept:
        lines.append(f"Accept: {accept}")
    lines.append(f"X-Request-Id: {ex.request_id}")
    head = "\r\n".join(lines).encode()
    content_type = ex.request_headers.get("content-type", "")
    body = ex.request_body
    form = ex.method == "POST" and content_type.startswith(_FORM)
    operation = ex.interaction is not None and ex.interaction.kind is InteractionKind.OPERATION
    if not form and (not operation or not body):
        return head + b"\r\n", None
    body = body or b""
    recorded = redacted_body(body, content_type, redact) if body else body
    if recorded is None:
        kind = content_type.split(";", 1)[0].strip() or "no content type"
        return head + b"\r\n", f"[body of {len(body)} bytes ({kind}) not recorded]"
    return head + f"\r\nContent-Type: {content_type}\r\n\r\n".encode() + recorded, None


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
"""What ``quote_plus`` leaves as it is."""


def form_encoded(pairs: Iterable[tuple[str, str]]) -> str:
    """``urlencode(pairs)``, in a fifth of its time when no name or value needs quoting
    (``code=8867-4``), as most search parameters do not."""
    fits = _UNRESERVED.fullmatch
    return "&".join(
        f"{name if fits(name) else quote_plus(name)}={value if fits(value) else quote_plus(value)}"
        for name, value in pairs
    )


def _query_entity(ex: Exchange, interaction: Interaction, ctx: AuditContext) -> dict[str, Any]:
    """The query entity: the raw request in ``query``, cut at ``ctx.max_query_bytes`` (its
    description then gives the whole request's length and the SHA-256 of the whole
    request as recorded, credentials redacted, so the event's cost is bounded and the
    request can still be matched), and the search in ``description``."""
    raw, unrecorded = _raw_request(ex, ctx.redact_params)
    limit = ctx.max_query_bytes
    entity: dict[str, Any] = {
        "type": SYSTEM_OBJECT,
        "role": ROLE_QUERY,
        "query": base64.b64encode(raw[:limit]).decode("ascii"),
    }
    target = interaction.resource_type or ""
    if interaction.compartment:
        target = "/".join(interaction.compartment) + (f"/{target}" if target else "")
    if interaction.operation:
        target = f"{target}/${interaction.operation}".lstrip("/")
    if interaction.search:
        # Only as many parameters as can show in 2000 characters are encoded.
        shown: list[tuple[str, str]] = []
        size = 0
        for name, value in interaction.search:
            shown.append((name, value))
            size += len(name) + len(value) + 2
            if size > 2000:
                break
        entity["description"] = f"{target}?{form_encoded(shown)}"[:2000]
    elif target:
        entity["description"] = target
    if unrecorded is not None:
        entity["description"] = f"{entity.get('description', '')[:1800]} {unrecorded}".lstrip()
    if len(raw) > limit:
        # Of the whole request (as recorded, credentials redacted): the kept bytes are in
        # ``query`` for anyone to hash; the whole one's digest is what ties the event to
        # the request a client logged.
        digest = hashlib.sha256(raw).hexdigest()
        entity["description"] = (
            entity.get("description", "")[:1800] + f" [request cut to {limit} of {len(raw)} bytes;"
            f" sha256 of all {len(raw)} bytes: {digest}]"
        ).lstrip()
    return entity


def _versioned(
    resource: Mapping[str, Any] | None, rtype: str | None, rid: str | None
) -> str | None:
    if resource and resource.get("resourceType") not in (None, "OperationOutcome", "Bundle"):
        rtype = str(resource.get("resourceType"))
        rid = resource.get("id") or rid
        version = (resource.get("meta") or {}).get("versionId")
        if rid:
            return f"{rtype}/{rid}" + (f"/_history/{version}" if version else "")
    return f"{rtype}/{rid}" if rtype and rid else None


def _location_reference(location: str | None, base_url: str) -> str | None:
    if not location:
        return None
    if base_url and location.startswith(base_url):
        location = location[len(base_url) :]
    else:
        path = _url_path(location) if "://" in location else location
        parts = path.strip("/").split("/")
        # keep Type/id[/_history/vid] from the end of an absolute location
        for size in (4, 2):
            tail = parts[-size:]
            if len(tail) == size and (size == 2 or tail[2] == "_history"):
                return "/".join(tail)
    return location.strip("/") or None


def _data_entity(ex: Exchange, audited: AuditedInteraction) -> dict[str, Any]:
    interaction = audited.interaction
    resource = audited.response_resource
    if resource is None or resource.get("resourceType") == "OperationOutcome":
        deleted = interaction.kind is InteractionKind.DELETE
        resource = None if deleted else audited.request_resource
    reference: str | None
    if interaction.kind is InteractionKind.VREAD:
        rtype, rid, vid = interaction.resource_type, interaction.resource_id, interaction.version_id
        reference = f"{rtype}/{rid}/_history/{vid}"
    elif interaction.kind is InteractionKind.DELETE:
        reference = _versioned(None, interaction.resource_type, interaction.resource_id)
    else:
        reference = _location_reference(audited.location, ex.base_url) or _versioned(
            resource, interaction.resource_type, interaction.resource_id
        )
    what: dict[str, Any] = (
        {"reference": reference} if reference else {"type": interaction.resource_type or "Resource"}
    )
    entity: dict[str, Any] = {"type": SYSTEM_OBJECT, "role": ROLE_DOMAIN_RESOURCE, "what": what}
    labels = ((resource or {}).get("meta") or {}).get("security")
    if isinstance(labels, list) and labels:
        entity["securityLabel"] = [
            {k: v for k, v in label.items() if k in ("system", "code", "display")}
            for label in labels
            if isinstance(label, Mapping)
        ]
    return entity


# --- what the events say ----------------------------------------------------------------------


class _Kind(NamedTuple):
    """What every event of one kind of interaction shares."""

    subtypes: list[dict[str, str]]
    """``AuditEvent.subtype``."""
    column: str
    """Their codes, as ``EventRow.subtypes``."""
    start: bytes
    """An R4 event's JSON up to its ``period``."""


@functools.lru_cache(maxsize=256)  # bounded: operation names come from clients
def _kind(restful_code: str | None, operation: str | None, action: str) -> _Kind:
    """The parts an interaction's kind (its RESTful code, operation and action) fixes,
    made once."""
    subtypes: list[dict[str, str]] = []
    if restful_code is not None:
        subtypes.append(coding(RESTFUL_INTERACTION, restful_code, restful_code))
        if operation:
            subtypes.append(coding(OPERATION_SYSTEM, f"${operation}"))
    start: dict[str, Any] = {"resourceType": "AuditEvent", "type": TYPE_REST}
    if subtypes:
        start["subtype"] = subtypes
    start["action"] = action
    return _Kind(subtypes, joined(c["code"] for c in subtypes), orjson.dumps(start)[:-1] + b",")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")
"""The last second :func:`_instant` wrote, and how it starts."""


def _instant(at: datetime) -> str:
    """``at.isoformat(timespec="milliseconds")``, in half the time for a UTC time: the
    events of one second share what the second is written as."""
    global _last_second
    if at.tzinfo is not UTC:
        return at.isoformat(timespec="milliseconds")
    second, millisecond = divmod((at - _EPOCH) // _MILLISECOND, 1000)
    last, written = _last_second
    if second != last:
        written = at.replace(microsecond=0, tzinfo=None).isoformat()
        _last_second = (second, written)
    return f"{written}.{millisecond:03d}+00:00"


def _user_of(agent: Mapping[str, Any]) -> str | None:
    who = agent["who"]
    user: str | None = (
        (who.get("identifier") or {}).get("value") or who.get("reference") or who.get("display")
    )
    return user


def _traced(entity: dict[str, Any], traceparent: str) -> dict[str, Any]:
    return {**entity, "detail": [{"type": TRACEPARENT_DETAIL, "valueString": traceparent}]}


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """What every event of one build gets beside what it says."""

    r5: bool
    """Converted to R5 (the row is the R5 event's)."""
    traceparent: str | None
    """Put on the X-Request-Id entity as an ``entity.detail``."""
    tags: tuple[dict[str, str], ...]
    """Added to ``meta.tag``."""

    @classmethod
    def of(
        cls,
        ctx: AuditContext,
        traceparent: str | None = None,
        tags: tuple[dict[str, str], ...] = (),
    ) -> BuildOptions:
        """The options of a build under ``ctx``."""
        r5 = ctx.fhir_version == "R5"
        if not r5 and traceparent is None and not tags:
            return _R4
        return cls(r5=r5, traceparent=traceparent, tags=tags)


_R4 = BuildOptions(r5=False, traceparent=None, tags=())
"""The options of most builds, made once."""


class Statement:
    """What every event of one audited interaction says, whatever patients it names and
    however it is written."""

    # A slotted class, not a NamedTuple: one is made per audited interaction, and it is
    # the record cheapest to make with ten fields.

    __slots__ = (
        "agents",
        "basic_profile",
        "kind",
        "main",
        "moment",
        "outcome",
        "pattern",
        "profile",
        "recorded",
        "transaction",
    )

    def __init__(
        self,
        pattern: Pattern,
        kind: _Kind,
        outcome: str,
        moment: dict[str, Any],
        recorded: str,
        agents: _Agents,
        main: dict[str, Any],
        transaction: dict[str, Any],
        profile: str | None,
        basic_profile: str | None,
    ) -> None:
        self.pattern = pattern
        """The interaction's BALP pattern: action, agent types, profile."""
        self.kind = kind
        self.outcome = outcome
        """``AuditEvent.outcome``'s code."""
        self.moment = moment
        """``period``, ``recorded``, ``outcome`` and ``outcomeDesc``, in that order."""
        self.recorded = recorded
        self.agents = agents
        self.main = main
        """The entity of the resource, or of the query."""
        self.transaction = transaction
        """The entity of the X-Request-Id (with the trace, when traced)."""
        self.profile = profile
        """The BALP profile an event naming one patient claims (``Patient...``); None
        for a failure, which claims none."""
        self.basic_profile = basic_profile
        """The profile an event naming no patient, or listing many, claims."""


def _statement(
    ex: Exchange,
    audited: AuditedInteraction,
    ctx: AuditContext,
    now: datetime,
    outcome: tuple[str, str] | None,
    options: BuildOptions,
) -> Statement:
    interaction = audited.interaction
    pattern = PATTERNS[interaction.kind]
    if outcome is None:
        code, outcome_desc = outcome_of(audited.status, audited.error, audited.response_resource)
        detail = interaction.detail
        unknown = interaction.kind is InteractionKind.UNKNOWN
        if unknown and detail and detail not in (outcome_desc or ""):
            # (A request the proxy refused has its own diagnostics as the detail: once.)
            outcome_desc = detail + (f"; {outcome_desc}" if outcome_desc else "")
    else:
        code, outcome_desc = outcome
    period: dict[str, str] = {"start": _instant(ex.started_at)}
    if ex.finished_at is not None:
        period["end"] = _instant(ex.finished_at)
    # The proxy records an exchange when it finishes: one instant written, not two.
    recorded = period["end"] if now is ex.finished_at else _instant(now)
    moment: dict[str, Any] = {"period": period, "recorded": recorded, "outcome": code}
    if outcome_desc and not outcome_desc.isspace():
        moment["outcomeDesc"] = outcome_desc[:2000]
    if pattern.entity == "data" and interaction.kind is not InteractionKind.UNKNOWN:
        main = _data_entity(ex, audited)
    else:
        main = _query_entity(ex, interaction, ctx)
    transaction = _transaction_entity(ex.request_id)
    if options.traceparent is not None:
        transaction = _traced(transaction, options.traceparent)
    claims = code == "0" and pattern.profile is not None
    return Statement(
        pattern,
        _kind(interaction.restful_code, interaction.operation, pattern.action),
        code,
        moment,
        recorded,
        _agents(
            ex.client_address,
            ex.base_url,
            ex.identity,
            interaction.kind,
            ctx.token_pattern,
            options.r5,
        ),
        main,
        transaction,
        f"Patient{pattern.profile}" if claims else None,
        pattern.profile if claims else None,
    )


# --- the events --------------------------------------------------------------------------


def interaction_events(
    ex: Exchange,
    audited: AuditedInteraction,
    ctx: AuditContext,
    now: datetime,
    *,
    outcome: tuple[str, str] | None = None,
    options: BuildOptions,
) -> list[Built]:
    """The events recording one audited interaction of ``ex``: one per patient, or one
    naming no patient, or one listing them all past ``ctx.max_patient_events``.
    ``outcome`` (code, description) replaces the one the status gives."""
    said = _statement(ex, audited, ctx, now, outcome, options)
    encoding: EventEncoding
    if options is _R4 or (not options.r5 and not options.tags):
        # R4 events without tags are joined from parts; R5 and tags rewrite each event.
        entries = EntryParts.of(
            said.agents.entry_head,
            said.moment,
            entry_end(said.kind.start, ctx.source_json),
            said.transaction,
        )
        encoding = PartsEncoding(
            said.kind.start,
            said.moment,
            said.agents.json,
            ctx.source_json,
            said.transaction,
            entries,
        )
    else:
        encoding = DictEncoding(
            subtypes=said.kind.subtypes,
            action=said.pattern.action,
            moment=said.moment,
            agents=said.agents.agents,
            source=ctx.source,
            transaction=said.transaction,
            r5=options.r5,
            tags=options.tags,
        )
    agents = said.agents
    columns = EventColumns(
        said.recorded,
        now,
        said.pattern.action,
        said.outcome,
        said.kind.column,
        agents.user_id,
        agents.terms,
        agents.terms_tail,
        ex.request_id,
        options.r5,
        options.tags,
        audited.status,
        agents.who,
    )
    main = said.main
    patients = audited.patients
    if len(patients) > ctx.max_patient_events:
        listed = ctx.max_patients_listed
        note = f"{len(patients)} patients" + (
            f", {len(patients) - listed} not listed" if len(patients) > listed else ""
        )
        # One event of the basic profile (``Query``, not ``PatientQuery``, which names
        # exactly one patient) listing the first ``listed`` patients; its first entity's
        # description says how many there were and how many are not listed.
        main = dict(main)
        main["description"] = f"{main['description']} ({note})" if main.get("description") else note
        return [_event(encoding, columns, patients[:listed], main, said.basic_profile)]
    if not patients:
        return [_event(encoding, columns, (), main, said.basic_profile)]
    profile = said.profile
    if len(patients) == 1:
        return [_event(encoding, columns, patients, main, profile)]
    # One event per patient: their terms differ only in the patient's, which comes first.
    main_terms = columns.main_terms(main)
    rest = columns.terms((), main_terms)[1:]
    rest = rest if rest == "]" else f",{rest}"

    def own_terms(patient: str) -> bool:
        """Its terms are not ``e:{patient}`` then ``rest``: it is versioned, or also one
        of the resource's terms."""
        return f"e:{patient}" in main_terms or "/_history/" in patient

    if (
        isinstance(encoding, PartsEncoding)
        and len(patients) <= FAN_MAX
        and not any(own_terms(p) for p in patients)
    ):
        # The R4 events of several patients (without tags) go to the store as one row:
        # what they share serialized once, their ids one UUID numbered (member_id).
        first_id = member_id(new_event_id(), 0)
        fan = FanOut(
            first_id=first_id,
            patients=patients,
            head=encoding.head,
            before=PATIENT_ENTITY_PREFIX,
            tail=encoding.fan_tail(main, profile),
            terms_tail=rest,
            columns=columns.shared(),
        )
        entry = encoding.entry(patients, main)
        return [FannedEvent(fan, i, entry) for i in range(len(patients))]
    events: list[Built] = []
    for p in patients:
        if own_terms(p):
            events.append(_event(encoding, columns, (p,), main, profile))
        else:
            event_id = new_event_id()
            body, entry = encoding.event(event_id, (p,), main, profile)
            terms = f"[{orjson.dumps(f'e:{p}').decode()}{rest}"
            events.append(BuiltEvent(columns.row(event_id, (p,), body, terms), entry))
    return events


def _event(
    encoding: EventEncoding,
    columns: EventColumns,
    patients: tuple[str, ...],
    main: dict[str, Any],
    profile: str | None,
) -> BuiltEvent:
    """One event naming ``patients``, written by ``encoding``, with its row."""
    event_id = new_event_id()
    body, entry = encoding.event(event_id, patients, main, profile)
    terms = columns.terms(patients, columns.main_terms(main))
    return BuiltEvent(columns.row(event_id, patients, body, terms), entry)


def _audited(ex: Exchange) -> AuditedInteraction:
    interaction = ex.interaction
    assert interaction is not None
    response = ex.response_json()
    request = ex.request_json()
    return AuditedInteraction(
        interaction=interaction,
        status=ex.status,
        error=ex.error,
        request_resource=request,
        response_resource=response,
        location=ex.response_headers.get("location") or ex.response_headers.get("content-location"),
        patients=merged_patients(
            ex.prior_patients,
            patients_of_exchange(interaction, request, response, ex.response_headers),
        ),
    )


def merged_patients(first: tuple[str, ...], then: tuple[str, ...]) -> tuple[str, ...]:
    """``first`` then the patients of ``then`` not already in it, in order."""
    return tuple(dict.fromkeys((*first, *then)))


def build_events(
    exchange: Exchange,
    ctx: AuditContext,
    now: datetime,
    *,
    traceparent: str | None = None,
    tags: tuple[dict[str, str], ...] = (),
) -> list[Built]:
    """The AuditEvents for an exchange (R4 BALP, or R5 when configured), each with its
    store row: one per patient, at least one; for a batch or transaction, one for the
    Bundle plus the entries' own. ``traceparent`` (the W3C trace of the request) goes on
    each event's X-Request-Id entity; ``tags`` are added to each event's ``meta.tag``."""
    if exchange.interaction is None:
        exchange.interaction = Interaction(
            kind=InteractionKind.UNKNOWN, method=exchange.method, detail="request not classified"
        )
    options = BuildOptions.of(ctx, traceparent, tags)
    audited = _audited(exchange)
    if exchange.interaction.kind not in (InteractionKind.BATCH, InteractionKind.TRANSACTION):
        return interaction_events(exchange, audited, ctx, now, options=options)
    # The Bundle's own event names no patients: the entries' events do, one per patient.
    events = interaction_events(exchange, audited._replace(patients=()), ctx, now, options=options)
    for entry in bundle_entries(exchange.request_json(), exchange.response_json()):
        status = entry.status
        if status is None and exchange.status is not None and exchange.status >= 400:
            status = exchange.status  # a failed transaction: every entry failed with it
        entry_audited = AuditedInteraction(
            interaction=entry.interaction,
            status=status,
            error=exchange.error,
            request_resource=entry.request_resource,
            response_resource=entry.response_resource or entry.outcome,
            location=entry.location,
            patients=entry.patients,
        )
        events.extend(interaction_events(exchange, entry_audited, ctx, now, options=options))
    return events
