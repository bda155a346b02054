"""A large response Bundle as its audit reads it, parsed from its file entry by entry.

Parsing a multi-megabyte searchset whole takes several times its size in memory. Its
audit reads only a little of each entry: the entry's request and response, and of its
resource the type, id, meta and the elements that put it in the Patient compartment. So
the Bundle is read incrementally (ijson, C backend), one entry at a time, and each entry
is kept cut down to that. Of the Bundle itself the audit reads only its type of resource.
What cannot be read this way (not JSON, not a Bundle, a ``resourceType`` written after the
entries, no entries) gives None, and the body is parsed whole as before. A FHIR XML Bundle
is read the same way, element by element (:func:`proxy.fhir.formats.xml_resource`), each
entry cut once read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import ijson

from proxy.fhir.compartment import PATIENT_PATHS
from proxy.fhir.formats import BodyFormat, body_format, xml_resource

_TOP = frozenset({"resourceType", "id", "type", "total"})
"""The Bundle's own fields kept (when written before its entries, as servers do)."""
_ENTRY = ("fullUrl", "request", "response", "search")
_WHOLE = frozenset({"OperationOutcome", "Bundle"})
"""Resources kept whole in an entry (an outcome's text is recorded; a nested Bundle is
read as one)."""
_SCALARS = frozenset({"string", "number", "boolean", "null"})


def audit_view(stream: BinaryIO, content_type: str = "") -> dict[str, Any] | None:
    """The Bundle in ``stream`` (positioned at its start; JSON, or FHIR XML as
    ``content_type`` says) with each entry cut to what the audit reads, or None when it
    must be parsed whole. (An XML resource that is no Bundle is given whole: reading it
    is parsing it.)"""
    fmt = body_format(content_type, stream.read(64))
    stream.seek(0)
    if fmt is BodyFormat.XML:
        return xml_resource(stream, on_entry=_entry)
    if fmt is not BodyFormat.JSON:
        return None
    try:
        head = _fields_before_entries(stream)
        if head is None or head.get("resourceType") != "Bundle":
            return None
        stream.seek(0)
        entries = [
            _entry(e)
            for e in ijson.items(stream, "entry.item", use_float=True)
            if isinstance(e, Mapping)
        ]
    except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError):
        return None
    return {**head, "entry": entries}


def _fields_before_entries(stream: BinaryIO) -> dict[str, Any] | None:
    """The Bundle's fields in :data:`_TOP` written before ``entry``; None when the
    document is not an object or has no ``entry``."""
    head: dict[str, Any] = {}
    events: Iterator[tuple[str, str, Any]] = ijson.parse(stream, use_float=True)
    prefix, event, _ = next(events)
    if prefix != "" or event != "start_map":
        return None
    seen_entry = False
    for prefix, event, value in events:
        if prefix == "" and event == "map_key":
            if value == "entry":
                seen_entry = True
                break
        elif prefix in _TOP and event in _SCALARS:
            head[prefix] = value
    if not seen_entry:
        return None  # no entries: small, or unusual; parsed whole
    return head


def _entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: entry[k] for k in _ENTRY if k in entry}
    if "resource" in entry:
        resource = entry["resource"]
        out["resource"] = _resource(resource) if isinstance(resource, Mapping) else resource
    return out


def _resource(resource: Mapping[str, Any]) -> Any:
    rtype = resource.get("resourceType")
    if rtype in _WHOLE:
        return resource
    kept = {"resourceType", "id", "meta"}
    kept.update(path[0] for path in PATIENT_PATHS.get(str(rtype), ()))
    return {k: v for k, v in resource.items() if k in kept}
