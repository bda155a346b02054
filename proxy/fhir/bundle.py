"""Batch and transaction Bundles: one classified entry per request entry, matched to the
response entry at the same position (FHIR R4 requires the response to keep the order).
Pure; tolerant of any shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.fhir.interaction import Interaction, InteractionKind, classify
from proxy.fhir.patients import patient_reference, patients_of_exchange


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """One entry of a batch or transaction, with what the server answered for it."""

    index: int
    """Position in the request bundle."""
    interaction: Interaction
    """Classified from ``request.method`` / ``request.url`` (and ``ifNoneExist``)."""
    request_resource: Mapping[str, Any] | None
    response_resource: Mapping[str, Any] | None
    status: int | None
    """From ``response.status`` (``"201 Created"`` gives 201); None when unknown."""
    location: str | None
    """``response.location``."""
    outcome: Mapping[str, Any] | None
    """``response.outcome`` (an OperationOutcome), if any."""
    patients: tuple[str, ...] = ()
    """The entry's patients, ``urn:uuid:`` references resolved through the response."""


def _status(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        head = value.strip().split(" ", 1)[0]
        return int(head) if head.isdigit() else None
    return None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _entries(bundle: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    raw = bundle.get("entry") if bundle is not None else None
    return [e if isinstance(e, Mapping) else {} for e in raw] if isinstance(raw, list) else []


def bundle_entries(
    request_bundle: Mapping[str, Any] | None, response_bundle: Mapping[str, Any] | None
) -> tuple[BundleEntry, ...]:
    """One :class:`BundleEntry` per request entry. A missing or short response leaves
    ``status`` None. References to ``urn:uuid:`` fullUrls (transactions) are resolved to
    the ``Location`` the server gave the entry that had that fullUrl."""
    requests = _entries(request_bundle)
    responses = _entries(response_bundle)
    # fullUrl -> the Patient it became, for urn:uuid references between entries
    resolved: dict[str, str] = {}
    for i, entry in enumerate(requests):
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and i < len(responses):
            answer: Mapping[str, Any] = _mapping(responses[i].get("response")) or {}
            ref = patient_reference(str(answer.get("location") or ""))
            if ref:
                resolved[full_url] = ref

    out: list[BundleEntry] = []
    for i, entry in enumerate(requests):
        request = _mapping(entry.get("request")) or {}
        method = str(request.get("method") or "GET").upper()
        url = str(request.get("url") or "")
        path, _, query = url.partition("?")
        headers = {}
        if request.get("ifNoneExist"):
            headers["if-none-exist"] = str(request["ifNoneExist"])
        interaction = classify(method, path, query, headers, None)
        if not url:
            interaction = Interaction(
                kind=InteractionKind.UNKNOWN, method=method, detail="entry without request.url"
            )
        resource = _mapping(entry.get("resource"))
        reply: Mapping[str, Any] = responses[i] if i < len(responses) else {}
        response = _mapping(reply.get("response")) or {}
        location_header = response.get("location")
        response_resource = _mapping(reply.get("resource"))
        headers_out = {"location": str(location_header)} if location_header else {}
        patients = list(patients_of_exchange(interaction, resource, response_resource, headers_out))
        for ref in _urn_references(resource):
            if ref in resolved and resolved[ref] not in patients:
                patients.append(resolved[ref])
        out.append(
            BundleEntry(
                index=i,
                interaction=interaction,
                request_resource=resource,
                response_resource=response_resource,
                status=_status(response.get("status")),
                location=str(location_header) if location_header else None,
                outcome=_mapping(response.get("outcome")),
                patients=tuple(patients),
            )
        )
    return tuple(out)


def _urn_references(resource: Any) -> list[str]:
    """Every ``urn:uuid:`` reference in a resource (any depth)."""
    found: list[str] = []
    stack = [resource]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            ref = item.get("reference")
            if isinstance(ref, str) and ref.startswith("urn:"):
                found.append(ref)
            stack.extend(v for v in item.values() if isinstance(v, (Mapping, list)))
        elif isinstance(item, list):
            stack.extend(item)
    return found
