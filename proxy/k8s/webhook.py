"""The mutating admission webhook: ``AdmissionReview`` v1 in, ``AdmissionReview`` v1 out
with a JSONPatch that injects the proxy (see :mod:`proxy.k8s.patch` for the rules).

Paths: ``POST /mutate`` for pods whose namespace the MutatingWebhookConfiguration selected
by label (inject unless opted out), ``POST /mutate/opt-in`` for pods anywhere else (inject
only with ``fhir-audit-proxy/inject: "true"``), ``GET /healthz``. Served over HTTPS with the
certificate and key read from files and reloaded when either file changes (cert-manager
rotates them in place), without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web

from proxy.k8s.patch import Decision, Selection, decide
from proxy.settings import WebhookSettings
from proxy.tasks import running

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("webhook_settings", WebhookSettings)


def _pod_label(request: Mapping[str, Any]) -> str:
    """``namespace/name`` of the pod under review (Deployment pods have only a generateName)."""
    pod = request.get("object") or {}
    meta = pod.get("metadata") or {} if isinstance(pod, dict) else {}
    name = request.get("name") or meta.get("name") or (meta.get("generateName") or "?") + "*"
    return f"{request.get('namespace') or meta.get('namespace') or '?'}/{name}"


def review_response(
    review: Mapping[str, Any], settings: WebhookSettings, selection: Selection
) -> dict[str, Any]:
    """The ``AdmissionReview`` answering ``review``. Every pod is admitted, with a patch when
    it is injected; only the webhook's own failure denies, and only with ``fail_closed``."""
    request = review.get("request") or {}
    uid = request.get("uid", "")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    label = _pod_label(request)
    try:
        if request.get("kind", {}).get("kind") != "Pod" or request.get("operation") != "CREATE":
            decision = Decision(patch=[], reason="not a pod creation")
        else:
            decision = decide(
                request.get("object") or {}, request.get("namespace") or "", settings, selection
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
    if decision.warnings:
        log.warning("pod %s not injected: %s", label, "; ".join(decision.warnings))
        response["warnings"] = decision.warnings
    else:
        log.info("pod %s: %s", label, decision.reason)
    if decision.injected:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(decision.patch)).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _handler(selection: Selection) -> Any:
    async def mutate(request: web.Request) -> web.Response:
        try:
            review = orjson.loads(await request.read())
            if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
                raise ValueError("not an AdmissionReview")
        except ValueError as exc:
            return web.json_response({"error": f"bad AdmissionReview: {exc}"}, status=400)
        body = review_response(review, request.app[SETTINGS], selection)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return mutate


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_webhook_app(settings: WebhookSettings) -> web.Application:
    """The webhook's routes; TLS and the certificate reload are added by :func:`serve_webhook`."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[SETTINGS] = settings
    app.router.add_post("/mutate", _handler(Selection.NAMESPACE))
    app.router.add_post("/mutate/opt-in", _handler(Selection.ANNOTATION))
    app.router.add_get("/healthz", _healthz)
    return app


class CertificateFiles:
    """A server ``SSLContext`` whose certificate chain is reloaded from ``cert``/``key`` when
    either file's modification time or size changes. New connections get the new chain;
    open ones keep theirs. A half-written pair (key and cert not matching yet) keeps the
    old chain and is retried at the next check."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._read_stamp()
        self.context.load_cert_chain(cert, key)

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
    files = CertificateFiles(cert, key)
    app = build_webhook_app(settings)
    sock = socket.create_server((host, port), reuse_port=False)
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
