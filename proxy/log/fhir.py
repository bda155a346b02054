"""Checkpoints as a FHIR repository holds them: a ``DocumentReference`` per signed note.

Why a DocumentReference: a repository must hold the checkpoints and let an auditor find
them. ``Binary`` holds bytes but is searchable by nothing but its id. ``Provenance`` has a
``signature``, but it must name its ``target`` resources (a checkpoint covers every event
before it) and FHIR defines that signature as one over those resources, which a
checkpoint's is not. A DocumentReference holds any document as an attachment (the note
itself, ``text/plain; charset=utf-8``, byte for byte) and is searchable by ``type``,
``identifier`` and ``date`` on every FHIR server (R4 and R5 alike for the elements used
here): ``DocumentReference?type=urn:fhir-audit-proxy:document|tlog-checkpoint&_sort=-date``.

Its ``identifier`` is ``<origin>/<size>`` under :data:`IDENTIFIER_SYSTEM`; its id a UUID
made from the note itself, so that a redelivery overwrites the same resource and a
different checkpoint of the same size (a rewritten store) never overwrites the first.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from proxy.log.checkpoint import Checkpoint

DOCUMENT_TYPE = {
    "system": "urn:fhir-audit-proxy:document",
    "code": "tlog-checkpoint",
    "display": "signed checkpoint of the audit trail's Merkle log (C2SP tlog-checkpoint)",
}
IDENTIFIER_SYSTEM = "urn:fhir-audit-proxy:log-checkpoint"
CONTENT_TYPE = "text/plain; charset=utf-8"
_ID_NAMESPACE = uuid.UUID("5d3b8c0e-6a7f-4f39-9a55-0f8a9a2b7c11")


def checkpoint_document(note: str, checkpoint: Checkpoint, now: datetime) -> dict[str, Any]:
    """The DocumentReference that carries a signed checkpoint."""
    data = note.encode()
    return {
        "resourceType": "DocumentReference",
        "id": str(uuid.uuid5(_ID_NAMESPACE, note)),
        "identifier": [
            {"system": IDENTIFIER_SYSTEM, "value": f"{checkpoint.origin}/{checkpoint.size}"}
        ],
        "status": "current",
        "type": {"coding": [DOCUMENT_TYPE]},
        "date": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "description": f"checkpoint of {checkpoint.origin} at {checkpoint.size} events",
        "content": [
            {
                "attachment": {
                    "contentType": CONTENT_TYPE,
                    "data": base64.b64encode(data).decode(),
                    "size": len(data),
                    "title": f"{checkpoint.origin} {checkpoint.size}",
                }
            }
        ],
    }


def is_checkpoint_document(resource: dict[str, Any]) -> bool:
    if resource.get("resourceType") != "DocumentReference":
        return False
    codings = (resource.get("type") or {}).get("coding") or ()
    return any(
        c.get("system") == DOCUMENT_TYPE["system"] and c.get("code") == DOCUMENT_TYPE["code"]
        for c in codings
        if isinstance(c, dict)
    )


def notes_in(resources: Iterable[dict[str, Any]]) -> list[str]:
    """The signed notes of the checkpoint DocumentReferences among ``resources``."""
    notes = []
    for resource in resources:
        if not is_checkpoint_document(resource):
            continue
        for content in resource.get("content") or ():
            attachment = content.get("attachment") or {}
            if isinstance(attachment.get("data"), str):
                notes.append(base64.b64decode(attachment["data"]).decode("utf-8", "replace"))
    return notes
