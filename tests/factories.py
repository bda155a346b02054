"""Helpers shared by test modules (tests never import from each other's modules): a proxy
as a real process, free loopback ports, and an identity provider's signing keys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ProxyProcess:
    """``python -m proxy run`` with a config file, started and killed at will."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.path = workdir / "config.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = workdir / "proxy.log"
        self.process: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{config['listen']['port']}/fhir"
        self.admin = f"http://127.0.0.1:{config['admin']['port']}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "-c",
                str(self.path),
                "run",
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{self.admin}/healthz") as r:
                    if r.status == 200:
                        return
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"proxy did not start:\n{self.log.read_text()[-3000:]}")

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)

    async def stop(self) -> None:
        """SIGTERM: a graceful shutdown; SIGKILL if it takes too long."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                await self.kill()


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """A JWT as a client sends it, unsigned: the proxy reads its claims (no JWKS set)."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@dataclass(frozen=True)
class SigningKey:
    """An RS256 key pair as an identity provider holds it."""

    private: rsa.RSAPrivateKey
    jwk: dict[str, Any]
    """The public key as a JWK (with ``kid``)."""

    @classmethod
    def generate(cls, kid: str = "k1") -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        return cls(key, jwk | {"kid": kid, "alg": "RS256", "use": "sig"})

    def token(self, claims: dict[str, Any]) -> str:
        """A signed JWT valid for five minutes with ``claims``."""
        now = int(time.time())
        body = {"iat": now, "exp": now + 300} | claims
        return jwt.encode(body, self.private, algorithm="RS256", headers={"kid": self.jwk["kid"]})
