"""FHIR bodies in JSON, XML and YAML: the same inference from each (the bodies written by
fhir.resources, a writer independent of the proxy's reader), a parser that expands no
entity and is bounded, and the inference scenarios end to end through a real proxy in
front of a FHIR server that answers in the format asked for."""

from __future__ import annotations

import io
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from proxy.audit.balp import AuditContext, build_events
from proxy.fhir.formats import (
    MAX_XML_DEPTH,
    BodyFormat,
    body_format,
    parse_resource,
    redacted_body,
    xml_resource,
    yaml_resource,
)
from proxy.fhir.large_bundle import audit_view
from tests.factories import (
    CONTENT_TYPES,
    FORMATS,
    NOW,
    TRANSACTION_BY_URN,
    FormatUpstream,
    RunningProxy,
    StartProxy,
    exchange,
    fhir_body,
    new_patient,
    patient_refs,
    profile,
    request_id_of,
    subtypes,
)

# --- which format a body is in ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/fhir+json", b"", BodyFormat.JSON),
        ("application/json; charset=utf-8", b"", BodyFormat.JSON),
        ("application/json-patch+json", b"", BodyFormat.JSON),
        ("application/fhir+xml;fhirVersion=4.0", b"", BodyFormat.XML),
        ("text/xml", b"", BodyFormat.XML),
        ("Application/XML", b"", BodyFormat.XML),
        ("text/yaml", b"", BodyFormat.YAML),
        ("application/x-yaml", b"", BodyFormat.YAML),
        ("application/x-www-form-urlencoded", b"a=1", BodyFormat.FORM),
        ("application/graphql", b"{ x }", BodyFormat.GRAPHQL),
        ("", b' \n{"resourceType": "Patient"}', BodyFormat.JSON),
        ("", b"\xef\xbb\xbf<Patient/>", BodyFormat.XML),
        ("text/plain", b"hello", BodyFormat.OTHER),
        ("", b"", BodyFormat.OTHER),
    ],
)
def test_body_format(content_type: str, body: bytes, expected: BodyFormat) -> None:
    assert body_format(content_type, body) is expected


# --- the same inference from each format -------------------------------------------------------


def _observation(oid: str, patient: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"versionId": "3", "security": [{"system": "http://s", "code": "R"}]},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": patient},
        **extra,
    }


NARRATIVE = {
    "status": "generated",
    "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>Patient/hidden</p></div>',
}
SEARCHSET = {
    "resourceType": "Bundle",
    "type": "searchset",
    "total": 4,
    "entry": [
        {"fullUrl": "http://x/fhir/Observation/o1", "resource": _observation("o1", "Patient/a")},
        {
            "resource": _observation(
                "o2",
                "Patient/b",
                text=NARRATIVE,
                performer=[{"reference": "Practitioner/dr"}, {"reference": "Patient/c"}],
            ),
            "search": {"mode": "match"},
        },
        {
            "resource": {"resourceType": "Patient", "id": "d", "text": NARRATIVE},
            "search": {"mode": "include"},
        },
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "warning", "code": "informational", "diagnostics": "x"}],
            },
            "search": {"mode": "outcome"},
        },
    ],
}
ONE_ENTRY = {
    "resourceType": "Bundle",
    "type": "searchset",
    "entry": [{"resource": _observation("o9", "Patient/only")}],
}
TRANSACTION_RESPONSE = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [
        {"response": {"status": "201 Created", "location": "Patient/np/_history/1"}},
        {"response": {"status": "201 Created", "location": "Observation/no/_history/1"}},
        {
            "response": {
                "status": "404 Not Found",
                "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "not-found", "diagnostics": "old"}],
                },
            }
        },
    ],
}
NOT_FOUND = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "not-found", "diagnostics": "no such resource"}],
}


@dataclass(frozen=True)
class Case:
    """One exchange whose bodies are written in each format."""

    name: str
    method: str
    path: str
    request: dict[str, Any] | None
    response: dict[str, Any]
    status: int = 200


CASES = [
    Case("read", "GET", "Observation/o1", None, _observation("o1", "Patient/a")),
    Case("read of a Patient", "GET", "Patient/d", None, {"resourceType": "Patient", "id": "d"}),
    Case(
        "create",
        "POST",
        "Observation",
        _observation("o1", "Patient/a"),
        _observation("o1", "Patient/a"),
        201,
    ),
    Case("searchset", "GET", "Observation", None, SEARCHSET),
    Case("searchset of one entry", "GET", "Observation", None, ONE_ENTRY),
    Case("transaction", "POST", "", TRANSACTION_BY_URN, TRANSACTION_RESPONSE),
    Case("not found", "GET", "Observation/x", None, NOT_FOUND, 404),
]


def _facts(case: Case, fmt: str) -> list[dict[str, Any]]:
    """The events of ``case`` with its bodies in ``fmt``, without what is random."""
    ctype = CONTENT_TYPES[fmt]
    ex = exchange(
        case.method,
        case.path,
        body=fhir_body(case.request, fmt) if case.request else None,
        headers={"Content-Type": ctype} if case.request else None,
        status=case.status,
        response=fhir_body(case.response, fmt),
        response_headers={"Content-Type": ctype},
        request_id="r1",
    )
    out = []
    for built in build_events(ex, AuditContext.default(), NOW):
        event = built.event
        event.pop("id")
        out.append(event)
    return out


@pytest.mark.parametrize("fmt", ["xml", "yaml"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_xml_and_yaml_bodies_give_the_events_json_gives(case: Case, fmt: str) -> None:
    expected = _facts(case, "json")
    assert expected
    if case.status < 400:
        assert any(patient_refs(e) for e in expected), "the case names a patient"
    assert _facts(case, fmt) == expected


def test_xml_reads_as_the_json_form_the_audit_reads() -> None:
    xml = fhir_body(SEARCHSET, "xml")
    parsed = parse_resource(xml, "application/fhir+xml")
    assert parsed is not None
    assert parsed["resourceType"] == "Bundle" and parsed["type"] == "searchset"
    entries = parsed["entry"]
    assert isinstance(entries, list) and len(entries) == 4
    first = entries[0]["resource"]
    assert first["resourceType"] == "Observation" and first["id"] == "o1"
    assert first["subject"] == {"reference": "Patient/a"}
    assert first["meta"] == {"versionId": "3", "security": [{"system": "http://s", "code": "R"}]}
    second = entries[1]["resource"]
    assert second["performer"] == [{"reference": "Practitioner/dr"}, {"reference": "Patient/c"}]
    assert second["text"] == {"status": "generated"}, "the narrative's XHTML is left out"
    assert entries[3]["resource"]["issue"][0]["diagnostics"] == "x"
    one = parse_resource(fhir_body(ONE_ENTRY, "xml"), "application/fhir+xml")
    assert one is not None and isinstance(one["entry"], list), "a Bundle's entry is a list"


def test_xml_inline_resources_extensions_and_element_ids() -> None:
    xml = (
        b'<Parameters xmlns="http://hl7.org/fhir"><parameter id="p1"><name value="patient"/>'
        b'<resource><Patient><id value="x"/><birthDate value="2001-02-03"><extension'
        b' url="http://e"><valueString value="v"/></extension></birthDate></Patient>'
        b'</resource></parameter><parameter><name value="n"/><valueInteger value="2"/>'
        b"</parameter><!-- a comment --><?pi x?></Parameters>"
    )
    assert parse_resource(xml, "application/xml") == {
        "resourceType": "Parameters",
        "parameter": [
            {
                "id": "p1",
                "name": "patient",
                "resource": {"resourceType": "Patient", "id": "x", "birthDate": "2001-02-03"},
            },
            {"name": "n", "valueInteger": "2"},
        ],
    }


def test_the_large_bundle_path_reads_xml_entry_by_entry_to_the_same_events() -> None:
    xml = fhir_body(SEARCHSET, "xml")
    whole = exchange(
        "GET",
        "Observation",
        response=xml,
        response_headers={"Content-Type": "application/fhir+xml"},
        request_id="r1",
    )
    cut = exchange("GET", "Observation", response=None, request_id="r1")
    view = audit_view(io.BytesIO(xml), "application/fhir+xml")
    assert view is not None and len(view["entry"]) == 4
    assert "code" not in view["entry"][0]["resource"], "each entry cut to what the audit reads"
    cut.use_response_json(view)
    ctx = AuditContext.default()

    def facts(built: list[Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in b.event.items() if k != "id"} for b in built]

    assert facts(build_events(cut, ctx, NOW)) == facts(build_events(whole, ctx, NOW))


# --- a hardened parser --------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE Patient [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Patient xmlns="http://hl7.org/fhir"><id value="p"/><name><family value="&lol9;"/></name>
</Patient>"""


def _nested(depth: int) -> bytes:
    """A Patient whose elements nest ``depth`` deep (the Patient itself is the first)."""
    inner = depth - 1
    return (
        b'<Patient xmlns="http://hl7.org/fhir"><id value="deep"/>'
        + b'<extension url="u">' * inner
        + b"</extension>" * inner
        + b"</Patient>"
    )


def test_no_entity_is_expanded_or_fetched(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("file-content-that-must-not-be-read")
    external = (
        b'<?xml version="1.0"?><!DOCTYPE Patient [<!ENTITY x SYSTEM "file://'
        + str(secret).encode()
        + b'">]><Patient xmlns="http://hl7.org/fhir"><id value="p"/><name><family'
        b' value="&x;"/></name></Patient>'
    )
    parameter_entity = (
        b'<?xml version="1.0"?><!DOCTYPE Patient [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x">'
        b' %p;]><Patient xmlns="http://hl7.org/fhir"><id value="p"/></Patient>'
    )
    for body in (BILLION_LAUGHS, external, parameter_entity):
        assert parse_resource(body, "application/fhir+xml") is None
        assert redacted_body(body, "application/fhir+xml", frozenset({"x"})) is None
        assert audit_view(io.BytesIO(body), "application/fhir+xml") is None


@pytest.mark.parametrize(
    "body",
    [
        _nested(MAX_XML_DEPTH + 1),
        b'<Patient xmlns="http://other"><id value="p"/></Patient>',
        b'<patient xmlns="http://hl7.org/fhir"><id value="p"/></patient>',
        b"<html><body>Bad gateway</body></html>",
        b'<Patient xmlns="http://hl7.org/fhir"><id value="p"/>',
        "<Patient xmlns='http://hl7.org/fhir'/>".encode("utf-16"),
        b"<!-- " + b"x" * (70 * 1024) + b' --><Patient xmlns="http://hl7.org/fhir"/>',
        b"not xml <",
    ],
    ids=[
        "too deep",
        "not the FHIR namespace",
        "no resource at the root",
        "html",
        "cut short",
        "utf-16",
        "a prolog past 64 KiB",
        "garbage",
    ],
)
def test_what_is_not_a_readable_fhir_xml_document_names_nothing(body: bytes) -> None:
    assert xml_resource(io.BytesIO(body)) is None


def test_an_entry_that_is_a_primitive_is_read_without_error() -> None:
    """A Bundle whose ``entry`` carries a value, as no server writes it, but a body may:
    the large-Bundle reader keeps it as it is rather than fail the audit."""
    body = (
        b'<Bundle xmlns="http://hl7.org/fhir"><type value="searchset"/>'
        b'<entry value="request"/><entry><resource><Patient><id value="p"/></Patient>'
        b"</resource></entry></Bundle>"
    )
    view = audit_view(io.BytesIO(body), "application/fhir+xml")
    assert view is not None
    assert view["entry"] == ["request", {"resource": {"resourceType": "Patient", "id": "p"}}]


def test_the_depth_bound_leaves_every_real_resource_readable() -> None:
    parsed = xml_resource(io.BytesIO(_nested(MAX_XML_DEPTH)))
    assert parsed is not None and parsed["id"] == "deep"


@pytest.mark.parametrize(
    "body",
    [
        b"resourceType: Patient\nid: &a x\nname: *a\n",
        b"a: &x [1, 2]\nb: [*x, *x]\n",
        b"!!python/object/apply:os.system ['true']\n",
        b"resourceType: Patient\n---\nresourceType: Patient\n",
        b"a: " + b"[" * 150 + b"]" * 150 + b"\n",
        b"- 1\n- 2\n",
        b"resourceType: [unclosed\n",
    ],
    ids=["an alias", "an alias bomb", "a python tag", "two documents", "too deep", "a list", "bad"],
)
def test_yaml_is_read_safely_or_not_at_all(body: bytes) -> None:
    assert yaml_resource(body) is None


def test_yaml_keeps_dates_and_ids_as_the_strings_json_has() -> None:
    assert yaml_resource(b"resourceType: Patient\nid: '12'\nbirthDate: 2001-02-03\n") == {
        "resourceType": "Patient",
        "id": "12",
        "birthDate": "2001-02-03",
    }


# --- redaction of a body as recorded -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/json", b'{"a": {"Password": "s"}}', b'{"a":{"Password":"REDACTED"}}'),
        ("application/json", b'{"a": 1}', b'{"a": 1}'),
        (
            "application/fhir+json",
            b'{"parameter": [{"name": "password", "part": [{"name": "x"}]}]}',
            b'{"parameter":[{"name":"password","part":"REDACTED"}]}',
        ),
        (
            "application/fhir+xml",
            b'<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="password"/>'
            b'<part><name value="x"/><valueString value="s"/></part></parameter></Parameters>',
            b"<?xml version='1.0' encoding='utf-8'?>\n"
            b'<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="password"/>'
            b'<valueString value="REDACTED"/></parameter></Parameters>',
        ),
        ("text/yaml", b"password: s\nx: 1\n", b"password: REDACTED\nx: 1\n"),
        ("application/graphql", b'{ a(password: "s") }', b'{ a(password: "REDACTED") }'),
        ("application/x-www-form-urlencoded", b"password=s&x=1", b"password=REDACTED&x=1"),
        ("application/json", b"{not json", None),
        ("application/json", b'{"a":' * 1000 + b"1" + b"}" * 1000, None),
        ("application/octet-stream", b"password=s", None),
    ],
)
def test_a_body_is_recorded_as_sent_but_for_its_credentials(
    content_type: str, body: bytes, expected: bytes | None
) -> None:
    assert redacted_body(body, content_type, frozenset({"password"})) == expected


# --- the inference scenarios end to end, in each format ----------------------------------------


@dataclass
class Scenario:
    """Requests through the proxy in front of the server speaking ``fmt``."""

    http: aiohttp.ClientSession
    proxy: RunningProxy
    upstream: FormatUpstream
    fmt: str
    tag: str
    """Unique to the scenario: its codes and names, so searches find only its data."""

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]

    async def send(
        self, method: str, path: str, resource: dict[str, Any] | None = None, **headers: str
    ) -> tuple[int, str]:
        """The status and X-Request-Id of a request whose body (if any) is in ``fmt``
        and whose answer is asked for in ``fmt``."""
        request_id = f"{self.tag}-{uuid.uuid4().hex[:8]}"
        sent = {"X-Request-Id": request_id, "Accept": self.content_type, **headers}
        body = None
        if resource is not None:
            body = fhir_body(resource, self.fmt)
            sent["Content-Type"] = self.content_type
        async with self.http.request(
            method, URL(f"{self.proxy.url}/{path}", encoded=True), data=body, headers=sent
        ) as r:
            answer = await r.read()
            if body is not None or method == "GET":
                asked = "json" if self.fmt == "json" else self.fmt
                assert asked in r.headers.get("Content-Type", ""), (r.status, answer[:300])
        return r.status, request_id

    async def events(self, request_id: str) -> list[dict[str, Any]]:
        return [e for e in await self.proxy.stored_events() if request_id_of(e) == request_id]

    async def patient(self) -> str:
        """A new Patient, made on the server directly (not a scenario's request)."""
        made = await new_patient(self.http, self.upstream.fhir_base, name=[{"family": self.tag}])
        return f"Patient/{made['id']}"

    async def observation(self, patient: str) -> str:
        """A new Observation about ``patient``, coded with the tag, made directly."""
        async with self.http.post(
            f"{self.upstream.fhir_base}/Observation", json=_obs(patient, self.tag)
        ) as r:
            assert r.status == 201
            return f"Observation/{(await r.json(content_type=None))['id']}"


def _obs(patient: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "urn:test", "code": code}]},
        "subject": {"reference": patient},
    }


def _profiles_and_patients(events: list[dict[str, Any]]) -> list[tuple[str | None, list[str]]]:
    return sorted(((profile(e), patient_refs(e)) for e in events), key=repr)


def _one_query_each(*patients: str) -> list[tuple[str | None, list[str]]]:
    return sorted((("PatientQuery", [p]) for p in patients), key=repr)


async def _create(s: Scenario) -> None:
    patient = await s.patient()
    status, rid = await s.send("POST", "Observation", _obs(patient, s.tag))
    assert status == 201
    (event,) = await s.events(rid)
    assert (profile(event), patient_refs(event)) == ("PatientCreate", [patient])


async def _create_patient(s: Scenario) -> None:
    status, rid = await s.send("POST", "Patient", {"resourceType": "Patient", "active": True})
    assert status == 201
    (event,) = await s.events(rid)
    (created,) = patient_refs(event)
    assert profile(event) == "PatientCreate" and created.startswith("Patient/")


async def _read(s: Scenario) -> None:
    patient = await s.patient()
    observation = await s.observation(patient)
    status, rid = await s.send("GET", observation)
    assert status == 200
    (event,) = await s.events(rid)
    assert (profile(event), patient_refs(event)) == ("PatientRead", [patient])
    data = next(e for e in event["entity"] if e["role"]["code"] == "4")
    assert data["what"]["reference"].startswith(f"{observation}/_history/"), "the version read"


async def _update(s: Scenario) -> None:
    patient = await s.patient()
    observation = await s.observation(patient)
    body = {**_obs(patient, s.tag), "id": observation.split("/")[1], "status": "amended"}
    status, rid = await s.send("PUT", observation, body)
    assert status == 200
    (event,) = await s.events(rid)
    assert (profile(event), patient_refs(event)) == ("PatientUpdate", [patient])


async def _search(s: Scenario, *, by_format_parameter: bool) -> None:
    first, second = await s.patient(), await s.patient()
    for patient in (first, second, second):
        await s.observation(patient)
    query = f"Observation?code={s.tag}"
    if by_format_parameter:
        query += f"&_format={s.content_type.replace('+', '%2B')}"
    status, rid = await s.send(
        "GET", query, Accept="*/*" if by_format_parameter else s.content_type
    )
    assert status == 200
    events = await s.events(rid)
    assert _profiles_and_patients(events) == _one_query_each(first, second)


async def _search_by_format_parameter(s: Scenario) -> None:
    await _search(s, by_format_parameter=True)


async def _search_by_accept(s: Scenario) -> None:
    await _search(s, by_format_parameter=False)


async def _large_search(s: Scenario) -> None:
    """A searchset past 64 KiB waits in a temporary file and is read entry by entry."""
    first, second = await s.patient(), await s.patient()
    entries = [
        {
            "resource": _obs(first if i % 3 else second, s.tag),
            "request": {"method": "POST", "url": "Observation"},
        }
        for i in range(300)
    ]
    async with s.http.post(
        s.upstream.fhir_base,
        json={"resourceType": "Bundle", "type": "batch", "entry": entries},
    ) as r:
        assert r.status == 200
    request_id = f"{s.tag}-large"
    async with s.http.get(
        f"{s.proxy.url}/Observation",
        params={"code": s.tag, "_count": "1000"},
        headers={"Accept": s.content_type, "X-Request-Id": request_id},
    ) as r:
        assert r.status == 200
        assert len(await r.read()) > 64 * 1024, "held in a file, read back for the audit"
    events = await s.events(request_id)
    assert _profiles_and_patients(events) == _one_query_each(first, second)


async def _transaction(s: Scenario) -> None:
    new = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": new,
                "resource": {"resourceType": "Patient", "name": [{"family": s.tag}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": _obs(new, s.tag), "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    status, rid = await s.send("POST", "", bundle)
    assert status == 200
    events = await s.events(rid)
    assert subtypes(events[0]) == ["transaction"] and patient_refs(events[0]) == []
    entries = _profiles_and_patients(events[1:])
    assert [p for p, _ in entries] == ["PatientCreate", "PatientCreate"]
    (created,), (linked,) = (patients for _, patients in entries)
    assert created == linked and created.startswith("Patient/"), "urn:uuid resolved"


async def _batch_with_a_failure(s: Scenario) -> None:
    patient = await s.patient()
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Observation/{uuid.uuid4()}"}},
            {"resource": _obs(patient, s.tag), "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    status, rid = await s.send("POST", "", bundle)
    assert status == 200
    _, failed, created = await s.events(rid)
    assert (failed["outcome"], profile(failed)) == ("4", None)
    assert "not found" in failed["outcomeDesc"].lower()
    assert (profile(created), patient_refs(created)) == ("PatientCreate", [patient])


SCENARIOS: dict[str, Callable[[Scenario], Awaitable[None]]] = {
    "create": _create,
    "create a Patient": _create_patient,
    "read": _read,
    "update": _update,
    "search, _format": _search_by_format_parameter,
    "search, Accept": _search_by_accept,
    "large searchset": _large_search,
    "transaction": _transaction,
    "batch with a failing entry": _batch_with_a_failure,
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_inference_scenario_in_each_format(
    name: str,
    fmt: str,
    fhir_formats: FormatUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(fhir_formats.url)
    tag = f"t{uuid.uuid4().hex[:12]}"
    await SCENARIOS[name](Scenario(http, proxy, fhir_formats, fmt, tag))


def test_the_upstream_really_answers_in_the_format_asked_for() -> None:
    """(The scenarios' upstream is checked in each scenario: every answer's Content-Type
    is the format asked for. Here: its writer writes what its reader reads.)"""
    for fmt in ("xml", "yaml"):
        body = fhir_body(SEARCHSET, fmt)
        assert not body.lstrip().startswith(b"{")
        assert orjson.loads(orjson.dumps(parse_resource(body, CONTENT_TYPES[fmt])))
