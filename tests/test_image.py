"""The image as the Dockerfile defines it: pinned base, non-root, signal handling, and
defaults that cannot expose the admin API (what `docker run IMAGE` gets with no config)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
        for ln in lines[last_from:]
    ]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in final_stage():
        if instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_base_is_pinned_by_digest() -> None:
    (arg,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", arg)
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def test_runs_as_a_numeric_non_root_user_under_tini() -> None:
    stage = dict(final_stage())
    user = stage["USER"].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user)
    assert stage["ENTRYPOINT"] == '["tini", "--", "fhir-audit-proxy"]'
    assert stage["CMD"] == '["run"]'


def test_defaults_keep_the_admin_api_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FHIR_AUDIT_")]:
        monkeypatch.delenv(key)
    for key, value in image_env().items():
        monkeypatch.setenv(key, value)
    settings = load_settings(None)
    assert settings.admin.host == "127.0.0.1"
    assert settings.admin.tokens == ()
    assert str(settings.store.path).startswith("/var/lib/fhir-audit-proxy/")
    exposed = [rest for instruction, rest in final_stage() if instruction == "EXPOSE"]
    assert exposed == [str(settings.listen.port)]
    assert str(settings.admin.port) not in " ".join(exposed)


def test_no_bytecode_is_written_on_a_read_only_root() -> None:
    assert image_env()["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "/var/lib/fhir-audit-proxy" in dict(final_stage())["VOLUME"]
