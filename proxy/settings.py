"""The whole configuration tree.

Read from a YAML file (``--config`` or ``FHIR_AUDIT_CONFIG``) with environment overrides
(``FHIR_AUDIT_`` prefix, ``__`` between levels: ``FHIR_AUDIT_REPOSITORY__URL=...``). Names
follow Aidbox's audit settings where the two overlap. Every model is frozen: settings are
read once at start-up and passed down, never mutated.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import sqlite3
from collections.abc import Iterator, Mapping
from datetime import time as dt_time
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from proxy.delivery.http import HttpRepository
from proxy.delivery.modes import REPOSITORY_MODES, RepositorySettings
from proxy.delivery.relay import RelaySettings
from proxy.settings_base import MASK as MASK
from proxy.settings_base import Frozen as _Frozen
from proxy.settings_base import (
    Positive,
    PositiveInt,
    given_secrets,
    readable_file_problem,
    url_secret,
    writable_file_problems,
)
from proxy.settings_base import http_url as _http_url
from proxy.settings_base import optional_http_url as _optional_http_url
from proxy.settings_base import redact_url as redact_url
from proxy.settings_base import tcp_port as _tcp_port

CONFIG_ENV = "FHIR_AUDIT_CONFIG"
ENV_PREFIX = "FHIR_AUDIT_"


class ConfigError(Exception):
    """The configuration cannot be used. ``str()`` is one line per problem, each saying
    what is wrong, where (file and line, environment variable or setting) and what to do."""


def _host_not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must name an address to listen on, such as 127.0.0.1 or 0.0.0.0")
    return value


class ListenSettings(_Frozen):
    """Where the proxy accepts FHIR traffic."""

    host: str = "0.0.0.0"
    port: int = 8080
    public_url: str | None = None
    """The proxy's FHIR base as clients reach it (``https://fhir.example.org/fhir``): what
    an upstream ``Location`` or ``Content-Location`` is rewritten to. Unset: the address
    the client connected to. Never the request's ``Host`` header, which the client writes."""
    header_timeout_s: Positive = 20.0
    """Time a request head may take to arrive whole, from its first byte; past it the
    client gets 408 and the connection closes (not audited: no request was identified)."""
    body_timeout_s: Positive = 60.0
    """Time a request body may go without a byte while the proxy waits for it; past it
    the client gets 408 (audited) and the connection closes."""

    _port_in_range = field_validator("port")(_tcp_port)
    _host_given = field_validator("host")(_host_not_empty)
    _public_url_is_http = field_validator("public_url")(_optional_http_url)


class UpstreamSettings(_Frozen):
    """The FHIR server behind the proxy."""

    url: str = "http://127.0.0.1:8081/fhir"
    """Base URL of the FHIR server; the proxy serves the same path prefix."""
    timeout_s: Positive = 60.0
    """Total time allowed for one upstream exchange; past it the client gets 504."""
    connect_timeout_s: Positive = 5.0
    max_connections: PositiveInt = 100
    """Size of the keep-alive connection pool to the upstream."""
    keepalive_s: Positive = 4.0
    """How long a connection to the upstream may stay idle and still be reused: below the
    server's own keep-alive timeout (Node 5 s, Jetty/HAPI 30 s, nginx 75 s), so that it
    never closes a connection as a request is sent on it. Raise it for a server behind TLS
    that keeps connections longer: each new connection is a handshake."""

    _url_is_http = field_validator("url")(_http_url)

    @field_serializer("url")
    def _url_masked(self, value: str) -> str:
        return redact_url(value)


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
    jwks_cache_s: int = Field(default=300, ge=0)
    audience: str | None = None
    """The ``aud`` a verified token must carry (not checked when None)."""
    issuer: str | None = None
    """The ``iss`` a verified token must carry (not checked when None)."""

    _jwks_url_is_http = field_validator("jwks_url")(_optional_http_url)

    @field_serializer("jwks_url")
    def _jwks_url_masked(self, value: str | None) -> str | None:
        return None if value is None else redact_url(value)


class AuditSettings(_Frozen):
    """How events are built."""

    fhir_version: Literal["R4", "R5"] = "R4"
    observer: ObserverSettings = ObserverSettings()
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    """Networks whose ``X-Forwarded-For`` is believed for the client address."""
    identity: IdentitySettings = IdentitySettings()
    buffer_limit_bytes: int = 8 * 1024 * 1024
    """Responses larger than this stream through and are audited from their head."""
    buffer_memory_bytes: int = 32 * 1024 * 1024
    """Memory that all answers waiting for their audit may take together; past it (and for
    any answer over 64 KiB) they wait in temporary files."""
    capture_bodies: bool = False
    """Keep each exchange's request and response bodies beside its events (off by default:
    they hold patient data), returned by ``GET /audit-log/event/{id}?includeBody=true``.
    Form bodies are kept with their credential parameters redacted."""
    capture_max_bytes: int = 64 * 1024
    """Bytes kept of each captured body; a longer one is cut and says so at its end."""
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
    ``refresh_token``, ``client_secret``, ``password``, ``api_key``, ``token``,
    ``apikey``, ``client_assertion``, ``sig``); each also in its ``name[]`` forms. Also
    applied to the body of an operation recorded in the query entity (form fields, JSON
    members, ``Parameters`` parameters, GraphQL arguments)."""
    max_query_bytes: int = Field(default=4096, ge=256)
    """Most bytes of the raw request (request line, ``Accept``, ``X-Request-Id``, and the
    body of a form search or of an operation, credentials redacted) kept in a query
    entity. A longer one is cut there, and the entity's description gives its whole length
    and the SHA-256 of all of it as recorded."""
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
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(
                    f"{net!r} is not a network; write an address or a CIDR such as 10.0.0.0/8"
                ) from None
        return value

    @field_validator("buffer_limit_bytes", "buffer_memory_bytes", "capture_max_bytes")
    @classmethod
    def _buffer_limit_positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be a number of bytes greater than 0")
        return value

    @field_validator("validate_sample_rate")
    @classmethod
    def _rate_is_share(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be a share between 0 (off) and 1 (every event)")
        return value


class StoreSettings(_Frozen):
    """The durable local write-ahead queue."""

    path: Path = Path("./data/audit.db")
    max_bytes: PositiveInt = 1024 * 1024 * 1024
    """Cap on the store's files on disk (database, WAL and shared-memory index together);
    when reached, or when the disk itself is full, requests fail closed with 507 and
    ``/readyz`` says not ready until room returns."""
    retention_days: Positive = 30.0
    """Delivered events are kept this long, then pruned."""
    commit_batch_max: PositiveInt = 512
    """Most events one group commit may take."""


class LogSettings(_Frozen):
    """The Merkle log of the stored events (each shard's) and its signed checkpoints."""

    key_file: Path | None = None
    """The checkpoint signing key (``fhir-audit-proxy log keygen`` writes one), a file or a
    mounted Kubernetes Secret; read at start-up. None: the tree grows, nothing is signed."""
    origin: str = "fhir-audit-proxy"
    """The start of each shard's checkpoint origin, ``<origin>/<log id>`` (the log id is
    made with the store). Name the deployment, as a schema-less URL: ``audit.example.org/ward3``."""
    checkpoint_interval_s: Positive = 10.0
    """A checkpoint at most this often while the tree grows..."""
    checkpoint_events: PositiveInt = 1000
    """...or as soon as this many events were added since the last."""
    ship_checkpoints: bool = True
    """Send each checkpoint to the repository (a DocumentReference) once its events left;
    never to a repository that holds audit messages only (``syslog``)."""

    @field_validator("origin")
    @classmethod
    def _origin_is_a_name(cls, value: str) -> str:
        if not value or "+" in value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty, without spaces or '+' (audit.example.org/ward3)")
        return value.rstrip("/")


class AdminScopes(_Frozen):
    """The scope a JWT must carry for each group of admin routes."""

    read: str = "audit.read"
    """Searching and reading the audit trail, the viewer's queue strip."""
    write: str = "audit.write"
    """Ingesting AuditEvents (``POST /fhir/AuditEvent``, ``POST /fhir``)."""
    admin: str = "audit.admin"
    """Dead letters and queue operations."""


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class WorkingHours(_Frozen):
    """When access is expected; access at any other time is flagged ``after-hours``."""

    days: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri")
    start: dt_time = dt_time(7, 0)
    """Local time of day the working day starts (inclusive)."""
    end: dt_time = dt_time(19, 0)
    """Local time of day it ends (exclusive); before ``start``: a night shift into the
    next day; equal to ``start``: round the clock."""
    zone: str = "UTC"
    """The IANA time zone the hours are in (``Europe/Berlin``)."""

    @field_validator("zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not an IANA time zone (such as UTC or Europe/Berlin)"
            ) from None
        return value


class SignalSettings(_Frozen):
    """What the viewer and the reports flag as standing out (``proxy/admin/signals.py``)."""

    patients_per_hour: PositiveInt = 20
    """``many-patients``: a user touched more than this many patients in the hour up to
    an access."""
    working_hours: WorkingHours = WorkingHours()


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class AdminSettings(_Frozen):
    """The admin listener: audit-log API, ingestion, viewer, health and metrics."""

    host: str = "127.0.0.1"
    port: int = 9000
    public_url: str | None = None
    """The admin listener as clients reach it (``https://audit.example.org``): the base of
    the links, ``fullUrl`` and ``Location`` values its answers hold. Unset: the address
    the client connected to. Never the request's ``Host`` header, which the client writes."""
    tokens: tuple[SecretStr, ...] = ()
    """Static bearer tokens accepted for every admin route group."""
    token_files: tuple[Path, ...] = ()
    """Files holding static bearer tokens, one per line (Kubernetes Secret mounts); read at
    start-up. A token from ``viewer.txt`` is recorded as the admin user ``token:viewer.txt``."""
    jwks_url: str | None = None
    """When set, bearer JWTs signed by a key from this JWKS are accepted, each route group
    requiring its scope (``scopes``)."""
    audience: str | None = None
    """The ``aud`` admin JWTs must carry. Required with ``jwks_url`` (the proxy refuses
    to start without it: a token the IdP issued for another API would open this one),
    unless ``any_audience`` says otherwise."""
    any_audience: bool = False
    """With ``jwks_url`` and no ``audience``: accept admin JWTs whatever their ``aud``
    (an explicit choice, for an IdP that issues no audience)."""
    issuer: str | None = None
    """The ``iss`` admin JWTs must carry (not checked when None)."""
    jwks_cache_s: int = 300
    scopes: AdminScopes = AdminScopes()
    max_ingest_bytes: int = 5 * 1024 * 1024
    """Largest request body ``POST /fhir/AuditEvent`` and ``POST /fhir`` accept (413 above)."""
    max_ingest_events: PositiveInt = 1000
    """Most events one ingestion request may carry (413 above)."""
    max_event_parts: PositiveInt = 5000
    """Most agents and entities together in one ingested event (413 above): what its
    validation and indexing cost grows with. The proxy's own largest events list
    ``audit.max_patients_listed`` patients."""
    header_timeout_s: Positive = 20.0
    """Time a request head may take to arrive whole, from its first byte; past it the
    client gets 408 and the connection closes."""
    body_timeout_s: Positive = 60.0
    """Time an ingestion body may go without a byte; past it the client gets 408."""
    signals: SignalSettings = SignalSettings()

    @model_validator(mode="after")
    def _audience_with_jwks(self) -> AdminSettings:
        if self.jwks_url and self.audience is None and not self.any_audience:
            raise ValueError(
                "admin.jwks_url needs admin.audience, the aud your identity provider puts in"
                " tokens for this admin API (or admin.any_audience: true to accept any)"
            )
        return self

    @property
    def authenticates(self) -> bool:
        """Whether any way of authenticating is configured."""
        return bool(self.tokens or self.token_files or self.jwks_url)

    @property
    def on_loopback(self) -> bool:
        """Whether the listener is reachable only from this machine."""
        if self.host.lower() in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name that may resolve anywhere, or "" (every interface)

    def exposure(self) -> str | None:
        """Why this listener must not start (reachable from the network with no
        authentication), or None."""
        if self.on_loopback or self.authenticates:
            return None
        return (
            f"the admin listener on {self.host!r} is not loopback and has no authentication;"
            " set admin.tokens, admin.token_files or admin.jwks_url, or admin.host: 127.0.0.1"
        )

    _port_in_range = field_validator("port")(_tcp_port)
    _host_given = field_validator("host")(_host_not_empty)
    _public_url_is_http = field_validator("public_url")(_optional_http_url)


class TelemetrySettings(_Frozen):
    """Traces, metrics and logs (OpenTelemetry; Prometheus text on the admin ``/metrics``).
    The OpenTelemetry SDK's environment variables override these (``OTEL_SERVICE_NAME``,
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_METRIC_EXPORT_INTERVAL``...):
    :mod:`proxy.telemetry.export`, :mod:`proxy.telemetry.resource`."""

    service_name: str = "fhir-audit-proxy"
    """``service.name`` of the spans and metrics, unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` names one."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector base URL (``http://collector:4318``); traces and metrics are
    exported to ``/v1/traces`` and ``/v1/metrics`` below it, unless an
    ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variable says where. None (and no such variable):
    nothing is exported."""
    prometheus: bool = True
    """Serve the metrics as Prometheus text on the admin ``/metrics``."""
    metric_export_interval_s: float = 15.0
    """How often metrics are pushed over OTLP, unless ``OTEL_METRIC_EXPORT_INTERVAL``
    (milliseconds) says."""
    json_logs: bool = False
    """Log one JSON object per line, with the request id and trace id of the request."""

    _otlp_endpoint_is_http = field_validator("otlp_endpoint")(_optional_http_url)

    @field_serializer("otlp_endpoint")
    def _otlp_endpoint_masked(self, value: str | None) -> str | None:
        return None if value is None else redact_url(value)


class AppProbe(_Frozen):
    """One kubelet probe of an app container that the injector moved to the status
    listener (``/app-health/<container>/<probe>``): what the kubelet would have checked,
    done from inside the pod, straight to the app (never through the proxy, so never
    audited as an access to patient data)."""

    kind: Literal["http", "tcp", "grpc"]
    """``httpGet``, ``tcpSocket`` or ``grpc`` in the pod spec."""
    port: Annotated[int, Field(ge=1, le=65535)]
    """The app's port (a named port already resolved to its number)."""
    path: str = "/"
    """http: the request path (with its query)."""
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"
    """http: HTTPS is not verified, as the kubelet does not verify it."""
    headers: dict[str, str] = {}
    """http: the probe's ``httpHeaders``."""
    service: str = ""
    """grpc: the service name of the health check request ("" is the server)."""
    timeout_s: Positive = 1.0
    """The probe's ``timeoutSeconds``."""


class StatusSettings(_Frozen):
    """The status listener of a sidecar injected into a pod: the app containers' kubelet
    probes (``GET /app-health/<container>/<probe>``, from ``app_probes``) and, with
    ``telemetry.prometheus``, the proxy's ``/metrics`` for Prometheus to scrape from the
    pod. It serves no audit data. Off unless ``port`` is set."""

    host: str = "::"
    """``::`` is every address of both families (IPv4 and IPv6)."""
    port: Annotated[int, Field(ge=0, le=65535)] | None = None
    app_probes: dict[str, AppProbe] = {}
    """By ``<container>/<probe>`` (probe: ``livez``, ``readyz`` or ``startupz``)."""

    _host_given = field_validator("host")(_host_not_empty)


class WebhookSettings(BaseSettings):
    """The sidecar injector (``fhir-audit-proxy webhook``): defaults for the injected
    proxy, each overridable per pod by a ``fhir-audit-proxy/*`` annotation. Read from the
    environment (``FHIR_AUDIT_WEBHOOK_IMAGE=...``), which the Helm chart sets."""

    model_config = SettingsConfigDict(env_prefix="FHIR_AUDIT_WEBHOOK_", frozen=True, extra="forbid")

    image: str = "fhir-audit-proxy:0.1.0"
    """The image of the injected containers (the same image as the webhook)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    proxy_port: int = 15080
    """The injected proxy's listener (far from the ports FHIR servers use)."""
    admin_port: int = 15081
    """The injected proxy's admin listener, bound to loopback (15090 is Envoy's in an
    Istio pod)."""
    status_port: int = 15082
    """The injected proxy's status listener: the app's rewritten probes and ``/metrics``."""
    proxy_uid: int = 10001
    """The UID the proxy runs as; the redirect exempts its connections by this UID."""
    sidecar: Literal["native", "container"] = "native"
    """native: init container with restartPolicy Always (Kubernetes 1.29+)."""
    traffic: Literal["redirect", "takeover"] = "redirect"
    base_path: str = "/fhir"
    fhir_version: Literal["R4", "R5"] = "R4"
    repository_url: str | None = None
    repository_mode: str = "bundle"
    """The injected proxies' ``repository.mode`` (any mode of ``proxy.delivery.modes``)."""
    repository_settings: dict[str, str] = Field(default_factory=dict)
    """More ``repository.*`` settings of the injected proxies, by name (``stream``,
    ``topic``, ``creds_file``...), each set as its ``FHIR_AUDIT_REPOSITORY__*`` variable."""
    repository_secret: str | None = None
    """A Secret (in the pod's namespace) mounted read-only in the injected proxy at
    ``/var/run/secrets/fhir-audit-proxy/repository``, for the files the repository
    settings name (``.creds``, certificates, passwords)."""
    cpu_request: str = "50m"
    memory_request: str = "112Mi"
    cpu_limit: str | None = None
    memory_limit: str | None = "512Mi"
    drain_s: int = 10
    """Grace for in-flight requests and again for the final flush when the pod stops; the
    injector adds both to the pod's ``terminationGracePeriodSeconds``."""
    store_max_bytes: PositiveInt = 1024 * 1024 * 1024
    """``store.max_bytes`` of the injected proxies; their emptyDir's ``sizeLimit`` is
    derived from it (a per-pod annotation overrides it)."""
    required_pod_annotations: frozenset[str] = frozenset(
        {
            "inject",
            "container",
            "upstream-port",
            "base-path",
            "fhir-version",
            "service-name",
            "proxy-port",
            "admin-port",
            "status-port",
            "store-max-bytes",
            "cpu-request",
            "cpu-limit",
            "memory-request",
            "memory-limit",
        }
    )
    """The ``fhir-audit-proxy/*`` annotations a pod may set in a namespace where audit is
    required (``fhir-audit-proxy/injection: required``); any other is denied there. Not by
    default: those that send the audit elsewhere or let the pod reach the store
    (``repository-*``, ``config-map``, ``store-pvc``, ``store-volume``, ``oauth-*``), weaken
    it (``local-only``, ``traffic``) or change the sidecar's kind (``sidecar``)."""
    otlp_endpoint: str | None = None
    """``telemetry.otlp_endpoint`` of the injected proxies."""
    json_logs: bool = True
    """``telemetry.json_logs`` of the injected proxies."""
    fail_closed: bool = True
    """When the webhook itself fails on a pod, reject the pod (an unaudited FHIR server
    never starts) rather than admit it without the proxy."""
    cert_reload_s: float = 5.0
    """How often the serving certificate files are checked for a change."""

    _otlp_endpoint_is_http = field_validator("otlp_endpoint")(_optional_http_url)

    @field_serializer("otlp_endpoint")
    def _otlp_endpoint_masked(self, value: str | None) -> str | None:
        return None if value is None else redact_url(value)

    @field_validator("repository_mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        if value not in REPOSITORY_MODES:
            raise ValueError(f"expected one of {', '.join(REPOSITORY_MODES)}")
        return value


class Settings(BaseSettings):
    """The root of the configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    listen: ListenSettings = ListenSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    audit: AuditSettings = AuditSettings()
    store: StoreSettings = StoreSettings()
    repository: RepositorySettings = HttpRepository()
    """Where the flusher ships events: the settings of the mode ``mode`` names
    (``proxy.delivery.modes``)."""
    admin: AdminSettings = AdminSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    status: StatusSettings = StatusSettings()
    relay: RelaySettings = RelaySettings()
    """What ``fhir-audit-proxy relay`` consumes (it delivers to ``repository``)."""
    log: LogSettings = LogSettings()
    workers: PositiveInt = 1
    """Processes serving the proxy port together (``SO_REUSEPORT``: the kernel spreads
    connections over them). With more than one, each worker has its own store shard
    (``audit.db`` becomes ``audit-0.db``, ``audit-1.db``, ...; see :meth:`store_shards`),
    flusher and intent recovery; worker 0 alone serves the admin listener, which reads
    every shard as one store. Events are delivered in order within a shard; across shards
    only approximately, by time of recording. With 1 (the default) the proxy is one process
    with ``store.path`` as its store."""
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """DEBUG also prints the traceback of a start-up failure."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _listeners_apart(self) -> Settings:
        listen, admin = self.listen, self.admin
        if listen.port and listen.port == admin.port and _hosts_overlap(listen.host, admin.host):
            raise ValueError(
                f"listen.port and admin.port are both {listen.port}; give the admin listener"
                " its own port"
            )
        return self

    def store_shards(self) -> list[Path]:
        """The store file of each worker, by worker index: ``store.path`` itself for one
        worker, else ``audit-<n>.db`` beside it for ``audit.db``."""
        path = self.store.path
        if self.workers == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{n}{path.suffix}") for n in range(self.workers)]

    def secret_values(self) -> set[str]:
        """Every configured secret in clear, for masking wherever text leaves the process
        (logs). Values of credential headers count whole and without their scheme word."""
        found: set[str] = self.repository.secret_values() | self.relay.source.secret_values()
        found.update(t.get_secret_value() for t in self.admin.tokens)
        found |= given_secrets(None, self.log.key_file)
        for url in (
            self.upstream.url,
            self.audit.identity.jwks_url,
            self.telemetry.otlp_endpoint,
        ):
            secret = url_secret(url)
            if secret:
                found.add(secret)
        return {s for s in found if len(s) >= 4}

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


def _hosts_overlap(a: str, b: str) -> bool:
    wildcard = {"", "0.0.0.0", "::"}
    return a == b or a in wildcard or b in wildcard


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings: ``overrides`` first, then the environment, then the YAML file at
    ``path`` (or ``$FHIR_AUDIT_CONFIG``), then the defaults.

    Raises :class:`ConfigError` (one line per problem, with the file and line or the
    environment variable it came from) for a missing or unreadable file, bad YAML, an
    unknown setting or a value that is not allowed."""
    path = path if path is not None else os.environ.get(CONFIG_ENV)
    cls: type[Settings] = Settings
    document: yaml.Node | None = None
    if path:
        document = _read_yaml(Path(path))
        cls = type(
            "Settings",
            (Settings,),
            {"model_config": {**Settings.model_config, "yaml_file": str(path)}},
        )
    try:
        settings: Settings = cls(**overrides)
    except ValidationError as exc:
        lines = [_describe(error, path, document) for error in exc.errors()]
        raise ConfigError("\n".join(lines)) from exc
    return settings


WEBHOOK_ENV_PREFIX = "FHIR_AUDIT_WEBHOOK_"
"""The ``webhook`` command's variables: no settings of the proxy's."""


def _environment_names(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        here = f"{prefix}{name.upper()}"
        yield here
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _environment_names(annotation, here + "__")


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``FHIR_AUDIT_*`` variable in ``environ`` that names no setting
    and is therefore ignored (``FHIR_AUDIT_LISTN__PORT``), with the closest name that
    does. (A variable under a known section with an unknown name is an error of
    :func:`load_settings` instead.)"""
    sections = {name.upper() for name in Settings.model_fields}
    known = sorted(_environment_names(Settings, ENV_PREFIX))
    warnings = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name.startswith(WEBHOOK_ENV_PREFIX):
            continue
        if name == CONFIG_ENV or name.removeprefix(ENV_PREFIX).split("__")[0] in sections:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"environment {variable}: no such setting, ignored{hint}")
    return warnings


def _read_yaml(path: Path) -> yaml.Node | None:
    """The file's node tree (for line numbers), or a ConfigError saying why it is unusable."""
    if not path.exists():
        raise ConfigError(
            f"configuration file {path} does not exist: check -c/--config or ${CONFIG_ENV}"
            " (start from config.example.yaml)"
        )
    if not path.is_file():
        raise ConfigError(
            f"configuration file {path} is not a file: point -c/--config at a YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = ": ".join(filter(None, [exc.context, exc.problem]))
        raise ConfigError(f"{where}: not valid YAML: {problem}; fix the file's syntax") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: the configuration must be a mapping of settings (listen:, upstream:, ...),"
            f" not a {type(data).__name__}"
        )
    return node


def _yaml_line(document: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """The 1-based line of the key at ``loc`` (or of its deepest ancestor found)."""
    node, line = document, None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                node, line = value, key.start_mark.line + 1
                break
        else:
            break
    return line


def _env_name(loc: tuple[str | int, ...]) -> str | None:
    """The environment variable that set ``loc`` (or an ancestor), if any."""
    wanted = {k.upper(): k for k in os.environ}
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(str(p) for p in loc[:depth]).upper()
        if name in wanted:
            return wanted[name]
    return None


def _model_at(loc: tuple[str | int, ...], repository: type[BaseModel]) -> type[BaseModel] | None:
    """The model of the section at ``loc``; ``repository`` is the model of the mode the
    configuration's ``repository.mode`` names."""
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if model is Settings and part == "repository":
            annotation = repository
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _repository_loc(error: Any) -> tuple[tuple[str | int, ...], type[BaseModel]]:
    """The error's location without the mode tag pydantic puts after ``repository``, and
    the model of that mode."""
    loc = tuple(p for p in error["loc"] if p not in ("function-after", "function-before"))
    model: type[BaseModel] = HttpRepository
    if loc[:1] == ("repository",) and len(loc) > 1 and str(loc[1]) in REPOSITORY_MODES:
        model = REPOSITORY_MODES[str(loc[1])]
        loc = loc[:1] + loc[2:]
    return loc, model


_SENSITIVE_PARTS = ("secret", "token", "header", "password")


def _describe(error: Any, path: str | Path | None, document: yaml.Node | None) -> str:
    """One line for one validation error: where, which setting, what is wrong, what to do."""
    loc, repository = _repository_loc(error)
    kind = error["type"]
    if kind == "union_tag_invalid" and loc == ("repository",):
        loc = ("repository", "mode")
        modes = ", ".join(repr(m) for m in REPOSITORY_MODES)
        error = {**error, "msg": f"Input should be {modes}", "input": error["ctx"]["tag"]}
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    env = _env_name(loc)
    line = None if env else _yaml_line(document, loc)
    if env:
        where = f"environment {env}: "
    elif path and line is not None:
        where = f"{path}:{line}: "
    elif path and document is not None and loc:
        where = f"{path}: "
    else:
        where = ""
    if not loc:  # a rule across sections: its message names the settings
        where = where or (f"{path}: " if path else "")
        return f"{where}{str(error['msg']).removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1], repository)
        known = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known here: {', '.join(known)}"
        return f"{where}{dotted}: unknown setting; {hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    shown = ""
    if (
        kind not in ("value_error", "missing")
        and isinstance(value, str | int | float)
        and not any(s in dotted for s in _SENSITIVE_PARTS)
    ):
        shown = f" (got {redact_url(str(value))!r})"
    return f"{where}{dotted}: {message}{shown}"


def check_startup(settings: Settings) -> None:
    """Raise :class:`ConfigError` for what ``run`` would refuse at start-up, one line per
    problem: a path the proxy could not use (the store's: its directory must exist or be
    creatable and the file openable for writing, not a directory; those the repository's
    mode names: its file, secrets, certificates; every ``admin.token_files``), and an admin
    listener reachable from the network with no authentication. ``run`` and
    ``check-config`` both call it, so ``check-config`` accepts exactly what ``run`` starts
    with."""
    problems: list[str] = []
    for shard in settings.store_shards():
        problems += _writable_store("store.path", shard)
    problems += settings.repository.path_problems()
    problems += settings.relay.source.path_problems()
    for token_file in settings.admin.token_files:
        if readable_file_problem("admin.token_files", token_file, "the token file"):
            problems.append(
                f"admin.token_files: {token_file} is not a readable file; mount the token"
                " file there or take it out of admin.token_files"
            )
    exposure = settings.admin.exposure()
    if exposure is not None:
        problems.append(f"admin.host: {exposure}")
    problems += _key_problems(settings.log.key_file)
    if problems:
        raise ConfigError("\n".join(problems))


def _key_problems(key_file: Path | None) -> list[str]:
    """Why ``log.key_file`` cannot sign checkpoints, if it cannot."""
    from proxy.log.note import NoteError, Signer

    if key_file is None:
        return []
    try:
        Signer.parse(key_file.read_text())
    except OSError as exc:
        return [f"log.key_file: {key_file} cannot be read ({exc.strerror}); mount the key there"]
    except (NoteError, ValueError) as exc:
        return [
            f"log.key_file: {key_file} is not a signing key ({exc}); make one with"
            " `fhir-audit-proxy log keygen`"
        ]
    return []


def _writable_store(setting: str, path: Path) -> Iterator[str]:
    problem = _store_problem(path) if path.is_file() else None
    if problem:
        yield (
            f"{setting}: {path} is not a store this proxy can use ({problem}); point"
            " store.path at a new path or at this proxy's store"
        )
        return
    yield from writable_file_problems(setting, path, os.O_RDWR)


def _store_problem(path: Path) -> str | None:
    """Why an existing, non-empty file cannot be the store: not SQLite, or written by a newer
    proxy. Only those: a store left by a crash (a -wal without its -shm) may refuse a
    read-only open and is still good for `run`."""
    from proxy.store.schema import SCHEMA_VERSION

    if not path.stat().st_size:
        return None
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            version: int = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
            return "not an SQLite database"
        return None
    if version > SCHEMA_VERSION:
        return f"schema version {version}, newer than this proxy knows ({SCHEMA_VERSION})"
    return None
