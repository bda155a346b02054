"""No credential in the trail, the logs or any response: each kind of secret sent by every
channel through a real proxy to the real FHIR server, then looked for everywhere the proxy
writes: the store (decoded through the queue API and as raw files), the captured logs,
the audit repository and the responses."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from yarl import URL

from proxy import telemetry
from proxy.http.listener import parser_error_reason
from tests.factories import (
    FhirDouble,
    NodeFhirServer,
    RecordingRepository,
    StartProxy,
    raw_body,
    raw_http,
    raw_status,
    request_id_of,
)

JWT = jwt.encode(
    {"sub": "u-sec", "name": "Ann", "jti": "jti-sec-1", "client_id": "app"},
    "jwt-signing-key-that-is-long-enough-for-hs256",
    "HS256",
)
JWT_SIGNATURE = JWT.rsplit(".", 1)[1]
OPAQUE_SHORT = "OPQSHORT12345"
OPAQUE_LONG = "opaque-long-" + "Zq7" * 30
BASIC_PASSWORD = "basic-pass-9Xw"
SECRETS = {
    "query access_token": "qry-access-tok-1A",
    "query id_token": "qry-id-tok-2B",
    "query client_secret": "qry-client-sec-4D",
    "query password": "qry-password-5E",
    "query api_key": "qry-api-key-6F",
    "query custom": "qry-custom-7G",
    "query token": "qry-token-7P",
    "query apikey": "qry-apikey-7Q",
    "query client_assertion": "qry-client-assertion-7R",
    "query sig": "qry-sig-7S",
    "query access_token[]": "qry-access-tok-list-7T",
    "query access_token%5B%5D": "qry-access-tok-list-7U",
    "form access_token": "form-access-tok-8H",
    "form password": "form-password-9J",
    "operation parameter": "op-client-secret-1P",
    "graphql variable": "gql-access-token-2Q",
    "jwt": JWT,
    "jwt signature": JWT_SIGNATURE,
    "opaque short": OPAQUE_SHORT,
    "opaque long": OPAQUE_LONG,
    "opaque long tail": OPAQUE_LONG[-32:],
    "basic password": BASIC_PASSWORD,
    "cookie": "cookie-session-KL",
    "api key header": "hdr-api-key-MN",
    "jwt with a bad byte": JWT + "x",
}


def _leaks(haystack: bytes) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret.encode() in haystack]


async def _send_every_channel(
    http: aiohttp.ClientSession, base: str, responses: list[bytes]
) -> list[str]:
    """Every request that carries a secret; returns their X-Request-Ids."""
    s = SECRETS
    query = (
        f"name=x&access_token={s['query access_token']}&id_token={s['query id_token']}"
        f"&client_secret={s['query client_secret']}"
        f"&PASSWORD={s['query password']}&api_key={s['query api_key']}"
        f"&session_ref={s['query custom']}&token={s['query token']}"
        f"&apikey={s['query apikey']}&client_assertion={s['query client_assertion']}"
        f"&sig={s['query sig']}&access_token[]={s['query access_token[]']}"
        f"&access_token%5B%5D={s['query access_token%5B%5D']}"
    )
    basic = base64.b64encode(f"ann:{BASIC_PASSWORD}".encode()).decode()
    requests: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("GET", f"Patient?{query}", {}, None),
        (
            "POST",
            "Patient/_search",
            {"Content-Type": "application/x-www-form-urlencoded"},
            f"name=x&access_token={s['form access_token']}&password={s['form password']}".encode(),
        ),
        ("GET", "Patient?name=x", {"Authorization": f"Bearer {JWT}"}, None),
        ("GET", "Patient?name=x", {"Authorization": f"Bearer {OPAQUE_SHORT}"}, None),
        ("GET", "Patient?name=x", {"Authorization": f"Bearer {OPAQUE_LONG}"}, None),
        ("GET", "Patient?name=x", {"Authorization": f"Basic {basic}"}, None),
        ("GET", "Patient?name=x", {"Cookie": f"sid={s['cookie']}"}, None),
        ("GET", "Patient?name=x", {"X-Api-Key": s["api key header"]}, None),
        (
            "POST",
            "Patient",
            {"Authorization": f"Bearer {OPAQUE_SHORT}", "Content-Type": "application/fhir+json"},
            orjson.dumps({"resourceType": "Patient", "active": True}),
        ),
        (
            "POST",
            "Patient/$everything",
            {"Content-Type": "application/fhir+json"},
            orjson.dumps(
                {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "client_secret", "valueString": s["operation parameter"]}
                    ],
                }
            ),
        ),
        (
            "POST",
            "$graphql",
            {"Content-Type": "application/json"},
            orjson.dumps(
                {
                    "query": "{ PatientList(name: \"x\") { id } }",
                    "variables": {"access_token": s["graphql variable"]},
                }
            ),
        ),
    ]
    ids = []
    for n, (method, path, headers, body) in enumerate(requests):
        request_id = f"sec-{n}"
        headers = {**headers, "X-Request-Id": request_id}
        async with http.request(
            method, URL(f"{base}/{path}", encoded=True), headers=headers, data=body
        ) as r:
            responses.append(str(r.headers).encode() + await r.read())
            assert r.status < 500, (method, path, r.status)
        ids.append(request_id)
    return ids


async def test_no_secret_reaches_the_store_the_logs_the_repository_or_a_response(
    fhir_server: NodeFhirServer,
    start_proxy: StartProxy,
    repository: RecordingRepository,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(
        fhir_server.base_url,
        audit={"redact_params": ["session_ref"]},
        repository={"url": repository.url, "flush_interval_ms": 20},
    )
    responses: list[bytes] = []
    ids = await _send_every_channel(http, proxy.url, responses)

    # A JWT with a byte HTTP forbids: aiohttp's parser refuses it before the proxy's
    # handler runs; it used to quote the whole header in its 400 body and ERROR log.
    raw = await raw_http(
        proxy.server.host,
        proxy.server.port,
        b"GET /fhir/Patient HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {JWT}x".encode()
        + b"\x01\r\n\r\n",
    )
    responses.append(raw)
    assert raw_status(raw) == 400
    outcome = orjson.loads(raw_body(raw))
    assert outcome["resourceType"] == "OperationOutcome"
    assert "malformed HTTP request" in outcome["issue"][0]["diagnostics"]

    stored = await proxy.stored_events()
    recorded_ids = {request_id_of(e) for e in stored}
    assert set(ids) <= recorded_ids, "every request is audited"
    malformed = [e for e in stored if "malformed HTTP request" in e.get("outcomeDesc", "")]
    assert len(malformed) == 1 and malformed[0]["outcome"] == "4"
    delivered = await repository.wait_for(len(stored))

    # The redacted forms are recorded, so the query is still legible.
    query_event = next(e for e in stored if request_id_of(e) == "sec-0")
    query_entity = next(e for e in query_event["entity"] if e["role"]["code"] == "24")
    assert "access_token=REDACTED" in query_entity["description"]
    assert b"access_token=REDACTED" in base64.b64decode(query_entity["query"])
    form_event = next(e for e in stored if request_id_of(e) == "sec-1")
    form_query = next(e for e in form_event["entity"] if e["role"]["code"] == "24")
    assert base64.b64decode(form_query["query"]).endswith(
        b"name=x&access_token=REDACTED&password=REDACTED"
    )
    opaque_event = next(e for e in stored if request_id_of(e) == "sec-3")
    user = next(a for a in opaque_event["agent"] if a.get("requestor"))
    assert user["policy"][0].startswith("hmac-sha256:")

    places: dict[str, bytes] = {
        "store (decoded)": orjson.dumps(stored),
        "intents": orjson.dumps([i.summary for i in await proxy.queue.orphan_intents()]),
        "repository": orjson.dumps([r["body"] for r in repository.requests])
        + orjson.dumps(delivered),
        "logs": "\n".join(
            f"{r.getMessage()} {r.exc_text or ''} {r.exc_info or ''}" for r in caplog.records
        ).encode()
        + caplog.text.encode(),
        "responses": b"\n".join(responses),
    }
    store_dir = Path(proxy.settings.store.path).parent
    for path in store_dir.iterdir():
        places[f"file {path.name}"] = path.read_bytes()
    found = {place: _leaks(data) for place, data in places.items() if _leaks(data)}
    assert found == {}, f"secrets found: {found}"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Invalid header value char", "HttpParserError: Invalid header value char"),
        (
            "Invalid header value char:\n\n  b'Authorization: Bearer abc\\x01'\n   ^",
            "HttpParserError: Invalid header value char",
        ),
        ("Invalid HTTP header: 'Authorization: Bearer abc'", "HttpParserError"),
        ("Bearer " + "a" * 90, "HttpParserError"),
        ("", "HttpParserError"),
    ],
)
def test_a_parser_error_is_described_without_the_request_bytes(message: str, expected: str) -> None:
    import httptools

    assert parser_error_reason(httptools.HttpParserError(message)) == expected


# --- finding 5: bytes that are not UTF-8 in a header --------------------------------------


@pytest.mark.parametrize(
    ("method", "header", "why"),
    [
        ("POST", b"X-Request-Id: hj-1\xe9", "not valid UTF-8"),
        ("GET", b"X-Request-Id: hj-1\xe9", "not valid UTF-8"),
        ("POST", b"Accept: application/fhir+json\xe9", "not valid UTF-8"),
        ("GET", b"Host: h\xe9st", "not valid UTF-8"),
        ("GET", b"Authorization: Bearer \xff\xfe", "not valid UTF-8"),
        # found by tests/http/test_header_fuzz.py: the event's base URL could not be parsed
        ("GET", b"Host: [", "Host header"),
        ("GET", b"X-Request-Id: " + b"r" * 201, "X-Request-Id"),
    ],
)
async def test_a_header_that_is_not_utf8_is_refused_with_400_and_audited(
    start_proxy: StartProxy, method: str, header: bytes, why: str
) -> None:
    seen: list[str] = []

    from aiohttp import web

    from tests.factories import serving

    async def upstream(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"resourceType": "Patient", "id": "p1"}, status=201)

    async with serving(("*", "/{tail:.*}", upstream)) as server:
        proxy = await start_proxy(str(server.make_url("/fhir")))
        body = b'{"resourceType":"Patient"}'
        host = b"" if header.startswith(b"Host") else b"Host: x\r\n"
        raw = await raw_http(
            proxy.server.host,
            proxy.server.port,
            f"{method} /fhir/Patient HTTP/1.1\r\n".encode()
            + host
            + header
            + b"\r\nConnection: close\r\nContent-Type: application/fhir+json\r\n"
            + f"Content-Length: {len(body) if method == 'POST' else 0}\r\n\r\n".encode()
            + (body if method == "POST" else b""),
        )
        assert raw_status(raw) == 400, raw
        outcome = orjson.loads(raw_body(raw))
        assert why in outcome["issue"][0]["diagnostics"]
        assert seen == [], "a refused request is never forwarded"
        (event,) = await proxy.stored_events()
        assert event["outcome"] == "4"
        assert why in event["outcomeDesc"]
        assert request_id_of(event) == raw.split(b"X-Request-Id: ")[1].split(b"\r\n")[0].decode()


# --- finding 9: X-Forwarded-For from a trusted proxy ---------------------------------------


def invalid_forwarded_for() -> float:
    """The ``fhir_audit_forwarded_for_invalid_total`` counter's value."""
    value = telemetry.REGISTRY.get_sample_value("fhir_audit_forwarded_for_invalid_total")
    return value or 0.0


async def test_forwarded_for_entries_that_are_not_ip_addresses_are_ignored_and_counted(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fhir_double)  # loopback is a trusted proxy by default
    before = invalid_forwarded_for()
    headers = {"X-Forwarded-For": "203.0.113.9, not-an-ip<script>", "X-Request-Id": "xff-1"}
    async with http.get(f"{proxy.url}/metadata", headers=headers) as r:
        assert r.status == 200
    (event,) = await proxy.stored_events()
    addresses: set[Any] = {a.get("network", {}).get("address") for a in event["agent"]}
    assert "203.0.113.9" in addresses
    assert not any("script" in str(a) for a in addresses)
    assert invalid_forwarded_for() == before + 1
