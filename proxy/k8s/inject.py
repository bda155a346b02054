"""``fhir-audit-proxy inject -f FILE``: the injection the webhook would make, done offline on
manifests (as ``istioctl kube-inject -f`` does), for review and for GitOps.

Every Pod, and the pod template of every Deployment, StatefulSet, DaemonSet, ReplicaSet,
Job and CronJob, goes through the same :func:`proxy.k8s.patch.decide` as the webhook, with
the webhook's settings (``FHIR_AUDIT_WEBHOOK_*``); other documents pass unchanged. The
webhook later sees the injected pods as injected already, provided its settings are the
same.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from proxy.k8s.patch import Selection, decide
from proxy.settings import WebhookSettings

TEMPLATE_PATHS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "Deployment": (("spec", "template"), "ReplicaSet"),
    "StatefulSet": (("spec", "template"), "StatefulSet"),
    "DaemonSet": (("spec", "template"), "DaemonSet"),
    "ReplicaSet": (("spec", "template"), "ReplicaSet"),
    "Job": (("spec", "template"), "Job"),
    "CronJob": (("spec", "jobTemplate", "spec", "template"), "Job"),
}
"""Where each workload keeps its pod template, and the kind that owns its pods."""


@dataclass(frozen=True, slots=True)
class Note:
    """What happened to one pod or pod template."""

    where: str
    """``Kind/name`` of the document."""
    message: str
    denied: bool = False


def _template(document: dict[str, Any]) -> dict[str, Any] | None:
    found = TEMPLATE_PATHS.get(document.get("kind", ""))
    if found is None:
        return None
    node: Any = document
    for key in found[0]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def inject_document(
    document: Any,
    settings: WebhookSettings,
    selection: Selection,
    namespace: str,
    *,
    pod_security: bool = False,
) -> tuple[Any, list[Note]]:
    """``document`` with the sidecar injected where the webhook would inject it (each item
    of a ``List``), and what was done to each pod in it."""
    if not isinstance(document, dict):
        return document, []
    kind = document.get("kind", "")
    if kind == "List":
        items, notes = [], []
        for item in document.get("items") or []:
            done, said = inject_document(
                item, settings, selection, namespace, pod_security=pod_security
            )
            items.append(done)
            notes.extend(said)
        return {**document, "items": items}, notes
    metadata = document.get("metadata") or {}
    where = f"{kind}/{metadata.get('name', '?')}"
    ns = metadata.get("namespace") or namespace
    template = _template(document)
    if kind == "Pod":
        pod = document
    elif template is not None:
        owner = TEMPLATE_PATHS[kind][1]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **(template.get("metadata") or {}),
                "namespace": ns,
                "ownerReferences": [{"kind": owner, "name": metadata.get("name", "")}],
            },
            "spec": template.get("spec") or {},
        }
    else:
        return document, []
    decision = decide(pod, ns, settings, selection, pod_security=pod_security)
    if not decision.allowed:
        return document, [Note(where, decision.reason, denied=True)]
    if not decision.injected:
        return document, [Note(where, "; ".join(decision.warnings) or decision.reason)]
    injected: dict[str, Any] = jsonpatch.apply_patch(pod, decision.patch)
    note = Note(where, "; ".join([decision.reason, *decision.warnings]))
    if template is None:
        return injected, [note]
    template_metadata = dict(template.get("metadata") or {})
    for key in ("annotations", "labels"):
        if key in injected["metadata"]:
            template_metadata[key] = injected["metadata"][key]
    changed = {**template, "metadata": template_metadata, "spec": injected["spec"]}
    return _copy_with(document, TEMPLATE_PATHS[kind][0], changed), [note]


def _copy_with(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """``document`` with ``value`` at ``path``, the dictionaries on the way copied."""
    head, *rest = path
    inner = _copy_with(document.get(head) or {}, tuple(rest), value) if rest else value
    return {**document, head: inner}


SELECTIONS = {
    "enabled": Selection.NAMESPACE,
    "required": Selection.REQUIRED,
    "opt-in": Selection.ANNOTATION,
}


def run_inject_command(args: argparse.Namespace) -> int:
    """Read ``args.filename`` (``-``: standard input), print the injected manifests, and one
    line per pod on standard error; 1 when a pod would be denied."""
    text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    settings = WebhookSettings()
    out: list[Any] = []
    denied = False
    for document in documents:
        done, notes = inject_document(
            document,
            settings,
            SELECTIONS[args.injection],
            args.namespace,
            pod_security=args.pod_security,
        )
        out.append(done)
        for note in notes:
            denied = denied or note.denied
            verdict = "denied" if note.denied else "ok"
            print(f"{note.where}: {verdict}: {note.message}", file=sys.stderr)
    if denied:
        return 1
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 0
