"""Which FHIR REST interaction a request is: pure classification from method, path, query,
headers and body. No I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import orjson

from proxy.fhir.compartment import RESOURCE_TYPES


class InteractionKind(StrEnum):
    """The interaction, named by its code in ``http://hl7.org/fhir/restful-interaction``
    where one exists."""

    READ = "read"
    VREAD = "vread"
    UPDATE = "update"
    PATCH = "patch"
    DELETE = "delete"
    CREATE = "create"
    HISTORY_INSTANCE = "history-instance"
    HISTORY_TYPE = "history-type"
    HISTORY_SYSTEM = "history-system"
    SEARCH_TYPE = "search-type"
    SEARCH_SYSTEM = "search-system"
    SEARCH_COMPARTMENT = "search-compartment"
    """``Patient/1/Observation``: restful-interaction has no code of its own, so events
    use search-type."""
    CAPABILITIES = "capabilities"
    BATCH = "batch"
    TRANSACTION = "transaction"
    OPERATION = "operation"
    UNKNOWN = "unknown"
    """Not a FHIR interaction (malformed path, unsupported method); still audited."""


WRITE_KINDS = frozenset(
    {
        InteractionKind.UPDATE,
        InteractionKind.PATCH,
        InteractionKind.DELETE,
        InteractionKind.CREATE,
        InteractionKind.BATCH,
        InteractionKind.TRANSACTION,
    }
)


@dataclass(frozen=True, slots=True)
class Interaction:
    """A classified request. Everything that can be known before the response arrives."""

    kind: InteractionKind
    """What the request does."""
    method: str
    """The HTTP method, upper case."""
    resource_type: str | None = None
    """The resource type in the path (``Patient`` in ``Patient/1``), or the compartment's
    target type for compartment searches (``Observation`` in ``Patient/1/Observation``)."""
    resource_id: str | None = None
    """The logical id in the path."""
    version_id: str | None = None
    """The version in ``_history/{vid}``."""
    operation: str | None = None
    """The operation name without ``$`` (``everything``)."""
    compartment: tuple[str, str] | None = None
    """``(type, id)`` of the compartment searched (``("Patient", "1")``)."""
    conditional: bool = False
    """Conditional create (``If-None-Exist``), update, patch or delete (``Type?params``)."""
    search: tuple[tuple[str, str], ...] = ()
    """The search parameters, from the query string and a form body, in order;
    ``_format`` and ``_pretty`` removed."""
    detail: str | None = None
    """Why the request is UNKNOWN, for ``outcomeDesc``."""

    @property
    def is_write(self) -> bool:
        """Whether the request may change server state (an intent record goes first).
        Operations count as writes when sent by POST."""
        if self.kind is InteractionKind.OPERATION:
            return self.method == "POST"
        return self.kind in WRITE_KINDS

    @property
    def restful_code(self) -> str | None:
        """The ``restful-interaction`` code for ``AuditEvent.subtype``."""
        if self.kind is InteractionKind.UNKNOWN:
            return None
        if self.kind is InteractionKind.SEARCH_COMPARTMENT:
            return InteractionKind.SEARCH_TYPE.value
        return self.kind.value


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DROPPED_PARAMS = frozenset({"_format", "_pretty"})
_FORM = "application/x-www-form-urlencoded"


CREDENTIAL_PARAMS = frozenset(
    {"access_token", "id_token", "refresh_token", "client_secret", "password", "api_key"}
    | {"token", "apikey", "client_assertion", "sig"}
)
"""Query and form parameters that carry a credential (OAuth 2.0 and its habits, signed
URLs' ``sig``): their values are never recorded, whatever ``audit.redact_params`` adds.
A name is matched with any ``[...]`` suffix (``access_token[]``, ``token[0]``). Not
``code``: it is the search parameter of Observation, Condition, Procedure and more, and
OAuth's authorization code goes to the client's redirect URI and the token endpoint,
never to a resource server (an operator who needs it redacted adds it to
``redact_params``)."""
REDACTED = "REDACTED"
"""What a redacted parameter's value is replaced with."""


def redact_query(query_string: str, names: frozenset[str]) -> str:
    """``query_string`` (raw, ``a=1&b=2``, also a form body) with the value of every
    parameter named in ``names`` (lower case, compared case-insensitively after decoding)
    replaced by :data:`REDACTED`. Everything else is kept byte for byte."""
    if not query_string or "=" not in query_string:
        return query_string
    pieces = query_string.split("&")
    changed = False
    for i, piece in enumerate(pieces):
        name, eq, _ = piece.partition("=")
        if eq and param_name(unquote_plus(name)) in names:
            pieces[i] = f"{name}={REDACTED}"
            changed = True
    return "&".join(pieces) if changed else query_string


def redact_text(text: str, names: frozenset[str]) -> str:
    """``text`` (an error message that may quote a URL) with every ``name=value`` of a
    parameter in ``names`` given the value :data:`REDACTED`."""
    if "=" not in text:
        return text
    pattern = "|".join(re.escape(n) for n in sorted(names))
    return re.sub(
        rf"(?i)\b((?:{pattern})(?:\[[^\]=&\s]*\]|%5B[^=&\s]*?%5D)*)=[^&\s'\"]*",
        lambda m: f"{m.group(1)}={REDACTED}",
        text,
    )


def redact_params(
    params: Iterable[tuple[str, str]], names: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """``params`` with the values of those named in ``names`` replaced by :data:`REDACTED`."""
    return tuple((k, REDACTED if param_name(k) in names else v) for k, v in params)


def credential_params(configured: Iterable[str]) -> frozenset[str]:
    """The parameter names whose values are never recorded: :data:`CREDENTIAL_PARAMS`
    and those ``audit.redact_params`` adds (``configured``)."""
    return CREDENTIAL_PARAMS | {name.strip().lower() for name in configured}


def param_name(name: str) -> str:
    """A parameter's name as :data:`CREDENTIAL_PARAMS` and ``audit.redact_params`` list
    it: decoded, stripped, lower case, without ``[...]`` suffixes (PHP's and Rails'
    ``name[]`` for a list, ``name[0]``)."""
    name = name.strip().lower()
    if name.endswith("]") and "[" in name:
        name = name.split("[", 1)[0].rstrip()
    return name


def _params(query_string: str) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, v in parse_qsl(query_string, keep_blank_values=True)
        if k not in _DROPPED_PARAMS
    ]


def _form_params(headers: Mapping[str, str], body: bytes | None) -> list[tuple[str, str]]:
    if not body or not headers.get("content-type", "").startswith(_FORM):
        return []
    try:
        return _params(body.decode("utf-8"))
    except UnicodeDecodeError:
        return []


def parse_json_object(body: bytes | None) -> dict[str, Any] | None:
    """A JSON object from ``body``, or None when it is empty, not JSON or not an object."""
    if not body:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _bundle_type(parsed: Callable[[], dict[str, Any] | None]) -> str | None:
    value = parsed()
    if value is not None and value.get("resourceType") == "Bundle":
        kind = value.get("type")
        return kind if isinstance(kind, str) else None
    return None


def _unknown(method: str, detail: str) -> Interaction:
    return Interaction(kind=InteractionKind.UNKNOWN, method=method, detail=detail)


def classify(
    method: str,
    path: str,
    query_string: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    parsed_body: Callable[[], dict[str, Any] | None] | None = None,
) -> Interaction:
    """Classify a request. ``path`` is below the FHIR base without leading slash (``''`` for
    the base); ``query_string`` is raw; ``headers`` have lower-case names; ``body`` is the
    raw request body. ``parsed_body`` gives the body as a JSON object when it is needed
    (an exchange's cached parse, so the body is parsed once per exchange); without it the
    body is parsed here. Pure, and never raises: what is not FHIR is UNKNOWN with a detail."""
    parsed = parsed_body or (lambda: parse_json_object(body))
    try:
        return _classify(method.upper(), path, query_string, headers, body, parsed)
    except Exception as exc:  # classification must never break the audit path
        return _unknown(method.upper(), f"unclassifiable request: {type(exc).__name__}")


def _classify(
    method: str,
    path: str,
    query_string: str,
    headers: Mapping[str, str],
    body: bytes | None,
    parsed: Callable[[], dict[str, Any] | None],
) -> Interaction:
    verb = "GET" if method == "HEAD" else method
    if verb not in _METHODS:
        return _unknown(method, f"unsupported HTTP method {method}")
    segments = path.strip("/").split("/") if path.strip("/") else []
    if any(not s for s in segments):
        return _unknown(method, "empty path segment")
    search = tuple(_params(query_string))

    if not segments:
        if verb == "POST":
            bundle_type = _bundle_type(parsed)
            if bundle_type == "batch":
                return Interaction(kind=InteractionKind.BATCH, method=method)
            if bundle_type == "transaction":
                return Interaction(kind=InteractionKind.TRANSACTION, method=method)
            return _unknown(method, "POST to the base is not a batch or transaction Bundle")
        if verb == "GET":
            return Interaction(kind=InteractionKind.SEARCH_SYSTEM, method=method, search=search)
        if verb == "DELETE" and search:
            return Interaction(
                kind=InteractionKind.DELETE, method=method, conditional=True, search=search
            )
        return _unknown(method, f"{method} on the base is not a FHIR interaction")

    head = segments[0]
    if len(segments) == 1 and head == "metadata":
        if verb == "GET":
            return Interaction(kind=InteractionKind.CAPABILITIES, method=method)
        return _unknown(method, f"{method} on metadata")
    if len(segments) == 1 and head == "_history":
        if verb == "GET":
            return Interaction(kind=InteractionKind.HISTORY_SYSTEM, method=method, search=search)
        return _unknown(method, f"{method} on _history")
    if len(segments) == 1 and head == "_search":
        if verb == "POST":
            form = tuple(_form_params(headers, body))
            return Interaction(
                kind=InteractionKind.SEARCH_SYSTEM, method=method, search=search + form
            )
        return _unknown(method, f"{method} on _search")
    if head.startswith("$"):
        if len(segments) == 1 and len(head) > 1:
            return Interaction(
                kind=InteractionKind.OPERATION, method=method, operation=head[1:], search=search
            )
        return _unknown(method, "malformed system operation path")
    if head not in RESOURCE_TYPES:
        return _unknown(method, f"unknown resource type {head[:64]!r}")
    rtype = head

    if len(segments) == 1:
        if verb == "GET":
            return Interaction(
                kind=InteractionKind.SEARCH_TYPE, method=method, resource_type=rtype, search=search
            )
        if verb == "POST":
            if_none = headers.get("if-none-exist")
            cond = tuple(_params(if_none)) if if_none else ()
            return Interaction(
                kind=InteractionKind.CREATE,
                method=method,
                resource_type=rtype,
                conditional=bool(if_none),
                search=cond,
            )
        kind = {
            "PUT": InteractionKind.UPDATE,
            "PATCH": InteractionKind.PATCH,
            "DELETE": InteractionKind.DELETE,
        }[verb]
        return Interaction(
            kind=kind, method=method, resource_type=rtype, conditional=True, search=search
        )

    second = segments[1]
    if len(segments) == 2:
        if second == "_search":
            if verb in ("GET", "POST"):
                form = tuple(_form_params(headers, body)) if verb == "POST" else ()
                return Interaction(
                    kind=InteractionKind.SEARCH_TYPE,
                    method=method,
                    resource_type=rtype,
                    search=search + form,
                )
            return _unknown(method, f"{method} on {rtype}/_search")
        if second == "_history":
            if verb == "GET":
                return Interaction(
                    kind=InteractionKind.HISTORY_TYPE,
                    method=method,
                    resource_type=rtype,
                    search=search,
                )
            return _unknown(method, f"{method} on {rtype}/_history")
        if second.startswith("$") and len(second) > 1:
            return Interaction(
                kind=InteractionKind.OPERATION,
                method=method,
                resource_type=rtype,
                operation=second[1:],
                search=search,
            )
        if not _ID.fullmatch(second):
            return _unknown(method, f"malformed resource id in {rtype}/{second[:64]}")
        by_verb = {
            "GET": InteractionKind.READ,
            "PUT": InteractionKind.UPDATE,
            "PATCH": InteractionKind.PATCH,
            "DELETE": InteractionKind.DELETE,
        }
        if verb not in by_verb:
            return _unknown(method, f"{method} on a resource instance")
        return Interaction(
            kind=by_verb[verb], method=method, resource_type=rtype, resource_id=second
        )

    if not _ID.fullmatch(second):
        return _unknown(method, f"malformed resource id in {rtype}/{second[:64]}")
    third = segments[2]
    if len(segments) == 3:
        if third == "_history":
            if verb == "GET":
                return Interaction(
                    kind=InteractionKind.HISTORY_INSTANCE,
                    method=method,
                    resource_type=rtype,
                    resource_id=second,
                    search=search,
                )
            return _unknown(method, f"{method} on instance history")
        if third.startswith("$") and len(third) > 1:
            return Interaction(
                kind=InteractionKind.OPERATION,
                method=method,
                resource_type=rtype,
                resource_id=second,
                operation=third[1:],
                search=search,
            )
        if (third in RESOURCE_TYPES or third == "*") and verb == "GET":
            return Interaction(
                kind=InteractionKind.SEARCH_COMPARTMENT,
                method=method,
                resource_type=None if third == "*" else third,
                compartment=(rtype, second),
                search=search,
            )
        return _unknown(method, f"{method} {rtype}/{second}/{third[:64]} is not a FHIR interaction")

    if len(segments) == 4:
        fourth = segments[3]
        if third == "_history" and verb == "GET" and _ID.fullmatch(fourth):
            return Interaction(
                kind=InteractionKind.VREAD,
                method=method,
                resource_type=rtype,
                resource_id=second,
                version_id=fourth,
            )
        if third in RESOURCE_TYPES and fourth == "_search" and verb in ("GET", "POST"):
            form = tuple(_form_params(headers, body)) if verb == "POST" else ()
            return Interaction(
                kind=InteractionKind.SEARCH_COMPARTMENT,
                method=method,
                resource_type=third,
                compartment=(rtype, second),
                search=search + form,
            )
    return _unknown(method, "path is not a FHIR interaction")
