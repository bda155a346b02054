"""OAuth2 client credentials against a real (small) identity provider on loopback: the token
is fetched with the client's credentials, cached until shortly before expiry, refreshed
once on a 401, and neither the secret nor the token reaches a log line or an error."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from proxy.delivery.http import FhirRepositorySink, HttpRepository
from proxy.delivery.oauth import OAuth2Settings, TokenProvider
from proxy.delivery.sink import RepositoryUnavailable, Sink
from tests.factories import ScriptedRepository, audit_event, serving

SECRET = "client-secret-that-must-never-be-logged"


@dataclass
class IdentityProvider:
    url: str = ""
    issued: list[str] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    expires_in: int = 300
    refuse: bool = False

    async def token(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"proxy:{SECRET}".encode()).decode()
        if self.refuse or request.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        self.forms.append(dict(await request.post()))  # type: ignore[arg-type]
        token = f"access-{len(self.issued) + 1}"
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        )


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    provider = IdentityProvider()
    path = "/realms/audit/protocol/openid-connect/token"
    async with serving(("POST", path, provider.token)) as server:
        provider.url = str(server.make_url(path))
        yield provider


def _protected(repo: ScriptedRepository, idp: IdentityProvider) -> None:
    """The repository accepts only the newest token the IdP issued (older ones revoked)."""

    async def check(request: web.Request, raw: bytes) -> web.Response | None:
        if not idp.issued or request.headers.get("Authorization") != f"Bearer {idp.issued[-1]}":
            return web.json_response({"resourceType": "OperationOutcome"}, status=401)
        return None

    repo.behaviour = check


def _open(settings: HttpRepository, session: aiohttp.ClientSession) -> Sink:
    """The sink ``open_sink`` makes, on the test's session."""
    return FhirRepositorySink(settings, session, TokenProvider(settings.auth, session))


def _settings(repo: ScriptedRepository, idp: IdentityProvider, **auth: Any) -> HttpRepository:
    return HttpRepository(
        url=repo.url,
        auth=OAuth2Settings(
            type="oauth2_client_credentials",
            token_url=idp.url,
            client_id="proxy",
            scope="system/AuditEvent.c",
            **({"client_secret": SecretStr(SECRET)} | auth),
        ),
    )


async def test_token_is_fetched_once_and_reused(
    scripted_repository: ScriptedRepository,
    idp: IdentityProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    _protected(scripted_repository, idp)
    async with aiohttp.ClientSession() as session:
        sink = _open(_settings(scripted_repository, idp), session)
        for i in range(3):
            await sink.send([audit_event(i)])
    assert idp.issued == ["access-1"]
    assert idp.forms == [{"grant_type": "client_credentials", "scope": "system/AuditEvent.c"}]
    assert [r["status"] for r in scripted_repository.requests] == [200, 200, 200]
    assert SECRET not in caplog.text and "access-1" not in caplog.text


async def test_a_401_refreshes_the_token_once(
    scripted_repository: ScriptedRepository, idp: IdentityProvider
) -> None:
    _protected(scripted_repository, idp)
    async with aiohttp.ClientSession() as session:
        sink = _open(_settings(scripted_repository, idp), session)
        await sink.send([audit_event(1)])
        idp.issued.append("issued-elsewhere")  # the IdP revoked ours: the repository says 401
        await sink.send([audit_event(2)])
    assert [r["status"] for r in scripted_repository.requests] == [200, 401, 200]
    assert idp.issued[-1] == "access-3"


async def test_a_repository_that_keeps_refusing_is_unavailable_not_a_loop(
    scripted_repository: ScriptedRepository, idp: IdentityProvider
) -> None:
    async def always_401(request: web.Request, raw: bytes) -> web.Response:
        return web.json_response({"resourceType": "OperationOutcome"}, status=401)

    scripted_repository.behaviour = always_401
    async with aiohttp.ClientSession() as session:
        sink = _open(_settings(scripted_repository, idp), session)
        with pytest.raises(RepositoryUnavailable, match="refused the refreshed token"):
            await sink.send([audit_event(1)])
    assert len(scripted_repository.requests) == 2
    assert len(idp.issued) == 2


async def test_token_is_refreshed_shortly_before_it_expires(
    scripted_repository: ScriptedRepository, idp: IdentityProvider
) -> None:
    _protected(scripted_repository, idp)
    idp.expires_in = 31  # with a 30 s margin: reused for 1 s, then fetched anew
    async with aiohttp.ClientSession() as session:
        sink = _open(_settings(scripted_repository, idp, refresh_margin_s=30), session)
        await sink.send([audit_event(1)])
        await sink.send([audit_event(2)])
        await asyncio.sleep(1.1)
        await sink.send([audit_event(3)])
    assert idp.issued == ["access-1", "access-2"]
    assert [r["status"] for r in scripted_repository.requests] == [200, 200, 200]


async def test_secret_from_a_file_as_a_kubernetes_secret_mount(
    scripted_repository: ScriptedRepository, idp: IdentityProvider, tmp_path: Path
) -> None:
    _protected(scripted_repository, idp)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(SECRET + "\n")
    settings = _settings(
        scripted_repository, idp, client_secret=None, client_secret_file=secret_file
    )
    async with aiohttp.ClientSession() as session:
        await _open(settings, session).send([audit_event(1)])
    assert idp.issued == ["access-1"]


async def test_idp_refusal_is_unavailable_and_says_nothing_secret(
    scripted_repository: ScriptedRepository,
    idp: IdentityProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    idp.refuse = True
    async with aiohttp.ClientSession() as session:
        sink = _open(_settings(scripted_repository, idp), session)
        assert isinstance(sink, FhirRepositorySink)
        with pytest.raises(RepositoryUnavailable) as info:
            await sink.send([audit_event(1)])
    assert "HTTP 401" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in caplog.text
    assert scripted_repository.requests == [], "nothing is sent without a token"


async def test_unreachable_idp_is_unavailable(scripted_repository: ScriptedRepository) -> None:
    settings = OAuth2Settings(
        type="oauth2_client_credentials",
        token_url="http://127.0.0.1:9/token",
        client_id="proxy",
        client_secret=SecretStr(SECRET),
    )
    async with aiohttp.ClientSession() as session:
        provider = TokenProvider(settings, session)
        sink = FhirRepositorySink(HttpRepository(url=scripted_repository.url), session, provider)
        with pytest.raises(RepositoryUnavailable, match="token endpoint unreachable"):
            await sink.send([audit_event(1)])
    assert provider.fetches == 0
