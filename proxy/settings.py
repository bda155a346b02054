"""The whole configuration tree.

Read from a YAML file (``--config`` or ``FHIR_AUDIT_CONFIG``) with environment overrides
(``FHIR_AUDIT_`` prefix, ``__`` between levels: ``FHIR_AUDIT_REPOSITORY__URL=...``). Names
follow Aidbox's audit settings where the two overlap. Every model is frozen: settings are
read once at start-up and passed down, never mutated.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV = "FHIR_AUDIT_CONFIG"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenSettings(_Frozen):
    """Where the proxy accepts FHIR traffic."""

    host: str = "0.0.0.0"
    port: int = 8080


class UpstreamSettings(_Frozen):
    """The FHIR server behind the proxy."""

    url: str = "http://127.0.0.1:8081/fhir"
    """Base URL of the FHIR server; the proxy serves the same path prefix."""
    timeout_s: float = 60.0
    """Total time allowed for one upstream exchange; past it the client gets 504."""
    connect_timeout_s: float = 5.0
    max_connections: int = 100
    """Size of the keep-alive connection pool to the upstream."""


class ObserverSettings(_Frozen):
    """Who records the events (``AuditEvent.source``)."""

    display: str = "fhir-audit-proxy"
    reference: str = "Device/fhir-audit-proxy"
    site: str | None = None
    """``source.site``: e.g. the deployment or cluster name."""
    type_code: str = "4"
    """``security-source-type`` code: 4 Application Server (the proxy records for the server)."""


class IdentitySettings(_Frozen):
    """How the user and client agents are read from the bearer token."""

    user_claim: str = "sub"
    name_claim: str = "name"
    client_claims: tuple[str, ...] = ("client_id", "azp")
    issuer_claim: str = "iss"
    jti_claim: str = "jti"
    purpose_of_use_claim: str = "purpose_of_use"
    fhir_user_claim: str = "fhirUser"
    token_pattern: Literal["opaque", "minimal", "comprehensive"] = "comprehensive"
    """BALP OAuth pattern: opaque keeps a keyed hash of the token, minimal the ``jti``,
    comprehensive adds issuer, client, name, role and purpose of use."""
    jwks_url: str | None = None
    """When set, signatures are verified; events say whether a token was verified."""
    jwks_cache_s: int = 300
    audience: str | None = None


class AuditSettings(_Frozen):
    """How events are built."""

    fhir_version: Literal["R4", "R5"] = "R4"
    observer: ObserverSettings = ObserverSettings()
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    """Networks whose ``X-Forwarded-For`` is believed for the client address."""
    identity: IdentitySettings = IdentitySettings()
    buffer_limit_bytes: int = 8 * 1024 * 1024
    """Responses larger than this stream through and are audited from their head."""
    capture_bodies: bool = False
    read_before_delete: bool = True
    """Before a DELETE of one resource that can belong to a patient (an Observation, not a
    Patient), read it from the FHIR server with the caller's own headers, so the event
    names its patient (BALP PatientDelete). Servers answer a delete without the resource;
    without this read the event names no patient. Costs one GET per such DELETE."""
    validate_sample_rate: float = 0.0
    """Share of events validated with fhir.resources off the request path (0 disables)."""
    redact_params: tuple[str, ...] = ()
    """Query and form parameters whose values are never recorded, in addition to the
    credential parameters always redacted (``access_token``, ``id_token``,
    ``refresh_token``, ``code``, ``client_secret``, ``password``, ``api_key``)."""
    token_hash_key: SecretStr | None = None
    """Key of the HMAC-SHA256 an opaque bearer token is recorded as. Unset: a random key
    kept beside the store (``<store>.token-key``). Set the same key on every proxy whose
    events must give one token one hash."""
    forward_outside_base: tuple[str, ...] = ()
    """Paths outside the FHIR base that are still forwarded (and audited), each a prefix
    matched on whole segments (``/.well-known`` allows ``/.well-known/smart-configuration``).
    Every other path outside the base is refused with 404, audited."""
    max_patient_events: int = Field(default=100, ge=1)
    """Most per-patient events one interaction makes. An interaction concerning more
    patients is recorded as one event of the basic profile listing up to
    ``max_patients_listed`` of them and saying how many were left out."""
    max_patients_listed: int = Field(default=1000, ge=1)
    """Most patient entities in the one event recorded beyond ``max_patient_events``."""

    @field_validator("trusted_proxies")
    @classmethod
    def _networks_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value


class StoreSettings(_Frozen):
    """The durable local write-ahead queue."""

    path: Path = Path("./data/audit.db")
    max_bytes: int = 1024 * 1024 * 1024
    """Cap on the store's files on disk (database, WAL and shared-memory index together);
    when reached, or when the disk itself is full, requests fail closed with 507 and
    ``/readyz`` says not ready until room returns."""
    retention_days: float = 30.0
    """Delivered events are kept this long, then pruned."""
    commit_batch_max: int = 512
    """Most events one group commit may take."""


class OAuth2Settings(_Frozen):
    """OAuth2 client credentials for the repository (Keycloak or any compliant IdP)."""

    type: Literal["none", "oauth2_client_credentials"] = "none"
    token_url: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    """A file holding the secret (a Kubernetes Secret mount); read at start-up."""
    scope: str | None = None
    refresh_margin_s: float = 30.0

    def secret(self) -> str | None:
        """The client secret, from the file when one is configured."""
        if self.client_secret_file is not None:
            return self.client_secret_file.read_text().strip()
        return self.client_secret.get_secret_value() if self.client_secret else None


class RepositorySettings(_Frozen):
    """Where the flusher ships events."""

    url: str | None = None
    """FHIR base URL (bundle, single, transaction modes) or a file path (file mode).
    None keeps events local."""
    mode: Literal["bundle", "single", "transaction", "file"] = "bundle"
    flush_interval_ms: int = 1000
    max_flush_interval_ms: int = 60000
    batch_count: int = 100
    timeout_s: float = 30.0
    request_headers: dict[str, str] = Field(default_factory=dict)
    auth: OAuth2Settings = OAuth2Settings()


class AdminSettings(_Frozen):
    """The admin listener: audit-log API, viewer, health and metrics."""

    host: str = "127.0.0.1"
    port: int = 9000
    tokens: tuple[SecretStr, ...] = ()
    """Bearer tokens accepted by the admin API; empty means no authentication (loopback use)."""


class TelemetrySettings(_Frozen):
    service_name: str = "fhir-audit-proxy"
    otlp_endpoint: str | None = None
    prometheus: bool = True


class Settings(BaseSettings):
    """The root of the configuration."""

    model_config = SettingsConfigDict(
        env_prefix="FHIR_AUDIT_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    listen: ListenSettings = ListenSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    audit: AuditSettings = AuditSettings()
    store: StoreSettings = StoreSettings()
    repository: RepositorySettings = RepositorySettings()
    admin: AdminSettings = AdminSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings: ``overrides`` first, then the environment, then the YAML file at
    ``path`` (or ``$FHIR_AUDIT_CONFIG``), then the defaults."""
    path = path if path is not None else os.environ.get(CONFIG_ENV)
    if not path:
        return Settings(**overrides)
    if not Path(path).is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    with_file = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": str(path)}}
    )
    settings: Settings = with_file(**overrides)
    return settings
