"""Building exchanges for event tests: a request as the forward handler would see it,
classified and with its caller read from the headers, plus the answer it got."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import orjson

from proxy.audit.balp import AuditContext, build_events
from proxy.audit.identity import JwksKeys, identity_from_headers
from proxy.exchange import Exchange
from proxy.fhir.interaction import classify
from proxy.settings import IdentitySettings, Settings, load_settings

CLIENT_IP = "2001:0db8:85a3:0000:0000:8a2e:0370:7334"
BASE_URL = "http://server.example.com/fhir"
STARTED = datetime(2020, 4, 29, 9, 49, tzinfo=UTC)
NOW = STARTED + timedelta(milliseconds=30)


def unsigned_jwt(claims: Mapping[str, Any]) -> str:
    """A JWT whose signature nobody checks (no JWKS configured)."""
    return jwt.encode(dict(claims), "not-the-idp-key-but-long-enough-for-hs256", "HS256")


def exchange(
    method: str,
    path: str,
    *,
    query: str = "",
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    status: int | None = 200,
    response: Any = None,
    response_headers: Mapping[str, str] | None = None,
    error: str | None = None,
    request_id: str | None = None,
    client: str = CLIENT_IP,
    base_url: str = BASE_URL,
    identity: IdentitySettings | None = None,
    keys: JwksKeys | None = None,
) -> Exchange:
    """An exchange after the upstream answered (or failed with ``error``). ``body`` and
    ``response`` may be bytes or JSON-able values."""
    request_headers = {k.lower(): v for k, v in (headers or {}).items()}
    raw_body = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
    if raw_body is not None and "content-type" not in request_headers:
        request_headers["content-type"] = "application/fhir+json"
    raw_response = (
        response if response is None or isinstance(response, bytes) else orjson.dumps(response)
    )
    ex = Exchange(
        request_id=request_id or str(uuid.uuid4()),
        method=method,
        path=path,
        query_string=query,
        request_headers=request_headers,
        client_address=client,
        started_at=STARTED,
        base_url=base_url,
        request_body=raw_body,
        request_content_type=request_headers.get("content-type", ""),
        status=status,
        response_headers={k.lower(): v for k, v in (response_headers or {}).items()},
        response_body=raw_response,
        error=error,
        finished_at=NOW,
    )
    ex.interaction = classify(method, path, query, request_headers, raw_body)
    ex.identity = identity_from_headers(request_headers, identity or IdentitySettings(), keys)
    return ex


def context(**audit: Any) -> AuditContext:
    """The audit context of settings with ``audit`` overrides (nested dicts merge)."""
    settings: Settings = load_settings(None, audit=audit) if audit else Settings()
    return AuditContext.from_settings(settings)


def events_of(ex: Exchange, ctx: AuditContext | None = None) -> list[dict[str, Any]]:
    return build_events(ex, ctx or AuditContext.default(), NOW)


def codes(concept: Mapping[str, Any] | None) -> set[str]:
    """The codes of a CodeableConcept or of a single Coding."""
    if not concept:
        return set()
    if "coding" in concept:
        return {c["code"] for c in concept["coding"]}
    return {concept["code"]}


def profile_of(event: Mapping[str, Any]) -> str | None:
    profiles = (event.get("meta") or {}).get("profile") or []
    assert len(profiles) <= 1, profiles
    return profiles[0].rsplit(".", 1)[-1] if profiles else None


def patients_of(event: Mapping[str, Any]) -> list[str]:
    return [
        e["what"]["reference"]
        for e in event["entity"]
        if "1" in codes(e.get("role")) and "1" in codes(e.get("type"))
    ]
