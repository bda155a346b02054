"""Ingestion on the admin listener, compatible with Auditbox's API: applications beside
the FHIR server put their own AuditEvents through the same durable queue.

- ``POST /fhir/AuditEvent``: one AuditEvent; 201 with the stored event (new ``id``,
  ``meta.lastUpdated`` set), ``Location`` and ``ETag``.
- ``POST /fhir``: a ``collection`` Bundle of AuditEvents (201 with every stored event), or
  a ``batch``/``transaction`` Bundle of ``POST AuditEvent`` entries (200 with a
  ``batch-response``/``transaction-response``, as a FHIR server answers them).

Every event is validated with fhir.resources for the configured FHIR version; anything
else is a 400 OperationOutcome naming the entry, and nothing of that request is stored
(a batch stores its valid entries and answers the others one by one, as batches do).
Bodies must be ``application/fhir+json`` or ``application/json``, with a ``fhirVersion``
parameter, if any, matching the configured version (415), plain or gzip/deflate encoded
(another encoding: 415; one that does not decode: 400); bodies over
``admin.max_ingest_bytes`` (decoded) get 413, and a body that goes ``admin.body_timeout_s``
without a byte 408. The events of one request are committed together
with fsync before the answer; a store that cannot take them gives 503 or 507, and nothing
is acknowledged.

The authenticated caller is recorded on each stored event in the extension
:data:`SUBMITTER_EXT`, not as an ``agent``: agents are the participants in the audited
activity, which the submitting application usually is not, and BALP profiles constrain
the agent slices, so an extra agent would change what the event says and could break its
conformance. An extension adds the fact without altering the event.

An ingested event cannot pass as the proxy's own: any extension in the proxy's namespace
(a forged ``submitted-by``, a token verification) and any tag of the proxy's system (its
``admin-access``) are removed, the proxy's ``submitted-by`` put in their place, and the
event tagged :data:`INGESTED_TAG`; one whose ``source.observer`` names this proxy is
refused (400). Nor can it be backdated in the trail: it is indexed, sorted and found by
``date`` at the time the proxy received it (its ``meta.lastUpdated``), its ``recorded``
kept as the submitter claimed it.

The work of one request is bounded (``admin.max_ingest_bytes``, ``max_ingest_events``
events, ``max_event_parts`` agents and entities in one event: 413 past them), and the
validation of a large one runs in a process of its own (:class:`ValidationPool`), so that
ingestion never holds up the proxy's own traffic.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from proxy.admin.keys import AUDIT_CONTEXT, CALLER, FHIR_VERSION, SETTINGS, VALIDATION, WRITER
from proxy.admin.links import public_base
from proxy.audit.ids import new_event_id
from proxy.audit.validate import ValidationUnavailable, validate_event
from proxy.fhir.operation_outcome import FHIR_JSON, outcome_response
from proxy.store.index import event_row
from proxy.store.marks import ADMIN_ACCESS_TAG
from proxy.store.records import EventRow

SUBMITTER_EXT = "urn:fhir-audit-proxy:extension:submitted-by"
"""On an ingested event: who submitted it through the admin API (``valueReference``)."""
PROXY_EXTENSIONS = "urn:fhir-audit-proxy:extension:"
"""The prefix of every extension the proxy writes: only the proxy may write one."""
INGESTED_TAG = {
    "system": ADMIN_ACCESS_TAG["system"],
    "code": "ingested",
    "display": "submitted through the admin API, not recorded by this proxy",
}
"""In ``meta.tag`` of every ingested event (and of no event the proxy records itself)."""
VALIDATE_INLINE_BYTES = 16 * 1024
"""A request body up to this size has its events validated on the event loop (a few
ms); a larger one in the admin app's :class:`~proxy.audit.validate.ValidationPool`."""

JSON_TYPES = frozenset({"application/fhir+json", "application/json"})
CONTENT_ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})
"""Body encodings ingestion takes (aiohttp decodes them); others get 415."""
FHIR_VERSIONS = {"R4": ("4.0",), "R5": ("5.0",)}
"""``fhirVersion`` MIME parameter values accepted per configured version (``4.0``,
``4.0.1``: a major.minor prefix, as the FHIR versioning rules write it)."""


class Rejected(Exception):
    """The request cannot be ingested; carries the answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _reject(status: int, code: str, diagnostics: str) -> Rejected:
    response = outcome_response(status, code, diagnostics)
    response.force_close()  # the body may be left unread: nothing after it can be framed
    return Rejected(response)


def _content_type_problem(header: str, fhir_version: str) -> str | None:
    mime, *params = (part.strip() for part in header.split(";"))
    if mime.lower() not in JSON_TYPES:
        return f"Content-Type must be application/fhir+json, not {mime or 'absent'!r}"
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "fhirversion":
            value = value.strip().strip('"')
            if not value.startswith(FHIR_VERSIONS[fhir_version]):
                return f"fhirVersion={value} is not this server's version ({fhir_version})"
    return None


async def _read_body(request: web.Request) -> tuple[dict[str, Any], int]:
    """The request body as a JSON object, and its size decoded, after the content-type,
    encoding, size and time rules."""
    problem = _content_type_problem(
        request.headers.get("Content-Type", ""), request.app[FHIR_VERSION]
    )
    if problem:
        raise _reject(415, "not-supported", problem)
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in CONTENT_ENCODINGS:
        raise _reject(
            415,
            "not-supported",
            f"Content-Encoding must be gzip, deflate or none, not {encoding!r}",
        )
    settings = request.app[SETTINGS]
    limit = settings.max_ingest_bytes
    too_large = _reject(413, "too-costly", f"the body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            # The size counts decoded bytes: a small compressed body cannot unpack past it.
            async with asyncio.timeout(settings.body_timeout_s):
                chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except TimeoutError:
        raise _reject(
            408, "timeout", f"no byte of the request body for {settings.body_timeout_s:g} s"
        ) from None
    except (HttpProcessingError, RequestPayloadError, zlib.error) as exc:
        raise _reject(
            400, "structure", f"the body could not be read ({type(exc).__name__}, {encoding})"
        ) from None
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise _reject(400, "structure", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _reject(400, "structure", "the body must be a JSON object (a FHIR resource)")
    return body, size


def _shape_problem(resource: Any, observer: dict[str, Any]) -> str | None:
    """Why ``resource`` cannot be ingested, seen before any validation: not an
    AuditEvent, or one whose ``source.observer`` names this proxy (``observer``)."""
    if not isinstance(resource, dict):
        return "not a resource"
    kind = resource.get("resourceType")
    if kind != "AuditEvent":
        return f"resourceType must be AuditEvent, not {kind!r}"
    source = resource.get("source")
    claimed = source.get("observer") if isinstance(source, dict) else None
    if isinstance(claimed, dict) and any(
        claimed.get(name) is not None
        and str(claimed.get(name)).strip().lower() == str(observer.get(name)).strip().lower()
        for name in ("reference", "display")
    ):
        return (
            f"source.observer names this proxy ({observer.get('reference')}); an ingested"
            " event names its own observer: only the proxy records as itself"
        )
    return None


def _parts(resource: Any) -> int:
    """Agents and entities of an event (what its validation and indexing cost grows with)."""
    if not isinstance(resource, dict):
        return 0
    return sum(
        len(value)
        for value in (resource.get("agent"), resource.get("entity"))
        if isinstance(value, list)
    )


def _check_cost(request: web.Request, resources: Sequence[tuple[str, Any]]) -> None:
    """Raise a 413 when the events of a request (``(where, resource)``) are more than
    ``admin.max_ingest_events`` or one has more than ``admin.max_event_parts`` agents and
    entities: bounds on the work one request makes."""
    settings = request.app[SETTINGS]
    if len(resources) > settings.max_ingest_events:
        raise _reject(
            413,
            "too-costly",
            f"{len(resources)} events in one request; at most {settings.max_ingest_events}"
            " (admin.max_ingest_events)",
        )
    for where, resource in resources:
        parts = _parts(resource)
        if parts > settings.max_event_parts:
            raise _reject(
                413,
                "too-costly",
                f"{where}: {parts} agents and entities; at most {settings.max_event_parts}"
                " in one event (admin.max_event_parts)",
            )


def _validation_text(errors: str) -> str:
    lines = [ln for ln in errors.splitlines() if not ln.strip().startswith("For further info")]
    return " ".join(ln.strip() for ln in lines)[:2000]


async def _problems(request: web.Request, resources: Sequence[Any], size: int) -> list[str | None]:
    """Why each of ``resources`` cannot be ingested, or None: the shape rules, then
    fhir.resources validation, on the event loop for a small request (``size``, its body
    decoded) and in the validation pool for a larger one."""
    observer = request.app[AUDIT_CONTEXT].source.get("observer", {})
    problems = [_shape_problem(r, observer) for r in resources]
    to_validate = [i for i, problem in enumerate(problems) if problem is None]
    version = request.app[FHIR_VERSION]
    if size <= VALIDATE_INLINE_BYTES:
        errors = [validate_event(resources[i], version) for i in to_validate]
    else:
        try:
            errors = await request.app[VALIDATION].problems([resources[i] for i in to_validate])
        except ValidationUnavailable:
            raise _reject(
                503, "transient", "the events could not be validated now; send them again"
            ) from None
    for i, error in zip(to_validate, errors, strict=True):
        if error is not None:
            problems[i] = _validation_text(error)
    return problems


def _submitter(request: web.Request) -> dict[str, Any]:
    identity = request[CALLER].identity
    who: dict[str, Any] = {}
    value = identity.client_id or identity.user_id
    if value:
        who["identifier"] = {"value": value}
        if identity.issuer and "://" in identity.issuer:
            who["identifier"]["system"] = identity.issuer
    who["display"] = identity.user_name or value or f"unauthenticated caller at {request.remote}"
    return {"url": SUBMITTER_EXT, "valueReference": who}


def _stamped(resource: dict[str, Any], submitter: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The event as stored: a new id, ``meta.lastUpdated`` and ``versionId`` set, the
    proxy's own tags and extensions (only the proxy may write them) replaced by its
    :data:`INGESTED_TAG` and ``submitter``."""
    event = dict(resource)
    event["id"] = new_event_id()
    meta = dict(event.get("meta") or {})
    meta["versionId"] = "1"
    meta["lastUpdated"] = now.isoformat(timespec="milliseconds")
    tags = [
        t
        for t in meta.get("tag", ())
        if not (isinstance(t, dict) and t.get("system") == ADMIN_ACCESS_TAG["system"])
    ]
    meta["tag"] = [*tags, INGESTED_TAG]
    event["meta"] = meta
    event["extension"] = [*_not_the_proxys(event.get("extension")), submitter]
    if isinstance(event.get("agent"), list):
        event["agent"] = [_agent_without_proxy_claims(a) for a in event["agent"]]
    return event


def _not_the_proxys(extensions: Any) -> list[Any]:
    """``extensions`` without those in the proxy's namespace."""
    if not isinstance(extensions, list):
        return []
    return [
        e
        for e in extensions
        if not (isinstance(e, dict) and str(e.get("url", "")).startswith(PROXY_EXTENSIONS))
    ]


def _agent_without_proxy_claims(agent: Any) -> Any:
    """An agent without extensions in the proxy's namespace (such as its record of a
    token's verification, which the proxy never made for an ingested event)."""
    if not isinstance(agent, dict) or "extension" not in agent:
        return agent
    kept = _not_the_proxys(agent["extension"])
    trimmed = {k: v for k, v in agent.items() if k != "extension"}
    return {**trimmed, "extension": kept} if kept else trimmed


def _rows(events: Sequence[dict[str, Any]], received: datetime) -> list[EventRow]:
    """The store rows of ingested events: indexed at the time they were ``received``, not
    at the ``recorded`` they claim, so no submitter can place an event in the trail's
    past (or future)."""
    at = received.timestamp()
    return [event_row(event)._replace(recorded_ts=at) for event in events]


def _fhir(body: Any, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=FHIR_JSON, headers=headers
    )


def _entry_headers(base: str, event: dict[str, Any]) -> dict[str, str]:
    return {
        "Location": f"{base}/AuditEvent/{event['id']}/_history/1",
        "ETag": 'W/"1"',
        "Last-Modified": format_datetime(
            datetime.fromisoformat(event["meta"]["lastUpdated"]), usegmt=True
        ),
    }


async def post_audit_event(request: web.Request) -> web.Response:
    """``POST /fhir/AuditEvent``."""
    try:
        resource, size = await _read_body(request)
        _check_cost(request, [("AuditEvent", resource)])
        (problem,) = await _problems(request, [resource], size)
    except Rejected as rejected:
        return rejected.response
    if problem:
        return outcome_response(400, "invalid", f"AuditEvent: {problem}")
    now = datetime.now(UTC)
    event = _stamped(resource, _submitter(request), now)
    await request.app[WRITER].append_rows(_rows([event], now))
    base = f"{public_base(request)}/fhir"
    return _fhir(event, 201, _entry_headers(base, event))


def _is_audit_event_post(request_part: Any) -> bool:
    if not isinstance(request_part, dict) or request_part.get("method") != "POST":
        return False
    url = str(request_part.get("url", "")).split("?")[0].rstrip("/")
    return url == "AuditEvent" or url.endswith("/AuditEvent")


async def post_bundle(request: web.Request) -> web.Response:
    """``POST /fhir``: a collection, batch or transaction Bundle of AuditEvents."""
    try:
        bundle, size = await _read_body(request)
    except Rejected as rejected:
        return rejected.response
    if bundle.get("resourceType") != "Bundle":
        return outcome_response(
            400, "invalid", f"POST /fhir takes a Bundle, not {bundle.get('resourceType')!r}"
        )
    kind = bundle.get("type")
    if kind not in ("collection", "batch", "transaction"):
        return outcome_response(
            400, "not-supported", f"Bundle.type must be collection, batch or transaction: {kind!r}"
        )
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        return outcome_response(400, "structure", "Bundle.entry must be a list")
    problems: dict[int, str] = {}
    candidates: list[int] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems[index] = "not an object"
        elif kind != "collection" and not _is_audit_event_post(entry.get("request")):
            problems[index] = "request must be POST AuditEvent"
        else:
            candidates.append(index)
    resources = [entries[i].get("resource") for i in candidates]
    try:
        _check_cost(
            request, [(f"Bundle.entry[{i}]", entries[i].get("resource")) for i in candidates]
        )
        found = await _problems(request, resources, size)
    except Rejected as rejected:
        return rejected.response
    for index, problem in zip(candidates, found, strict=True):
        if problem:
            problems[index] = f"resource: {problem}"
    if problems and kind != "batch":
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": f"Bundle.entry[{i}]: {text}",
                    "expression": [f"Bundle.entry[{i}]"],
                }
                for i, text in sorted(problems.items())
            ],
        }
        return _fhir(outcome, 400)
    now = datetime.now(UTC)
    submitter = _submitter(request)
    stored = {
        i: _stamped(entry["resource"], submitter, now)
        for i, entry in enumerate(entries)
        if i not in problems
    }
    if stored:
        await request.app[WRITER].append_rows(_rows(list(stored.values()), now))
    base = f"{public_base(request)}/fhir"
    if kind == "collection":
        answer = {
            "resourceType": "Bundle",
            "id": new_event_id(),
            "type": "collection",
            "entry": [
                {"fullUrl": f"{base}/AuditEvent/{e['id']}", "resource": e} for e in stored.values()
            ],
        }
        return _fhir(answer, 201)
    out: list[dict[str, Any]] = []
    for index in range(len(entries)):
        if index in problems:
            out.append(
                {
                    "response": {
                        "status": "400 Bad Request",
                        "outcome": {
                            "resourceType": "OperationOutcome",
                            "issue": [
                                {
                                    "severity": "error",
                                    "code": "invalid",
                                    "diagnostics": f"Bundle.entry[{index}]: {problems[index]}",
                                }
                            ],
                        },
                    }
                }
            )
            continue
        event = stored[index]
        headers = _entry_headers(base, event)
        out.append(
            {
                "fullUrl": f"{base}/AuditEvent/{event['id']}",
                "resource": event,
                "response": {
                    "status": "201 Created",
                    "location": f"AuditEvent/{event['id']}/_history/1",
                    "etag": headers["ETag"],
                    "lastModified": event["meta"]["lastUpdated"],
                },
            }
        )
    answer = {"resourceType": "Bundle", "type": f"{kind}-response", "entry": out}
    return _fhir(answer, 200)
