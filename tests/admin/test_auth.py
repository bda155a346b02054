"""Admin access control: each route group without a token, with a wrong one, with a JWT of
the wrong scope and with a JWKS-signed JWT of the right scope; token files; the refusal to
expose an unauthenticated admin listener; and the audit of who read the audit trail."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.admin.access import is_admin_access
from proxy.admin.app import ROUTES, build_admin_app
from proxy.admin.auth import AdminExposed, RouteGroup
from proxy.settings import AdminSettings, ConfigError, load_settings
from proxy.store.queue import AuditQueue
from tests.factories import (
    FhirDouble,
    RunningProxy,
    SigningKey,
    StartProxy,
    free_port,
    guide_event,
    run_until_exit,
    serving,
)

STATIC = "static-admin-token-for-tests"
AUDIENCE = "fhir-audit-admin"
ISSUER = "https://idp.example.org/realms/audit"


@dataclass
class Secured:
    proxy: RunningProxy
    idp: SigningKey
    forger: SigningKey
    """Same ``kid``, another key: its tokens must be refused."""

    def jwt(self, scope: str, sub: str = "auditor-1", key: SigningKey | None = None) -> str:
        return (key or self.idp).token(self.claims(scope, sub))

    @staticmethod
    def claims(scope: str, sub: str = "auditor-1") -> dict[str, Any]:
        return {"sub": sub, "scope": scope, "name": "Ada Auditor", "aud": AUDIENCE, "iss": ISSUER}


@pytest.fixture
async def secured(
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> AsyncIterator[Secured]:
    """A proxy whose admin listener takes a static token, a token file and JWTs from a
    loopback JWKS server, with one proxied read in its store."""
    idp, forger = SigningKey.generate("k1"), SigningKey.generate("k1")

    async def certs(request: web.Request) -> web.Response:
        return web.json_response({"keys": [idp.jwk]})

    token_file = tmp_path / "viewer.txt"
    token_file.write_text("\nfile-token-for-tests\n")
    async with serving(("GET", "/certs", certs)) as jwks:
        proxy = await start_proxy(
            fhir_double,
            admin={
                "tokens": [STATIC],
                "token_files": [str(token_file)],
                "jwks_url": str(jwks.make_url("/certs")),
                "audience": AUDIENCE,
                "issuer": ISSUER,
            },
        )
        async with http.get(f"{proxy.url}/metadata") as r:
            assert r.status == 200
        yield Secured(proxy, idp, forger)


EVENT = guide_event()
GROUPS: dict[str, tuple[str, str, str, int]] = {
    "read": ("GET", "/fhir/AuditEvent", "audit.read", 200),
    "write": ("POST", "/fhir/AuditEvent", "audit.write", 201),
    "admin": ("GET", "/dlq", "audit.admin", 200),
}


async def status_of(
    http: aiohttp.ClientSession, method: str, url: str, token: str | None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = orjson.dumps(EVENT) if method == "POST" else None
    headers["Content-Type"] = "application/fhir+json"
    async with http.request(method, url, headers=headers, data=body) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


@pytest.mark.parametrize("group", sorted(GROUPS))
async def test_each_route_group_needs_its_credential(
    secured: Secured, http: aiohttp.ClientSession, group: str
) -> None:
    method, path, scope, ok = GROUPS[group]
    url = f"{secured.proxy.admin_url}{path}"
    other_scope = "audit.read" if scope != "audit.read" else "audit.write"
    refused = {
        "no token": None,
        "wrong static token": "not-the-token",
        "forged JWT": secured.jwt(scope, key=secured.forger),
    }
    for why, token in refused.items():
        status, headers, body = await status_of(http, method, url, token)
        assert status == 401, why
        assert headers["WWW-Authenticate"].startswith("Bearer"), why
        assert body["resourceType"] == "OperationOutcome", why
        assert STATIC not in str(body)
    status, headers, body = await status_of(http, method, url, secured.jwt(other_scope))
    assert status == 403
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert scope in body["issue"][0]["diagnostics"]
    for token in (secured.jwt(f"openid {scope}"), STATIC, "file-token-for-tests"):
        status, _, body = await status_of(http, method, url, token)
        assert status == ok, body


async def test_a_jwt_playing_on_the_algorithm_is_a_401_with_no_traceback(
    secured: Secured, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Forgeries that name another algorithm than the key's are refused as any bad
    token is: 401 with an OperationOutcome, nothing logged at ERROR (they used to be a
    plain 500 with a traceback)."""
    caplog.set_level(logging.DEBUG)
    url = f"{secured.proxy.admin_url}/fhir/AuditEvent"
    for name, token in secured.idp.confused_tokens(Secured.claims("audit.read")).items():
        status, headers, body = await status_of(http, "GET", url, token)
        assert status == 401, name
        assert body["resourceType"] == "OperationOutcome", name
        assert "algorithm not allowed" in body["issue"][0]["diagnostics"], name
        assert headers["WWW-Authenticate"].startswith("Bearer"), name
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [e for e in await secured.proxy.stored_events() if is_admin_access(e)] == []


async def test_an_admin_jwt_needs_exp_the_audience_and_the_issuer(
    secured: Secured, http: aiohttp.ClientSession
) -> None:
    url = f"{secured.proxy.admin_url}/fhir/AuditEvent"
    kid = {"kid": secured.idp.jwk["kid"]}
    claims = Secured.claims("audit.read")
    refused = {
        "no exp": (jwt.encode(claims, secured.idp.private, "RS256", headers=kid), "no exp claim"),
        "another audience": (secured.idp.token(claims | {"aud": "billing"}), "wrong audience"),
        "no audience": (
            secured.idp.token({k: v for k, v in claims.items() if k != "aud"}),
            "no aud claim",
        ),
        "another issuer": (secured.idp.token(claims | {"iss": "https://evil"}), "wrong issuer"),
    }
    for why, (token, reason) in refused.items():
        status, _, body = await status_of(http, "GET", url, token)
        assert status == 401, why
        assert reason in body["issue"][0]["diagnostics"], why
    status, _, _ = await status_of(http, "GET", url, secured.idp.token(claims))
    assert status == 200


def test_a_jwks_without_an_audience_is_refused_unless_any_audience_is_chosen(
    tmp_path: Path,
) -> None:
    jwks = "https://idp.example.org/certs"
    with pytest.raises(ConfigError, match=r"admin\.jwks_url needs admin\.audience"):
        load_settings(None, admin={"jwks_url": jwks})
    chosen = load_settings(None, admin={"jwks_url": jwks, "any_audience": True})
    assert chosen.admin.audience is None
    assert load_settings(None, admin={"jwks_url": jwks, "audience": "a"}).admin.audience == "a"


async def test_probes_stay_open_behind_authentication(
    secured: Secured, http: aiohttp.ClientSession
) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(f"{secured.proxy.admin_url}{path}") as r:
            assert r.status == 200, path
    async with http.get(f"{secured.proxy.admin_url}/no-such-thing") as r:
        assert r.status == 401, "an unknown path tells a stranger nothing"
    for path, kind in (("/ui/", "text/html"), ("/ui/viewer.js", "text/javascript")):
        async with http.get(f"{secured.proxy.admin_url}{path}") as r:
            assert r.status == 200 and r.content_type == kind, "the page holds no data"
    async with http.get(f"{secured.proxy.admin_url}/ui/auth.py") as r:
        assert r.status == 404, "only the viewer's own files"
    async with http.get(f"{secured.proxy.admin_url}/api/queue") as r:
        assert r.status == 401
    headers = {"Authorization": f"Bearer {secured.jwt('audit.read')}"}
    async with http.get(f"{secured.proxy.admin_url}/api/queue", headers=headers) as r:
        strip = await r.json()
    assert strip["pending"] == 1 and strip["dead"] == 0
    assert 0 <= strip["oldestPendingAgeS"] < 600


async def test_reading_the_trail_is_audited_with_the_admin_user(
    secured: Secured, http: aiohttp.ClientSession
) -> None:
    admin = secured.proxy.admin_url
    token = secured.jwt("audit.read", sub="auditor-7")
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{admin}/fhir/AuditEvent?_count=5", headers=headers) as r:
        assert r.status == 200
        first_page = await r.json(content_type=None)
    read_id = first_page["entry"][0]["resource"]["id"]
    async with http.get(f"{admin}/fhir/AuditEvent/{read_id}", headers=headers) as r:
        assert r.status == 200
    async with http.get(f"{admin}/audit-log", headers={"Authorization": f"Bearer {STATIC}"}) as r:
        assert r.status == 200
    events = await secured.proxy.stored_events()
    access = [e for e in events if is_admin_access(e)]
    assert [e["subtype"][0]["code"] for e in access] == ["search-type", "read", "search-type"]
    users = [next(a for a in e["agent"] if a["requestor"])["who"] for e in access]
    assert users[0]["identifier"]["value"] == "auditor-7"
    assert users[0]["display"] == "Ada Auditor"
    assert users[2]["identifier"]["value"] == "token:1", "a static token is named, not kept"
    assert access[0]["action"] == "E" and access[1]["action"] == "R"
    assert any(
        en.get("what", {}).get("reference") == f"AuditEvent/{read_id}" for en in access[1]["entity"]
    )
    assert all(STATIC not in str(e) and token not in str(e) for e in events)


async def test_live_polling_does_not_feed_itself(
    secured: Secured, http: aiohttp.ClientSession
) -> None:
    """A poll that finds only the access event of the previous look is not recorded, so
    the viewer's live mode settles instead of producing an event per poll."""
    admin = secured.proxy.admin_url
    headers = {"Authorization": f"Bearer {STATIC}"}

    async def access_events() -> list[dict[str, Any]]:
        return [e for e in await secured.proxy.stored_events() if is_admin_access(e)]

    async with http.get(f"{admin}/fhir/AuditEvent", headers=headers) as r:
        assert r.status == 200
    (first,) = await access_events()
    since = quote(first["recorded"])
    for _ in range(3):  # the viewer's poll: everything since the newest event it shows
        async with http.get(f"{admin}/fhir/AuditEvent?date=ge{since}", headers=headers) as r:
            assert r.status == 200
            assert [e["resource"]["id"] for e in (await r.json())["entry"]] == [first["id"]]
    for path in ("/healthz", "/metrics", "/readyz"):
        async with http.get(f"{admin}{path}") as r:
            assert r.status == 200
    assert await access_events() == [first]


async def test_non_loopback_admin_without_auth_refuses_to_start(
    tmp_path: Path, queue: AuditQueue
) -> None:
    with pytest.raises(AdminExposed, match="refusing to start"):
        build_admin_app(queue, AdminSettings(host="0.0.0.0"), writer=queue)
    build_admin_app(queue, AdminSettings(host="0.0.0.0", tokens=["t"]), writer=queue)
    build_admin_app(queue, AdminSettings(host="::1"), writer=queue)
    config = tmp_path / "exposed.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": free_port()},
                "upstream": {"url": "http://127.0.0.1:9/fhir"},
                "admin": {"host": "0.0.0.0", "port": free_port()},
                "store": {"path": str(tmp_path / "audit.db")},
                "log_level": "ERROR",
            }
        )
    )
    status, err = await run_until_exit(config)
    assert status == 2, "a configuration error, as check-config reports it"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "admin listener on '0.0.0.0' is not loopback and has no authentication" in lines[0]


SCOPE_OF = {
    RouteGroup.READ: "audit.read",
    RouteGroup.WRITE: "audit.write",
    RouteGroup.ADMIN: "audit.admin",
}


def requests_for_routes(
    event_id: str,
) -> dict[tuple[str, str], tuple[RouteGroup, str, bytes | None]]:
    """The policy, written out apart from ``ROUTES``: for each guarded admin route (method,
    pattern), the group whose scope it needs, and a request (path, body) that does the
    route's work when the scope is right."""
    bundle = orjson.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": EVENT}]}
    )
    read, write, admin = RouteGroup.READ, RouteGroup.WRITE, RouteGroup.ADMIN
    return {
        ("GET", "/api/queue"): (read, "/api/queue", None),
        ("GET", "/fhir/metadata"): (read, "/fhir/metadata", None),
        ("GET", "/fhir/AuditEvent"): (read, "/fhir/AuditEvent", None),
        ("GET", "/fhir/AuditEvent/{id}"): (read, f"/fhir/AuditEvent/{event_id}", None),
        ("GET", "/audit-log"): (read, "/audit-log", None),
        ("GET", "/api/reports/patient-access"): (
            read,
            "/api/reports/patient-access?patient=Patient/p1",
            None,
        ),
        ("GET", "/api/reports/patient-access/events"): (
            read,
            "/api/reports/patient-access/events?patient=Patient/p1",
            None,
        ),
        ("GET", "/api/reports/user-activity"): (read, "/api/reports/user-activity?user=u", None),
        ("GET", "/api/reports/user-activity/events"): (
            read,
            "/api/reports/user-activity/events?user=u",
            None,
        ),
        ("GET", "/api/activity"): (read, "/api/activity", None),
        ("GET", "/api/export.csv"): (read, "/api/export.csv", None),
        ("GET", "/audit-log/event/{id}"): (read, f"/audit-log/event/{event_id}", None),
        ("POST", "/fhir/AuditEvent"): (write, "/fhir/AuditEvent", orjson.dumps(EVENT)),
        ("POST", "/fhir"): (write, "/fhir", bundle),
        ("POST", "/fhir/"): (write, "/fhir/", bundle),
        ("GET", "/dlq"): (admin, "/dlq", None),
        ("POST", "/dlq/retry"): (admin, "/dlq/retry", b"{}"),
        # The log's entry bundles are the events; its hashes and checkpoints are open.
        ("GET", "/log/{shard}/tile/entries/{path:.+}"): (
            read,
            "/log/0/tile/entries/000.p/1",
            None,
        ),
    }


async def test_every_route_refuses_a_token_of_each_other_scope_group_and_does_nothing(
    secured: Secured, http: aiohttp.ClientSession
) -> None:
    """Every guarded route of ``ROUTES``, with a JWT carrying only the scope of each other
    group: 403 ``insufficient_scope`` and no effect (no event read and recorded, none
    ingested, no dead letter requeued). With its own scope each then does its work."""
    proxy = secured.proxy
    (dead,) = await proxy.queue.claim(1, datetime.now(UTC))
    await proxy.queue.dead_letter([dead.seq], "422 Unprocessable: test")
    policy = requests_for_routes(dead.event_id)
    guarded = {(m, p) for m, p, _, g in ROUTES if g is not RouteGroup.OPEN}
    assert guarded == set(policy), "the policy of every guarded route is written out here"

    async def call(method: str, path: str, body: bytes | None, scope: str) -> tuple[int, str]:
        headers = {
            "Authorization": f"Bearer {secured.jwt(scope)}",
            "Content-Type": "application/fhir+json",
        }
        async with http.request(
            method, f"{proxy.admin_url}{path}", headers=headers, data=body
        ) as r:
            await r.read()
            return r.status, r.headers.get("WWW-Authenticate", "")

    async def state() -> tuple[list[str], int, int]:
        stats = await proxy.queue.stats()
        return [e["id"] for e in await proxy.stored_events()], stats.dead, stats.pending

    before = await state()
    for (method, pattern), (group, path, body) in policy.items():
        for other, scope in SCOPE_OF.items():
            if other is group:
                continue
            status, challenge = await call(method, path, body, scope)
            assert status == 403, (method, pattern, scope)
            assert 'error="insufficient_scope"' in challenge, (method, pattern, scope)
    assert await state() == before, "a refused request changes nothing"
    assert before[1] == 1
    for (method, pattern), (group, path, body) in policy.items():
        status, _ = await call(method, path, body, SCOPE_OF[group])
        assert status < 300, (method, pattern, status)
    assert (await proxy.queue.stats()).dead == 0, "the right scope retried the dead letter"
