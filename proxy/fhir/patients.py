"""Which patients an interaction concerns, best effort as BALP asks: from the URL, the search
parameters, the request and response bodies (through the Patient compartment's reference
paths) and the ``Location`` headers. Pure; never raises on odd input.

A patient is returned as a relative reference, ``Patient/{id}``, without version.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.fhir.compartment import PATIENT_PARAMS, PATIENT_PATHS
from proxy.fhir.interaction import Interaction, InteractionKind

_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def patient_reference(reference: str) -> str | None:
    """``Patient/1`` from ``Patient/1``, ``Patient/1/_history/2`` or an absolute URL ending
    in ``/Patient/1``; None for anything else (other types, ``urn:uuid:``, contained)."""
    if len(reference) <= _CACHED_LENGTH:
        return _cached_patient_reference(reference)
    return _patient_reference(reference)


def _patient_reference(reference: str) -> str | None:
    if not reference or reference.startswith(("#", "urn:")):
        return None
    match = _PATIENT_REF.search(reference.split("?", 1)[0])
    return f"Patient/{match.group(1)}" if match else None


_CACHED_LENGTH = 200
"""References up to this length are remembered (a search answer names the same few
patients in entry after entry); a longer one, which a client may make as long as it
likes, is not."""
_cached_patient_reference = functools.lru_cache(maxsize=4096)(_patient_reference)


def _add(out: dict[str, None], refs: Iterable[str | None]) -> None:
    # A dict keeps first-seen order and finds duplicates in constant time: a search
    # answer can name 10,000 patients.
    for ref in refs:
        if ref is not None:
            out.setdefault(ref)


def _walk(value: Any, path: tuple[str, ...]) -> Iterable[Any]:
    if len(path) == 1:  # most compartment paths: no lists to build
        child = value.get(path[0]) if isinstance(value, dict) else None
        if child is None:
            return ()
        return child if isinstance(child, list) else (child,)
    values = [value]
    for step in path:
        following: list[Any] = []
        for item in values:
            if isinstance(item, dict):
                child = item.get(step)
                if isinstance(child, list):
                    following.extend(child)
                elif child is not None:
                    following.append(child)
        values = following
    return values


def patients_in_resource(resource: object) -> tuple[str, ...]:
    """Patients that put ``resource`` in the Patient compartment, in first-seen order. A
    Patient is its own patient; a Bundle is read entry by entry. Anything but a mapping
    names no patient (``object``, not ``Mapping | None``: compiled, a narrower type is
    checked where it is narrowed, and odd input would raise)."""
    out: dict[str, None] = {}
    if not isinstance(resource, dict) and isinstance(resource, Mapping):
        resource = dict(resource)  # parsed JSON is dicts; the walk checks for dict, fast
    _collect(resource, out, depth=0)
    return tuple(out)


def _collect(resource: Any, out: dict[str, None], depth: int) -> None:
    if not isinstance(resource, dict) or depth > 2:
        return
    rtype = resource.get("resourceType")
    if rtype == "Bundle":
        for entry in resource.get("entry") or ():
            if isinstance(entry, dict):
                _collect(entry.get("resource"), out, depth + 1)
        return
    if rtype == "Patient":
        rid = resource.get("id")
        if isinstance(rid, str) and _ID.fullmatch(rid):
            _add(out, [f"Patient/{rid}"])
    for path in PATIENT_PATHS.get(str(rtype), ()):
        for value in _walk(resource, path):
            if isinstance(value, dict):
                ref = value.get("reference")
                if isinstance(ref, str) and (patient := patient_reference(ref)) is not None:
                    out.setdefault(patient)


def patients_of_request(interaction: Interaction) -> tuple[str, ...]:
    """Patients evident from the URL and search parameters alone. Chained parameters
    (``patient.name``) and identifier forms are queries, not patients."""
    out: dict[str, None] = {}
    rtype = interaction.resource_type
    if rtype == "Patient" and interaction.resource_id and interaction.compartment is None:
        _add(out, [f"Patient/{interaction.resource_id}"])
    if interaction.compartment and interaction.compartment[0] == "Patient":
        _add(out, [f"Patient/{interaction.compartment[1]}"])
    if not interaction.search:
        return tuple(out)
    linking = set(PATIENT_PARAMS.get(rtype or "", ())) | {"patient", "subject"}
    for name, value in interaction.search:
        base, _, modifier = name.partition(":")
        if "." in base or modifier not in ("", "Patient"):
            continue
        if rtype == "Patient" and base == "_id":
            _add(out, (f"Patient/{v}" for v in value.split(",") if _ID.fullmatch(v)))
        elif base in linking:
            for item in value.split(","):
                bare = base == "patient" or modifier == "Patient"
                if "/" not in item and bare and _ID.fullmatch(item):
                    _add(out, [f"Patient/{item}"])
                else:
                    _add(out, [patient_reference(item)])
    return tuple(out)


def patients_of_location(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Patients named by ``Location`` / ``Content-Location`` (a created or updated Patient)."""
    out: dict[str, None] = {}
    for name in ("location", "content-location"):
        value = headers.get(name)
        if value:
            _add(out, [patient_reference(value)])
    return tuple(out)


_BODY_KINDS = frozenset({InteractionKind.CREATE, InteractionKind.UPDATE, InteractionKind.OPERATION})


def patients_of_exchange(
    interaction: Interaction,
    request_resource: Mapping[str, Any] | None,
    response_resource: Mapping[str, Any] | None,
    response_headers: Mapping[str, str],
) -> tuple[str, ...]:
    """Every patient of an exchange: URL and parameters, the request body (creates,
    updates, operations), the response body (reads, search results, written resources)
    and ``Location`` headers. Deduplicated, in first-seen order."""
    out = dict.fromkeys(patients_of_request(interaction))
    if interaction.kind in _BODY_KINDS:
        _add(out, patients_in_resource(request_resource))
    if (
        response_resource is not None
        and response_resource.get("resourceType") != "OperationOutcome"
    ):
        _add(out, patients_in_resource(response_resource))
    _add(out, patients_of_location(response_headers))
    return tuple(out)
