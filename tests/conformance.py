"""BALP conformance of every AuditEvent the suite produces, checked by the profiles
themselves.

:class:`ProfileValidator` keeps one Node process (``testserver/validator.mjs``: Medplum's
``validateResource`` with the FHIR R4 core definitions and the BALP StructureDefinitions
in ``tests/audit/balp-profiles``) fed events as JSON lines; an event is validated against
the BALP profile it claims, or against the base AuditEvent when it claims none. Medplum
does not check the constraints nested inside slices (a client agent without ``network``
or ``who``, a patient entity without ``what``) nor the required bindings of slices (a
data entity's role, a Read's subtype): :func:`slice_violations` checks those, each check
named after the profile element it enforces. R5 events are not sent (the definitions are
R4's; fhir.resources validates them in the tests that make them).

Submitting never blocks: events are queued and written to the process by a thread, the
answers read by another, so a proxy under test is not slowed by its audit being checked.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = ROOT / "testserver" / "validator.mjs"
PROFILES = ROOT / "tests" / "audit" / "balp-profiles"
BALP_PREFIX = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
BALP_VERSION = "1.1.5-current"
"""The BALP IG release whose StructureDefinitions (SUSHI 3.21) the suite checks against."""

DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass(frozen=True, slots=True)
class Slices:
    """What one basic BALP RESTful profile fixes in its slices, as far as Medplum does
    not check it."""

    subtype_slice: str
    """The name of the subtype slice (``anyRead``)."""
    subtypes: frozenset[str]
    """Its pattern or required binding (restful-interaction codes)."""
    client: str
    """``AuditEvent.agent:client.type``: the DICOM (or provenance) code of the client."""
    server: str
    """``AuditEvent.agent:server.type``: the code of the server."""
    user_types: frozenset[str]
    """``AuditEvent.agent:user.type``: its pattern (IRCP) or required binding
    (DataSources: AUT, INF, CST)."""
    entity: str
    """``data`` (the resource: ``AuditEvent.entity:data``) or ``query``."""


_DATA_SOURCES = frozenset({"AUT", "INF", "CST"})
_IRCP = frozenset({"IRCP"})
SLICES: dict[str, Slices] = {
    "Create": Slices("anyCreate", frozenset({"create"}), "110153", "110152", _DATA_SOURCES, "data"),
    "Read": Slices("anyRead", frozenset({"read", "vread"}), "110152", "110153", _IRCP, "data"),
    "Update": Slices(
        "anyUpdate", frozenset({"update", "patch"}), "110153", "110152", _DATA_SOURCES, "data"
    ),
    "Delete": Slices(
        "anyDelete", frozenset({"delete"}), "110150", "custodian", _DATA_SOURCES, "data"
    ),
    "Query": Slices(
        "anySearch",
        frozenset({"search", "search-type", "search-system"}),
        "110153",
        "110152",
        _IRCP,
        "query",
    ),
}
REST_OBJECT_ROLES = frozenset({"4", "3", "20"})
"""``AuditEvent.entity:data.role``'s required binding (BALP RestObjectRoles)."""


def _codes(concept: Any) -> set[str]:
    if not isinstance(concept, Mapping):
        return set()
    if "coding" in concept:
        return {str(c.get("code")) for c in concept["coding"] if isinstance(c, Mapping)}
    return {str(concept["code"])} if "code" in concept else set()


def _entity_kind(entity: Mapping[str, Any], system_object: str) -> str:
    """The entity's slice: by its type, as the profiles discriminate (a System Object is
    the profile's ``data`` or ``query`` entity)."""
    types, roles = _codes(entity.get("type")), _codes(entity.get("role"))
    if "XrequestId" in types:
        return "transaction"
    if "1" in types and "1" in roles:
        return "patient"
    if "2" in types:
        return system_object
    return "other"


def slice_violations(event: Mapping[str, Any]) -> list[str]:
    """The violations of the BALP RESTful profile ``event`` claims that Medplum's
    validator does not see, each starting with the profile element it breaks."""
    claimed = [p for p in (event.get("meta") or {}).get("profile") or () if BALP_PREFIX in p]
    out: list[str] = []
    for url in claimed:
        name = url.removeprefix(BALP_PREFIX)
        basic = name.removeprefix("Patient")
        slices = SLICES.get(basic)
        if slices is None:
            continue
        out += [f"{name}: {v}" for v in _violations(event, slices, name.startswith("Patient"))]
    return out


def _violations(event: Mapping[str, Any], slices: Slices, patient: bool) -> list[str]:
    out: list[str] = []
    matching = [c for c in event.get("subtype") or () if c.get("code") in slices.subtypes]
    if len(matching) != 1:
        out.append(
            f"AuditEvent.subtype:{slices.subtype_slice}: one subtype from"
            f" {sorted(slices.subtypes)}, got {[c.get('code') for c in event.get('subtype') or ()]}"
        )
    agents = [a for a in event.get("agent") or () if isinstance(a, Mapping)]
    for slice_name, code in (("client", slices.client), ("server", slices.server)):
        for agent in (a for a in agents if code in _codes(a.get("type"))):
            if not agent.get("who"):
                out.append(f"AuditEvent.agent:{slice_name}.who: required")
            if not agent.get("network"):
                out.append(f"AuditEvent.agent:{slice_name}.network: required")
    for user in (a for a in agents if a.get("requestor") is True):
        if not _codes(user.get("type")) & slices.user_types:
            out.append(
                f"AuditEvent.agent:user.type: a code of {sorted(slices.user_types)}, got"
                f" {sorted(_codes(user.get('type')))}"
            )
        if not user.get("who"):
            out.append("AuditEvent.agent:user.who: required")
        if user.get("network"):
            out.append("AuditEvent.agent:user.network: not allowed")
    for entity in (e for e in event.get("entity") or () if isinstance(e, Mapping)):
        what = entity.get("what") or {}
        match _entity_kind(entity, slices.entity):
            case "transaction":
                if not (what.get("identifier") or {}).get("value"):
                    out.append("AuditEvent.entity:transaction.what.identifier.value: required")
            case "patient":
                if not str(what.get("reference") or "").startswith("Patient/"):
                    out.append("AuditEvent.entity:patient.what: a reference to a Patient")
            case "data":
                if not what:
                    out.append("AuditEvent.entity:data.what: required")
                if not _codes(entity.get("role")) <= REST_OBJECT_ROLES or not entity.get("role"):
                    out.append(
                        "AuditEvent.entity:data.role: a code of RestObjectRoles"
                        f" {sorted(REST_OBJECT_ROLES)}, got {sorted(_codes(entity.get('role')))}"
                    )
            case "query":
                if not entity.get("query"):
                    out.append("AuditEvent.entity:query.query: required")
                for absent in ("what", "lifecycle", "detail"):
                    if entity.get(absent):
                        out.append(f"AuditEvent.entity:query.{absent}: not allowed")
    patients = [e for e in event.get("entity") or () if _entity_kind(e, "") == "patient"]
    if patient and len(patients) != 1:
        out.append("AuditEvent.entity:patient: exactly one")
    return out


def is_r5(event: Mapping[str, Any]) -> bool:
    """An R5 AuditEvent (R5 has ``code``; R4's outcome is a code, R5's an object)."""
    return "code" in event or isinstance(event.get("outcome"), Mapping)


@dataclass(slots=True)
class Verdict:
    """What the check found of one event."""

    owner: str
    """The test during which the event was produced."""
    event_id: str
    profiles: list[str]
    """The profiles validated against (``AuditEvent``: the base)."""
    errors: list[str]


@dataclass
class ProfileValidator:
    """One Node process validating events against their BALP profiles (see the module)."""

    process: subprocess.Popen[bytes]
    owner: str = "(session)"
    """The test now running: what is submitted is attributed to it."""
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    """Events validated, per profile (``AuditEvent``: claiming none; ``R5``: not sent)."""
    _outbox: queue.SimpleQueue[tuple[int, str, bytes] | None] = field(
        default_factory=queue.SimpleQueue
    )
    _pending: dict[int, tuple[str, str, list[str]]] = field(default_factory=dict)
    _probes: dict[int, Verdict | None] = field(default_factory=dict)
    """Events checked by :meth:`check`: not counted, their verdicts kept apart."""
    _verdicts: list[Verdict] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _sequence: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(cls) -> ProfileValidator:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is required for the BALP conformance check (see .ci/run)")
        process = subprocess.Popen(
            [node, str(VALIDATOR), str(PROFILES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=VALIDATOR.parent,  # ESM imports resolve from testserver/node_modules
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith(b"ready "):
            process.kill()
            raise RuntimeError(f"the BALP validator did not start: {line!r}")
        validator = cls(process)
        validator._threads = [
            threading.Thread(target=validator._write, name="balp-validator-in", daemon=True),
            threading.Thread(target=validator._read, name="balp-validator-out", daemon=True),
        ]
        for thread in validator._threads:
            thread.start()
        return validator

    def submit(self, event_id: str, body: bytes) -> None:
        """Check the event whose JSON is ``body`` (once per id). Never blocks."""
        with self._lock:
            if event_id in self._seen:
                return
            self._seen.add(event_id)
            self._sequence += 1
            n = self._sequence
            self._pending[n] = (self.owner, event_id, [])
        self._outbox.put((n, event_id, body))

    def check(self, event: Mapping[str, Any], within_s: float = 30.0) -> list[str]:
        """The errors of ``event``, checked now (not counted, not held against the test:
        for tests of the check itself)."""
        with self._lock:
            self._sequence += 1
            n = self._sequence
            self._pending[n] = ("(probe)", str(event.get("id")), [])
            self._probes[n] = None
        self._outbox.put((n, str(event.get("id")), orjson.dumps(event)))
        deadline = time.monotonic() + within_s
        with self._lock:
            while self._probes[n] is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("the BALP validator did not answer")
                self._lock.wait(left)
            verdict = self._probes.pop(n)
        assert verdict is not None
        return verdict.errors

    def submit_event(self, event: Mapping[str, Any]) -> None:
        """Check ``event`` (a parsed AuditEvent: one delivered to a repository)."""
        event_id = event.get("id")
        self.submit(str(event_id) if event_id else f"no-id-{id(event)}", orjson.dumps(event))

    def _write(self) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        while (item := self._outbox.get()) is not None:
            n, event_id, body = item
            try:
                event = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                self._settle(n, [], [f"not JSON: {exc}"])
                continue
            if not isinstance(event, dict) or event.get("resourceType") != "AuditEvent":
                self._settle(n, [], [])
                continue
            if is_r5(event):
                self._settle(n, ["R5"], [])
                continue
            with self._lock:
                owner, _, _ = self._pending[n]
                self._pending[n] = (owner, event_id, slice_violations(event))
            try:
                stdin.write(orjson.dumps({"n": n, "event": event}) + b"\n")
                stdin.flush()
            except (BrokenPipeError, ValueError):
                self._settle(n, [], ["the BALP validator is gone"])

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            answer = orjson.loads(line)
            self._settle(answer["n"], answer["profiles"], answer["errors"])
        with self._lock:  # the process ended: nothing more will be answered
            for n in list(self._pending):
                self._settle_locked(n, [], ["the BALP validator stopped"])

    def _settle(self, n: int, profiles: list[str], errors: list[str]) -> None:
        with self._lock:
            self._settle_locked(n, profiles, errors)

    def _settle_locked(self, n: int, profiles: list[str], errors: list[str]) -> None:
        entry = self._pending.pop(n, None)
        if entry is None:
            return
        owner, event_id, own = entry
        names = [p.removeprefix("IHE.BasicAudit.") for p in profiles]
        verdict = Verdict(owner, event_id, names, own + errors)
        if n in self._probes:
            self._probes[n] = verdict
        else:
            for name in names:
                self.counts[name] += 1
            self._verdicts.append(verdict)
        self._lock.notify_all()

    def settle(self, within_s: float = 120.0) -> list[Verdict]:
        """Wait until every event submitted so far is checked; the verdicts with errors
        since the last call."""
        deadline = time.monotonic() + within_s
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"the BALP validator did not answer for {len(self._pending)} events"
                    )
                self._lock.wait(left)
            verdicts, self._verdicts = self._verdicts, []
        return [v for v in verdicts if v.errors]

    def close(self) -> None:
        self._outbox.put(None)
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    @property
    def validated(self) -> int:
        """Events validated by Medplum (R5 events, not sent, are not counted)."""
        return sum(n for name, n in self.counts.items() if name != "R5")


def summary(counts: Mapping[str, int]) -> list[str]:
    """Lines for the end of the session: how many events were validated, per profile."""
    validated = sum(n for name, n in counts.items() if name != "R5")
    lines = [
        f"BALP conformance ({BALP_VERSION}, Medplum validateResource): {validated} events validated"
    ]
    for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        label = {
            "AuditEvent": "AuditEvent (no profile claimed: base R4 AuditEvent)",
            "R5": "R5 (not sent: the definitions are R4's)",
        }.get(name, name)
        lines.append(f"  {n:6d}  {label}")
    return lines
