"""OAuth2 client credentials (RFC 6749 §4.4) for the audit repository: a token fetched
from the IdP, cached until shortly before it expires, refreshed once on a 401. The secret
and the token never reach a log line or an exception text."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import aiohttp
from pydantic import Field, SecretStr, field_serializer, field_validator, model_validator

from proxy.settings_base import Frozen, optional_http_url, redact_url

log = logging.getLogger(__name__)


class OAuth2Settings(Frozen):
    """OAuth2 client credentials for the repository (Keycloak or any compliant IdP)."""

    type: Literal["none", "oauth2_client_credentials"] = "none"
    token_url: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    """A file holding the secret (a Kubernetes Secret mount); read at start-up."""
    scope: str | None = None
    refresh_margin_s: float = Field(default=30.0, ge=0)

    _token_url_is_http = field_validator("token_url")(optional_http_url)

    @field_serializer("token_url")
    def _token_url_masked(self, value: str | None) -> str | None:
        return None if value is None else redact_url(value)

    @model_validator(mode="after")
    def _complete_for_its_type(self) -> OAuth2Settings:
        if self.type != "oauth2_client_credentials":
            return self
        missing = [name for name in ("token_url", "client_id") if getattr(self, name) is None]
        if self.client_secret is None and self.client_secret_file is None:
            missing.append("client_secret or client_secret_file")
        if missing:
            raise ValueError(f"type oauth2_client_credentials also needs {', '.join(missing)}")
        return self

    def secret(self) -> str | None:
        """The client secret, from the file when one is configured."""
        if self.client_secret_file is not None:
            return self.client_secret_file.read_text().strip()
        return self.client_secret.get_secret_value() if self.client_secret else None


class TokenError(Exception):
    """No token could be had (the IdP refused or is unreachable); delivery backs off."""


class TokenProvider:
    """Bearer tokens for the repository, one fetch at a time."""

    def __init__(self, settings: OAuth2Settings, session: aiohttp.ClientSession) -> None:
        if not settings.token_url or not settings.client_id:
            raise ValueError("oauth2_client_credentials needs token_url and client_id")
        self._settings = settings
        self._session = session
        secret = settings.secret() or ""
        # RFC 6749 §2.3.1: form-encode id and secret, then HTTP Basic. Built once; the
        # header is the only place the secret lives after start-up.
        pair = f"{quote(settings.client_id, safe='')}:{quote(secret, safe='')}"
        self._basic = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0
        """Tokens fetched so far (for tests and metrics)."""

    def invalidate(self) -> None:
        """Forget the cached token (the repository answered 401)."""
        self._token = None

    async def token(self) -> str:
        """A valid access token, from the cache when it has one."""
        async with self._lock:
            if self._token is not None and time.monotonic() < self._expires_at:
                return self._token
            return await self._fetch()

    async def _fetch(self) -> str:
        s = self._settings
        assert s.token_url is not None and s.client_id is not None
        form = {"grant_type": "client_credentials"}
        if s.scope:
            form["scope"] = s.scope
        try:
            async with self._session.post(
                s.token_url,
                data=form,
                headers={"Accept": "application/json", "Authorization": self._basic},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                if resp.status != 200:
                    raise TokenError(f"token endpoint answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenError(f"token endpoint unreachable: {type(exc).__name__}") from None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise TokenError("token endpoint gave no access_token")
        expires_in = body.get("expires_in", 300)
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
        self._token = token
        self._expires_at = time.monotonic() + max(lifetime - s.refresh_margin_s, 1.0)
        self.fetches += 1
        log.info("repository access token obtained (valid %.0f s)", lifetime)
        return token
