"""The mutating admission webhook: ``AdmissionReview`` v1 in, ``AdmissionReview`` v1 out
with a JSONPatch that injects the proxy (see :mod:`proxy.k8s.patch` for the rules).

Paths, one per selector of the MutatingWebhookConfiguration (the API server tells the
webhook nothing of the namespace's labels, so the path does): ``POST /mutate`` for pods of
namespaces labelled ``fhir-audit-proxy/injection: enabled``, ``POST /mutate/required`` for
``fhir-audit-proxy/injection: required`` (audit mandatory: a pod that would go without the
sidecar is denied), ``POST /mutate/opt-in`` for pods anywhere else (inject only with
``fhir-audit-proxy/inject: "true"``); each also under ``.../pod-security`` for namespaces
that enforce the Pod Security level ``baseline`` or ``restricted``. ``GET /healthz``,
``GET /metrics`` (Prometheus). Served over HTTPS with the certificate and key read from
files and reloaded when either file changes (cert-manager rotates them in place), without
a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web
from cryptography import x509
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from proxy.k8s.patch import Decision, Selection, decide
from proxy.settings import WebhookSettings
from proxy.tasks import running

log = logging.getLogger(__name__)

SELECTION_PATHS: Mapping[Selection, str] = {
    Selection.NAMESPACE: "/mutate",
    Selection.REQUIRED: "/mutate/required",
    Selection.ANNOTATION: "/mutate/opt-in",
}
POD_SECURITY_SUFFIX = "/pod-security"
"""Appended to a path for namespaces that enforce the Pod Security level baseline or
restricted (``pod-security.kubernetes.io/enforce``)."""


@dataclass(frozen=True, slots=True)
class WebhookMetrics:
    """The webhook's Prometheus metrics, in a registry of its own."""

    registry: CollectorRegistry
    reviews: Counter
    """Reviews answered, by path and result (injected, skipped, refused, denied, failed)."""
    seconds: Histogram
    """Time to answer a review."""
    certificate_expiry: Gauge
    """When the serving certificate in use expires (Unix time)."""

    @classmethod
    def create(cls) -> WebhookMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            reviews=Counter(
                "fhir_audit_webhook_reviews",
                "AdmissionReviews answered, by webhook path and result.",
                ["path", "result"],
                registry=registry,
            ),
            seconds=Histogram(
                "fhir_audit_webhook_review_seconds",
                "Time to answer an AdmissionReview.",
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            ),
            certificate_expiry=Gauge(
                "fhir_audit_webhook_certificate_expiry_timestamp_seconds",
                "When the serving certificate in use expires (Unix time).",
                registry=registry,
            ),
        )


SETTINGS = web.AppKey("webhook_settings", WebhookSettings)
METRICS = web.AppKey("webhook_metrics", WebhookMetrics)


def _pod_label(request: Mapping[str, Any]) -> str:
    """``namespace/name`` of the pod under review (Deployment pods have only a generateName)."""
    pod = request.get("object") or {}
    meta = pod.get("metadata") or {} if isinstance(pod, dict) else {}
    name = request.get("name") or meta.get("name") or (meta.get("generateName") or "?") + "*"
    return f"{request.get('namespace') or meta.get('namespace') or '?'}/{name}"


def review_response(
    review: Mapping[str, Any],
    settings: WebhookSettings,
    selection: Selection,
    *,
    pod_security: bool = False,
) -> dict[str, Any]:
    """The ``AdmissionReview`` answering ``review``. A pod is admitted, with a patch when it
    is injected; it is denied where audit is required and it cannot be audited, and when
    the webhook itself fails on it with ``fail_closed``."""
    request = review.get("request") or {}
    uid = request.get("uid", "")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    label = _pod_label(request)
    try:
        if request.get("kind", {}).get("kind") != "Pod" or request.get("operation") != "CREATE":
            decision = Decision(patch=[], reason="not a pod creation")
        else:
            decision = decide(
                request.get("object") or {},
                request.get("namespace") or "",
                settings,
                selection,
                pod_security=pod_security,
            )
    except Exception as exc:
        log.exception("injection failed for pod %s", label)
        if settings.fail_closed:
            response["allowed"] = False
            response["status"] = {
                "code": 500,
                "message": f"fhir-audit-proxy injection failed: {type(exc).__name__}",
            }
        else:
            response["warnings"] = [f"fhir-audit-proxy not injected: {type(exc).__name__}"]
        return {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }
    if not decision.allowed:
        log.warning("pod %s denied: %s", label, decision.reason)
        response["allowed"] = False
        response["status"] = {"code": 403, "reason": "Forbidden", "message": decision.reason}
    elif decision.warnings and not decision.injected:
        log.warning("pod %s not injected: %s", label, "; ".join(decision.warnings))
    elif decision.warnings:
        log.warning("pod %s: %s; %s", label, decision.reason, "; ".join(decision.warnings))
    else:
        log.info("pod %s: %s", label, decision.reason)
    if decision.warnings:
        response["warnings"] = decision.warnings
    if decision.injected:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(decision.patch)).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _result(response: Mapping[str, Any]) -> str:
    if not response["allowed"]:
        return "failed" if response["status"]["code"] == 500 else "denied"
    if "patch" in response:
        return "injected"
    return "refused" if "warnings" in response else "skipped"


def _handler(selection: Selection, pod_security: bool) -> Any:
    path = SELECTION_PATHS[selection] + (POD_SECURITY_SUFFIX if pod_security else "")

    async def mutate(request: web.Request) -> web.Response:
        try:
            review = orjson.loads(await request.read())
            if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
                raise ValueError("not an AdmissionReview")
        except ValueError as exc:
            return web.json_response({"error": f"bad AdmissionReview: {exc}"}, status=400)
        metrics = request.app[METRICS]
        started = time.perf_counter()
        body = review_response(review, request.app[SETTINGS], selection, pod_security=pod_security)
        metrics.seconds.observe(time.perf_counter() - started)
        metrics.reviews.labels(path=path, result=_result(body["response"])).inc()
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return mutate


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(request.app[METRICS].registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


def build_webhook_app(
    settings: WebhookSettings, metrics: WebhookMetrics | None = None
) -> web.Application:
    """The webhook's routes; TLS and the certificate reload are added by :func:`serve_webhook`."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = metrics or WebhookMetrics.create()
    for selection, path in SELECTION_PATHS.items():
        app.router.add_post(path, _handler(selection, pod_security=False))
        app.router.add_post(path + POD_SECURITY_SUFFIX, _handler(selection, pod_security=True))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


class CertificateFiles:
    """A server ``SSLContext`` whose certificate chain is reloaded from ``cert``/``key`` when
    either file's modification time or size changes. New connections get the new chain;
    open ones keep theirs. A half-written pair (key and cert not matching yet) keeps the
    old chain and is retried at the next check."""

    def __init__(self, cert: Path, key: Path, metrics: WebhookMetrics | None = None) -> None:
        self.cert = cert
        self.key = key
        self.metrics = metrics
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._read_stamp()
        self.context.load_cert_chain(cert, key)
        self._note_expiry()

    def _note_expiry(self) -> None:
        """Publish when the certificate now in use expires, and warn when it is close."""
        try:
            expires = x509.load_pem_x509_certificate(self.cert.read_bytes()).not_valid_after_utc
        except (OSError, ValueError) as exc:
            log.warning("could not read the serving certificate's expiry: %s", exc)
            return
        if self.metrics is not None:
            self.metrics.certificate_expiry.set(expires.timestamp())
        left = expires - datetime.now(UTC)
        if left.days < 30:
            log.warning("the serving certificate expires on %s: renew it", expires.isoformat())

    def _read_stamp(self) -> tuple[int, int, int, int]:
        c, k = os.stat(self.cert), os.stat(self.key)
        return (c.st_mtime_ns, c.st_size, k.st_mtime_ns, k.st_size)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; True when a new chain is in use."""
        try:
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.warning("serving certificate not reloaded (kept the previous one): %s", exc)
            return False
        self._stamp = stamp
        log.info("serving certificate reloaded from %s", self.cert)
        self._note_expiry()
        return True

    async def watch(self, app: web.Application, every_s: float) -> AsyncIterator[None]:
        """A ``cleanup_ctx`` that checks the files every ``every_s`` seconds."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(every_s)
                self.reload_if_changed()

        async with running(loop(), "certificate-reload"):
            yield


def serve_webhook(settings: WebhookSettings, cert: Path, key: Path, host: str, port: int) -> None:
    """Serve the webhook over HTTPS until SIGTERM (``port`` 0: any free port, logged)."""
    metrics = WebhookMetrics.create()
    files = CertificateFiles(cert, key, metrics)
    app = build_webhook_app(settings, metrics)
    if host == "::" and socket.has_dualstack_ipv6():
        # Both families on one socket: the API server may reach the Service over either.
        sock = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        sock = socket.create_server(("0.0.0.0" if host == "::" else host, port))
    bound = sock.getsockname()[1]

    async def watching(app: web.Application) -> AsyncIterator[None]:
        async for _ in files.watch(app, settings.cert_reload_s):
            yield

    async def announce(app: web.Application) -> None:
        log.info("admission webhook on https://%s:%d (image %s)", host, bound, settings.image)

    app.cleanup_ctx.append(watching)
    app.on_startup.append(announce)
    web.run_app(
        app,
        sock=sock,
        ssl_context=files.context,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


def run_webhook_command(args: argparse.Namespace) -> int:
    """``fhir-audit-proxy webhook``: serve until SIGTERM with the certificate files given."""
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve_webhook(WebhookSettings(), Path(args.cert), Path(args.key), args.host, args.port)
    return 0
