"""Validation of built events with fhir.resources: R4 through the R4B models (R4 and R4B
AuditEvent have the same elements), R5 through the default models. Used in tests and,
sampled, off the request path: an invalid event is still stored and forwarded."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def validate_event(event: dict[str, Any], fhir_version: str) -> str | None:
    """None when ``event`` is a valid AuditEvent of ``fhir_version``, else the errors."""
    model: Any
    if fhir_version == "R5":
        from fhir.resources.auditevent import AuditEvent as model
    else:
        from fhir.resources.R4B.auditevent import AuditEvent as model
    try:
        model.model_validate(event)
    except ValidationError as exc:
        return str(exc)[:4000]
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"[:4000]
    return None
