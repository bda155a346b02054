"""``log keygen`` and ``log vkey``, and the signing key as configuration: owner-only, never
over an existing file, refused with one line when it is not a key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.log.note import Signer, Verifier


def test_keygen_writes_an_owner_only_key_and_prints_its_verifier_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "log.key"
    assert main(["log", "keygen", "--name", "audit.example.org/ward3", "--out", str(key)]) == 0
    vkey = capsys.readouterr().out.strip()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    signer = Signer.parse(key.read_text())
    assert Verifier.parse(vkey) == signer.verifier
    assert vkey.startswith("audit.example.org/ward3+")

    assert main(["log", "keygen", "--name", "x", "--out", str(key)]) == 1, "never overwrites"
    assert "cannot create" in capsys.readouterr().err
    assert Signer.parse(key.read_text()).text() == signer.text()

    config = tmp_path / "config.yaml"
    config.write_text(f"store: {{path: {tmp_path / 'audit.db'}}}\nlog: {{key_file: {key}}}\n")
    assert main(["log", "vkey", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == vkey


def test_a_key_file_that_is_no_key_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "log.key"
    key.write_text("not a key\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"store: {{path: {tmp_path / 'audit.db'}}}\nlog: {{key_file: {key}}}\n")
    assert main(["check-config", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"log.key_file: {key} is not a signing key" in err
    assert "fhir-audit-proxy log keygen" in err
    config.write_text("log: {origin: 'has space'}\n")
    assert main(["check-config", "-c", str(config)]) == 2
    assert "log.origin" in capsys.readouterr().err
