"""Settings: every value `run` would refuse is refused at load, with one line that says
where (file:line or environment variable), what and what to do; secrets never appear in
the effective configuration."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from proxy.delivery.http import HttpRepository
from proxy.settings import (
    ConfigError,
    Settings,
    check_startup,
    load_settings,
    redact_url,
)


def _error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, **overrides)
    return str(caught.value)


@pytest.mark.parametrize(
    "url", ["not a url", "ftp://fhir.example.org/fhir", "/fhir", "http://", "fhir.example.org"]
)
def test_upstream_url_must_be_absolute_http(url: str) -> None:
    message = _error(upstream={"url": url})
    assert message.startswith("upstream.url: must be an absolute http:// or https:// URL")
    assert repr(url) in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8081/fhir", "https://fhir.example.org"])
def test_http_urls_are_accepted(url: str) -> None:
    assert load_settings(None, upstream={"url": url}).upstream.url == url


def test_repository_url_follows_its_mode() -> None:
    assert "for a file use mode: file" in _error(repository={"url": "./events.ndjson"})
    assert "mode file takes a file path" in _error(
        repository={"url": "https://audit.example.org/fhir", "mode": "file"}
    )
    assert load_settings(None, repository={"url": "./e.ndjson", "mode": "file"}).repository.url


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"listen": {"port": 70000}}, "listen.port: must be a TCP port from 1 to 65535, or 0"),
        ({"admin": {"port": -1}}, "admin.port: must be a TCP port from 1 to 65535"),
        ({"admin": {"host": " "}}, "admin.host: must name an address to listen on"),
        ({"repository": {"mode": "bulk"}}, "repository.mode: Input should be 'bundle'"),
        ({"repository": {"batch_count": 0}}, "repository.batch_count: Input should be greater"),
        ({"upstream": {"timeout_s": 0}}, "upstream.timeout_s: Input should be greater than 0"),
        ({"store": {"max_bytes": 0}}, "store.max_bytes: Input should be greater than 0"),
        ({"audit": {"fhir_version": "R3"}}, "audit.fhir_version: Input should be 'R4' or 'R5'"),
        ({"audit": {"validate_sample_rate": 2}}, "audit.validate_sample_rate: must be a share"),
        ({"audit": {"trusted_proxies": ["intranet"]}}, "'intranet' is not a network"),
        ({"audit": {"identity": {"jwks_url": "keys.json"}}}, "audit.identity.jwks_url: must be"),
        ({"log_level": "LOUD"}, "log_level: Input should be 'DEBUG'"),
        (
            {"listen": {"port": 9000}},
            "listen.port and admin.port are both 9000; give the admin listener its own port",
        ),
        (
            {"repository": {"auth": {"type": "oauth2_client_credentials"}}},
            "also needs token_url, client_id, client_secret or client_secret_file",
        ),
    ],
)
def test_invalid_values_are_refused_in_one_line(overrides: dict[str, Any], expected: str) -> None:
    message = _error(**overrides)
    assert expected in message
    assert "\n" not in message


def test_a_rule_across_sections_names_its_settings_first() -> None:
    assert _error(admin={"port": 8080}) == (
        "listen.port and admin.port are both 8080; give the admin listener its own port"
    )


def test_a_store_written_by_a_newer_proxy_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "audit.db"
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError, match=r"schema version 99, newer than this proxy knows"):
        check_startup(load_settings(None, store={"path": store}))


def test_listeners_on_different_hosts_may_share_a_port() -> None:
    settings = load_settings(
        None, listen={"host": "127.0.0.1", "port": 9000}, admin={"host": "127.0.0.2"}
    )
    assert settings.listen.port == settings.admin.port


def test_log_level_is_case_insensitive() -> None:
    assert load_settings(None, log_level="debug").log_level == "DEBUG"


def test_yaml_errors_name_file_line_and_a_close_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen:\n  port: 8080\nupstream:\n  urll: http://x/fhir\n  timeout_s: x\n")
    lines = _load_error(config).splitlines()
    assert f"{config}:4: upstream.urll: unknown setting; did you mean 'url'?" in lines
    assert f"{config}:5: upstream.timeout_s: Input should be a valid number," in lines[0]
    assert len(lines) == 2


def test_unknown_key_far_from_any_name_lists_the_known_ones(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("store:\n  zzz: 1\n")
    assert "store.zzz: unknown setting; known here: commit_batch_max, max_bytes" in _load_error(
        config
    )


def test_bad_yaml_names_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen:\n  port: [8080\nupstream: {}\n")
    message = _load_error(config)
    assert message.startswith(f"{config}:3:")
    assert "not valid YAML" in message


def test_configuration_must_be_a_mapping(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("- listen\n")
    assert "must be a mapping of settings" in _load_error(config)


def test_an_environment_variable_is_named_when_it_is_the_culprit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FHIR_AUDIT_UPSTREAM__URL", "upstream.local")
    assert _error().startswith("environment FHIR_AUDIT_UPSTREAM__URL: upstream.url: must be")


def _load_error(config: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    return str(caught.value)


def test_unusable_paths_are_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"because .*blocker is a file, not a directory"):
        check_startup(load_settings(None, store={"path": blocker / "audit.db"}))
    with pytest.raises(ConfigError, match=r"store.path: .* is a directory"):
        check_startup(load_settings(None, store={"path": tmp_path}))
    with pytest.raises(ConfigError, match=r"repository.url: .* is a directory"):
        check_startup(
            load_settings(
                None,
                store={"path": tmp_path / "a.db"},
                repository={"url": str(tmp_path), "mode": "file"},
            )
        )
    missing = tmp_path / "secret"
    auth = {
        "type": "oauth2_client_credentials",
        "token_url": "https://idp/token",
        "client_id": "proxy",
        "client_secret_file": missing,
    }
    with pytest.raises(ConfigError, match=r"client_secret_file: .*secret is not a readable file"):
        check_startup(
            load_settings(None, store={"path": tmp_path / "a.db"}, repository={"auth": auth})
        )
    check_startup(load_settings(None, store={"path": tmp_path / "new" / "dir" / "audit.db"}))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@audit.example.org/fhir", "https://**********@audit.example.org/fhir"),
        ("https://tokenonly@h:8443/x?y=1", "https://**********@h:8443/x?y=1"),
        ("https://audit.example.org/fhir", "https://audit.example.org/fhir"),
        ("./events.ndjson", "./events.ndjson"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_effective_configuration_masks_every_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("file-secret-123\n")
    settings = load_settings(
        None,
        upstream={"url": "http://up-user:up-pass-1@127.0.0.1:8081/fhir"},
        repository={
            "url": "https://repo-user:repo-pass-1@audit.example.org/fhir",
            "request_headers": {
                "authorization": "Basic cmVwbzpwdw==",
                "Proxy-Authorization": "Bearer proxy-auth-1",
                "Cookie": "session=cookie-1",
                "X-Api-Key": "api-key-1",
                "X-Custom-Token": "custom-1",
                "X-Tenant": "ward-7",
            },
            "secret_headers": ["x-custom-token"],
            "auth": {
                "type": "oauth2_client_credentials",
                "token_url": "https://idp-user:idp-pass-1@idp.example.org/token",
                "client_id": "proxy",
                "client_secret": "client-secret-1",
                "client_secret_file": secret_file,
            },
        },
        admin={"tokens": ["admin-token-1"]},
        audit={"identity": {"jwks_url": "https://jwks-user:jwks-pass-1@idp.example.org/jwks"}},
        telemetry={"otlp_endpoint": "https://otlp-user:otlp-pass-1@otel.example.org"},
    )
    secrets = {
        "up-pass-1",
        "repo-pass-1",
        "cmVwbzpwdw==",
        "proxy-auth-1",
        "session=cookie-1",
        "api-key-1",
        "custom-1",
        "idp-pass-1",
        "client-secret-1",
        "file-secret-123",
        "admin-token-1",
        "jwks-pass-1",
        "otlp-pass-1",
    }
    dumped = orjson.dumps(settings.model_dump(mode="json")).decode()
    assert [s for s in secrets if s in dumped] == []
    assert "ward-7" in dumped, "headers that are not credentials stay readable"
    assert secrets <= settings.secret_values(), "everything masked in logs is known"
    assert "repo-user" not in settings.secret_values(), "a user name is not masked everywhere"
    assert isinstance(settings.repository, HttpRepository)
    assert settings.repository.request_headers["X-Api-Key"] == "api-key-1", "code sees values"


@pytest.mark.parametrize(
    ("repository", "secret_setting", "inline_setting"),
    [
        (
            {"mode": "jetstream", "url": "nats://nats-user:nats-pass-1@nats:4222"},
            "token_file",
            "token",
        ),
        (
            {"mode": "kafka", "url": "kafka://kafka:9092", "security_protocol": "SASL_PLAINTEXT"},
            "sasl_password_file",
            "sasl_password",
        ),
    ],
)
def test_a_stream_modes_secrets_inline_and_in_files_are_masked(
    tmp_path: Path, repository: dict[str, Any], secret_setting: str, inline_setting: str
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-7\n")
    settings = load_settings(
        None,
        repository={**repository, secret_setting: secret_file, inline_setting: "inline-secret-7"},
    )
    secrets = {"file-secret-7", "inline-secret-7"}
    if "@" in repository["url"]:
        secrets.add("nats-pass-1")
    assert secrets <= settings.secret_values(), "the inline secret and the file's are masked"
    dumped = orjson.dumps(settings.model_dump(mode="json")).decode()
    assert [s for s in secrets if s in dumped] == []
    secret_file.unlink()
    assert "file-secret-7" not in settings.secret_values(), "an unreadable file adds nothing"
    assert "inline-secret-7" in settings.secret_values()


def test_secret_header_names_are_case_insensitive() -> None:
    repo = HttpRepository(secret_headers=("X-Custom",))
    assert repo.is_secret_header("x-custom")
    assert repo.is_secret_header("AUTHORIZATION")
    assert not repo.is_secret_header("X-Tenant")


def test_defaults_are_valid_and_hold_no_secret() -> None:
    assert Settings().secret_values() == set()
    assert isinstance(load_settings(None, admin={"tokens": ["abcd"]}).admin.tokens[0], SecretStr)
