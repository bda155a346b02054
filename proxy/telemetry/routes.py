"""Where a FHIR request went, said without what could identify a patient: the route
template of its interaction (``http.route``: ``/fhir/{type}/{id}``, low-cardinality, for
span names and metric attributes) and its path with the ids scrubbed (``url.path``:
``/fhir/Patient/REDACTED``). Pure; no query ever: it may hold PHI.

Placeholders: ``{type}`` a resource type, ``{id}`` a logical id, ``{vid}`` a version id,
``{compartment}`` the compartment's type (``Patient`` in ``Patient/1/Observation``),
``${operation}`` an operation's name. A request that is not a FHIR interaction (and one
outside the FHIR base) has no route.
"""

from __future__ import annotations

import re

from proxy.fhir.compartment import RESOURCE_TYPES
from proxy.fhir.interaction import Interaction, InteractionKind

REDACTED = "REDACTED"
"""What a scrubbed path segment reads (the semantic conventions' word for it)."""

_K = InteractionKind
_FIXED = {
    _K.CREATE: "{type}",
    _K.VREAD: "{type}/{id}/_history/{vid}",
    _K.HISTORY_INSTANCE: "{type}/{id}/_history",
    _K.HISTORY_TYPE: "{type}/_history",
    _K.HISTORY_SYSTEM: "_history",
    _K.CAPABILITIES: "metadata",
    _K.BATCH: "",
    _K.TRANSACTION: "",
}
_ON_INSTANCE_OR_TYPE = frozenset({_K.READ, _K.UPDATE, _K.PATCH, _K.DELETE})
_KEPT = frozenset({"_history", "_search", "metadata", "*"})
_OPERATION = re.compile(r"\$[A-Za-z][A-Za-z0-9_-]{0,63}")


def fhir_route(base_path: str, path: str, interaction: Interaction | None) -> str | None:
    """The route template of a request to ``path`` (below the FHIR base ``base_path``, as
    :attr:`Exchange.path <proxy.exchange.Exchange.path>`: no leading slash; absolute when
    outside the base) classified as ``interaction``; None when it is not a FHIR
    interaction."""
    if interaction is None or interaction.kind is _K.UNKNOWN or path.startswith("/"):
        return None
    relative = _relative_route(path, interaction)
    return f"{base_path}/{relative}" if relative else (base_path or "/")


def _relative_route(path: str, interaction: Interaction) -> str:
    kind = interaction.kind
    fixed = _FIXED.get(kind)
    if fixed is not None:
        return fixed
    searched = path == "_search" or path.endswith("/_search")
    if kind in _ON_INSTANCE_OR_TYPE:
        # Conditional update, patch and delete address a type (or, delete, the base).
        if interaction.resource_id is not None:
            return "{type}/{id}"
        return "{type}" if interaction.resource_type else ""
    if kind is _K.SEARCH_TYPE:
        return "{type}/_search" if searched else "{type}"
    if kind is _K.SEARCH_SYSTEM:
        return "_search" if searched else ""
    if kind is _K.SEARCH_COMPARTMENT:
        target = "{type}" if interaction.resource_type else "*"
        return f"{{compartment}}/{{id}}/{target}" + ("/_search" if searched else "")
    # An operation, on the system, a type or an instance.
    if interaction.resource_id is not None:
        return "{type}/{id}/${operation}"
    return "{type}/${operation}" if interaction.resource_type else "${operation}"


def scrubbed_path(base_path: str, path: str) -> str:
    """The path of a request to ``path`` (as :func:`fhir_route` takes it) with every
    segment that could identify someone replaced by :data:`REDACTED`. Kept: the base
    path, resource type names, ``_history``, ``_search``, ``metadata``, ``*`` and
    operation names; everything else (ids, version ids, whatever a path outside the
    FHIR API holds) is scrubbed."""
    prefix = "" if path.startswith("/") else base_path
    segments = [s for s in path.split("/") if s]
    kept = (
        s if s in RESOURCE_TYPES or s in _KEPT or _OPERATION.fullmatch(s) else REDACTED
        for s in segments
    )
    return prefix + "".join(f"/{s}" for s in kept) or "/"
