"""FHIR ``OperationOutcome`` answers the proxy gives itself (audit failures, upstream errors,
bad admin queries)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

FHIR_JSON = "application/fhir+json"


def operation_outcome(code: str, diagnostics: str, *, severity: str = "error") -> dict[str, Any]:
    """An OperationOutcome with one issue (``code`` from the FHIR issue-type value set)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def outcome_response(
    status: int, code: str, diagnostics: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """An aiohttp response carrying an OperationOutcome as ``application/fhir+json``."""
    return web.Response(
        status=status,
        body=orjson.dumps(operation_outcome(code, diagnostics)),
        content_type=FHIR_JSON,
        headers=headers,
    )
