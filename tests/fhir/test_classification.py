"""The classifier, table-driven: every R4 REST interaction from method, path, query,
headers and body, plus what is not FHIR (still classified, so it is still audited)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from proxy.fhir.interaction import Interaction, InteractionKind, classify

FORM = {"content-type": "application/x-www-form-urlencoded"}
TX = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []})
BATCH = orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": []})
PARAMS = orjson.dumps({"resourceType": "Parameters", "parameter": []})
JSON_PATCH = b'[{"op":"replace","path":"/active","value":false}]'
FHIRPATH_PATCH = orjson.dumps(
    {
        "resourceType": "Parameters",
        "parameter": [{"name": "operation", "part": [{"name": "type", "valueCode": "delete"}]}],
    }
)


@dataclass(frozen=True)
class Case:
    """One request and what it must be classified as."""

    method: str
    path: str
    kind: InteractionKind
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    rtype: str | None = None
    rid: str | None = None
    vid: str | None = None
    op: str | None = None
    compartment: tuple[str, str] | None = None
    conditional: bool = False
    write: bool = False
    search: tuple[tuple[str, str], ...] | None = None
    """Checked when given."""
    subtype: str | None = "="
    """The restful-interaction code; ``=`` means the kind's own value."""

    @property
    def id(self) -> str:
        q = f"?{self.query}" if self.query else ""
        return f"{self.method} /{self.path}{q}"[:80]


CASES: list[Case] = [
    # --- instance level: read, vread, update, patch, delete -----------------------------
    Case("GET", "Patient/123", InteractionKind.READ, rtype="Patient", rid="123"),
    Case("HEAD", "Patient/123", InteractionKind.READ, rtype="Patient", rid="123"),
    Case("get", "Patient/123", InteractionKind.READ, rtype="Patient", rid="123"),
    Case("GET", "Observation/a-b.c", InteractionKind.READ, rtype="Observation", rid="a-b.c"),
    Case(
        "GET", "Patient/123", InteractionKind.READ, query="_format=json", rtype="Patient", rid="123"
    ),
    Case(
        "GET",
        "Patient/123",
        InteractionKind.READ,
        query="_pretty=true&_format=xml",
        rtype="Patient",
        rid="123",
    ),
    Case("GET", "Patient/123/", InteractionKind.READ, rtype="Patient", rid="123"),
    Case(
        "GET", "Patient/123/_history/4", InteractionKind.VREAD, rtype="Patient", rid="123", vid="4"
    ),
    Case(
        "GET",
        "Observation/9/_history/0f1d6a2e-7f3b-4a55-9d3c-1a2b3c4d5e6f",
        InteractionKind.VREAD,
        rtype="Observation",
        rid="9",
        vid="0f1d6a2e-7f3b-4a55-9d3c-1a2b3c4d5e6f",
    ),
    Case("PUT", "Patient/123", InteractionKind.UPDATE, rtype="Patient", rid="123", write=True),
    Case("PUT", "Encounter/e1", InteractionKind.UPDATE, rtype="Encounter", rid="e1", write=True),
    Case(
        "PATCH",
        "Patient/123",
        InteractionKind.PATCH,
        headers={"content-type": "application/json-patch+json"},
        body=JSON_PATCH,
        rtype="Patient",
        rid="123",
        write=True,
    ),
    Case(
        "PATCH",
        "Patient/123",
        InteractionKind.PATCH,
        headers={"content-type": "application/fhir+json"},
        body=FHIRPATH_PATCH,
        rtype="Patient",
        rid="123",
        write=True,
    ),
    Case("DELETE", "Patient/123", InteractionKind.DELETE, rtype="Patient", rid="123", write=True),
    Case(
        "DELETE",
        "Observation/o1",
        InteractionKind.DELETE,
        rtype="Observation",
        rid="o1",
        write=True,
    ),
    # --- type level: create, conditional create/update/patch/delete, search -------------
    Case("POST", "Patient", InteractionKind.CREATE, rtype="Patient", write=True),
    Case("POST", "Observation", InteractionKind.CREATE, rtype="Observation", write=True),
    Case(
        "POST",
        "Patient",
        InteractionKind.CREATE,
        headers={"if-none-exist": "identifier=http://mrn|42"},
        rtype="Patient",
        conditional=True,
        write=True,
        search=(("identifier", "http://mrn|42"),),
    ),
    Case(
        "PUT",
        "Patient",
        InteractionKind.UPDATE,
        query="identifier=http://mrn|42",
        rtype="Patient",
        conditional=True,
        write=True,
        search=(("identifier", "http://mrn|42"),),
    ),
    Case(
        "DELETE",
        "Observation",
        InteractionKind.DELETE,
        query="subject=Patient/1&code=1234-5",
        rtype="Observation",
        conditional=True,
        write=True,
    ),
    Case(
        "PATCH",
        "Patient",
        InteractionKind.PATCH,
        query="identifier=x|1",
        body=JSON_PATCH,
        rtype="Patient",
        conditional=True,
        write=True,
    ),
    Case(
        "DELETE",
        "",
        InteractionKind.DELETE,
        query="_id=1",
        conditional=True,
        write=True,
        subtype="delete",
    ),
    Case("GET", "Patient", InteractionKind.SEARCH_TYPE, rtype="Patient", search=()),
    Case(
        "GET",
        "Patient",
        InteractionKind.SEARCH_TYPE,
        query="family=smith&given=jo",
        rtype="Patient",
        search=(("family", "smith"), ("given", "jo")),
    ),
    Case(
        "GET",
        "Observation",
        InteractionKind.SEARCH_TYPE,
        query="patient=123&_format=json&_pretty=true",
        rtype="Observation",
        search=(("patient", "123"),),
    ),
    Case(
        "GET",
        "Observation",
        InteractionKind.SEARCH_TYPE,
        query="subject=Patient/123&code=http://loinc.org|8867-4",
        rtype="Observation",
        search=(("subject", "Patient/123"), ("code", "http://loinc.org|8867-4")),
    ),
    Case(
        "GET",
        "Observation",
        InteractionKind.SEARCH_TYPE,
        query="subject%3APatient=123",
        rtype="Observation",
        search=(("subject:Patient", "123"),),
    ),
    Case(
        "GET",
        "Observation",
        InteractionKind.SEARCH_TYPE,
        query="patient.name=smith",
        rtype="Observation",
        search=(("patient.name", "smith"),),
    ),
    Case(
        "GET",
        "Observation",
        InteractionKind.SEARCH_TYPE,
        query="patient.identifier=http://mrn|1",
        rtype="Observation",
    ),
    Case(
        "GET",
        "Observation",
        InteractionKind.SEARCH_TYPE,
        query="_count=20&_offset=20&subject=Patient/1",
        rtype="Observation",
        search=(("_count", "20"), ("_offset", "20"), ("subject", "Patient/1")),
    ),
    Case(
        "GET",
        "Patient",
        InteractionKind.SEARCH_TYPE,
        query="_id=1,2,3",
        rtype="Patient",
        search=(("_id", "1,2,3"),),
    ),
    Case(
        "GET",
        "Patient",
        InteractionKind.SEARCH_TYPE,
        query="_has:Observation:patient:code=1234",
        rtype="Patient",
    ),
    Case(
        "GET",
        "MedicationRequest",
        InteractionKind.SEARCH_TYPE,
        query="_include=MedicationRequest:patient&status=active",
        rtype="MedicationRequest",
    ),
    Case("GET", "Patient/_search", InteractionKind.SEARCH_TYPE, query="name=x", rtype="Patient"),
    Case(
        "POST",
        "Patient/_search",
        InteractionKind.SEARCH_TYPE,
        headers=FORM,
        body=b"family=smith&birthdate=ge1970",
        rtype="Patient",
        search=(("family", "smith"), ("birthdate", "ge1970")),
    ),
    Case(
        "POST",
        "Observation/_search",
        InteractionKind.SEARCH_TYPE,
        query="_count=5",
        headers=FORM,
        body=b"subject=Patient%2F7&_format=json",
        rtype="Observation",
        search=(("_count", "5"), ("subject", "Patient/7")),
    ),
    Case(
        "POST",
        "Observation/_search",
        InteractionKind.SEARCH_TYPE,
        headers={"content-type": "application/x-www-form-urlencoded; charset=utf-8"},
        body=b"code=abc",
        rtype="Observation",
        search=(("code", "abc"),),
    ),
    Case(
        "POST",
        "Observation/_search",
        InteractionKind.SEARCH_TYPE,
        headers={"content-type": "application/json"},
        body=b"subject=Patient/1",
        rtype="Observation",
        search=(),
    ),
    Case(
        "POST", "Observation/_search", InteractionKind.SEARCH_TYPE, rtype="Observation", search=()
    ),
    # --- history -------------------------------------------------------------------------
    Case("GET", "Patient/1/_history", InteractionKind.HISTORY_INSTANCE, rtype="Patient", rid="1"),
    Case(
        "GET",
        "Patient/1/_history",
        InteractionKind.HISTORY_INSTANCE,
        query="_count=10&_since=2026-01-01",
        rtype="Patient",
        rid="1",
        search=(("_count", "10"), ("_since", "2026-01-01")),
    ),
    Case("GET", "Observation/_history", InteractionKind.HISTORY_TYPE, rtype="Observation"),
    Case("GET", "_history", InteractionKind.HISTORY_SYSTEM),
    Case("GET", "_history", InteractionKind.HISTORY_SYSTEM, query="_since=2026-11-01T00:00:00Z"),
    # --- system level: search, capabilities, batch, transaction, paging -----------------
    Case(
        "GET",
        "",
        InteractionKind.SEARCH_SYSTEM,
        query="_type=Patient,Observation&_lastUpdated=gt2026",
    ),
    Case("GET", "", InteractionKind.SEARCH_SYSTEM),
    Case(
        "GET",
        "",
        InteractionKind.SEARCH_SYSTEM,
        query="_getpages=7c2d9a&_getpagesoffset=20&_count=20",
        search=(("_getpages", "7c2d9a"), ("_getpagesoffset", "20"), ("_count", "20")),
    ),
    Case("GET", "_search", InteractionKind.UNKNOWN, subtype=None),
    Case(
        "POST", "_search", InteractionKind.SEARCH_SYSTEM, headers=FORM, body=b"_type=Patient&name=x"
    ),
    Case("GET", "metadata", InteractionKind.CAPABILITIES),
    Case("GET", "metadata", InteractionKind.CAPABILITIES, query="mode=normative&_format=json"),
    Case("HEAD", "metadata", InteractionKind.CAPABILITIES),
    Case("POST", "", InteractionKind.TRANSACTION, body=TX, write=True),
    Case("POST", "/", InteractionKind.TRANSACTION, body=TX, write=True),
    Case("POST", "", InteractionKind.BATCH, body=BATCH, write=True),
    # --- compartments ---------------------------------------------------------------------
    Case(
        "GET",
        "Patient/1/Observation",
        InteractionKind.SEARCH_COMPARTMENT,
        rtype="Observation",
        compartment=("Patient", "1"),
        subtype="search-type",
    ),
    Case(
        "GET",
        "Patient/1/Observation",
        InteractionKind.SEARCH_COMPARTMENT,
        query="code=8867-4",
        rtype="Observation",
        compartment=("Patient", "1"),
        search=(("code", "8867-4"),),
        subtype="search-type",
    ),
    Case(
        "GET",
        "Patient/1/*",
        InteractionKind.SEARCH_COMPARTMENT,
        compartment=("Patient", "1"),
        subtype="search-type",
    ),
    Case(
        "GET",
        "Encounter/e9/Condition",
        InteractionKind.SEARCH_COMPARTMENT,
        rtype="Condition",
        compartment=("Encounter", "e9"),
        subtype="search-type",
    ),
    Case(
        "POST",
        "Patient/1/Observation/_search",
        InteractionKind.SEARCH_COMPARTMENT,
        headers=FORM,
        body=b"code=abc",
        rtype="Observation",
        compartment=("Patient", "1"),
        search=(("code", "abc"),),
        subtype="search-type",
    ),
    Case(
        "GET",
        "Patient/1/Observation/_search",
        InteractionKind.SEARCH_COMPARTMENT,
        rtype="Observation",
        compartment=("Patient", "1"),
        subtype="search-type",
    ),
    # --- operations -------------------------------------------------------------------
    Case("GET", "$export", InteractionKind.OPERATION, op="export", subtype="operation"),
    Case("POST", "$export", InteractionKind.OPERATION, op="export", body=PARAMS, write=True),
    Case("GET", "Patient/$export", InteractionKind.OPERATION, rtype="Patient", op="export"),
    Case(
        "GET", "Group/g1/$export", InteractionKind.OPERATION, rtype="Group", rid="g1", op="export"
    ),
    Case(
        "GET",
        "Patient/1/$everything",
        InteractionKind.OPERATION,
        rtype="Patient",
        rid="1",
        op="everything",
    ),
    Case(
        "POST",
        "Patient/1/$everything",
        InteractionKind.OPERATION,
        rtype="Patient",
        rid="1",
        op="everything",
        body=PARAMS,
        write=True,
    ),
    Case("GET", "Patient/$everything", InteractionKind.OPERATION, rtype="Patient", op="everything"),
    Case(
        "POST",
        "Patient/$validate",
        InteractionKind.OPERATION,
        rtype="Patient",
        op="validate",
        write=True,
    ),
    Case(
        "POST",
        "Observation/o1/$validate",
        InteractionKind.OPERATION,
        rtype="Observation",
        rid="o1",
        op="validate",
        write=True,
    ),
    Case("GET", "Patient/1/$meta", InteractionKind.OPERATION, rtype="Patient", rid="1", op="meta"),
    Case(
        "GET",
        "ValueSet/$expand",
        InteractionKind.OPERATION,
        query="url=http://x",
        rtype="ValueSet",
        op="expand",
    ),
    Case("POST", "$process-message", InteractionKind.OPERATION, op="process-message", write=True),
    Case("GET", "$meta", InteractionKind.OPERATION, op="meta"),
    Case(
        "GET",
        "Patient/$match",
        InteractionKind.OPERATION,
        query="_format=json",
        rtype="Patient",
        op="match",
        search=(),
    ),
    # --- not FHIR: unknown and malformed, still audited ------------------------------
    Case("GET", "Nonsense/1", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "patient/1", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "Patient/1 2", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "Patient/" + "x" * 65, InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "Patient//1", InteractionKind.UNKNOWN, subtype=None),
    Case("OPTIONS", "Patient", InteractionKind.UNKNOWN, subtype=None),
    Case("TRACE", "metadata", InteractionKind.UNKNOWN, subtype=None),
    Case("POST", "", InteractionKind.UNKNOWN, body=b'{"resourceType":"Patient"}', subtype=None),
    Case("POST", "", InteractionKind.UNKNOWN, body=b"{not json", subtype=None),
    Case("POST", "", InteractionKind.UNKNOWN, subtype=None),
    Case(
        "POST",
        "",
        InteractionKind.UNKNOWN,
        body=orjson.dumps({"resourceType": "Bundle", "type": "collection"}),
        subtype=None,
    ),
    Case("PUT", "", InteractionKind.UNKNOWN, subtype=None),
    Case("PUT", "_history", InteractionKind.UNKNOWN, subtype=None),
    Case("DELETE", "metadata", InteractionKind.UNKNOWN, subtype=None),
    Case("POST", "Patient/1", InteractionKind.UNKNOWN, subtype=None),
    Case("PUT", "Patient/_history", InteractionKind.UNKNOWN, subtype=None),
    Case("DELETE", "Patient/_search", InteractionKind.UNKNOWN, subtype=None),
    Case("POST", "Patient/1/_history", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "Patient/1/_history/2/extra", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "Patient/1/NotAType", InteractionKind.UNKNOWN, subtype=None),
    Case("PUT", "Patient/1/Observation", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "$", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "$everything/extra", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "Patient/bad id!/$everything", InteractionKind.UNKNOWN, subtype=None),
    Case("GET", "a/b/c/d/e/f", InteractionKind.UNKNOWN, subtype=None),
]


def test_the_table_is_large_and_has_no_duplicates() -> None:
    assert len(CASES) >= 80
    keys = [(c.method, c.path, c.query, tuple(c.headers.items()), c.body) for c in CASES]
    assert len(keys) == len(set(keys))
    assert {c.kind for c in CASES} == set(InteractionKind), "every kind has a row"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_classify(case: Case) -> None:
    got = classify(case.method, case.path, case.query, case.headers, case.body)
    assert isinstance(got, Interaction)
    assert got.kind is case.kind, got
    assert got.method == case.method.upper()
    if case.kind is InteractionKind.UNKNOWN:
        assert got.detail, "an unknown request says why, for outcomeDesc"
        assert got.restful_code is None
        return
    assert got.detail is None
    assert got.resource_type == case.rtype
    assert got.resource_id == case.rid
    assert got.version_id == case.vid
    assert got.operation == case.op
    assert got.compartment == case.compartment
    assert got.conditional == case.conditional
    assert got.is_write == case.write
    if case.search is not None:
        assert got.search == case.search
    assert all(name not in ("_format", "_pretty") for name, _ in got.search)
    expected_code = case.kind.value if case.subtype == "=" else case.subtype
    assert got.restful_code == expected_code


_GARBAGE_PATHS = [
    "\x00",
    "Patient/\udcff",
    "%%%%",
    "Patient/1/_history/\n",
    "Patient/" + "9" * 10_000,
    "Patient/1/$",
]
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "BREW", ""]


@pytest.mark.parametrize("path", _GARBAGE_PATHS)
@pytest.mark.parametrize("method", _METHODS)
def test_garbage_paths_are_unknown_attributed_to_no_resource_and_not_writes(
    method: str, path: str
) -> None:
    """Paths that name no FHIR interaction (a NUL, a lone surrogate, bad escapes, a newline
    in a version, an id over 64 characters, an empty operation name) are UNKNOWN: no
    resource or patient is attributed from them, no subtype is claimed."""
    got = classify(method, path, "a=%ZZ&&=&b", {"content-type": FORM["content-type"]}, b"\xff\xfe")
    assert got.kind is InteractionKind.UNKNOWN
    assert got.method == method
    assert (got.resource_type, got.resource_id, got.version_id) == (None, None, None)
    assert got.restful_code is None
    assert not got.is_write


@pytest.mark.parametrize(
    ("method", "kind", "write"),
    [
        ("GET", InteractionKind.SEARCH_SYSTEM, False),
        ("POST", InteractionKind.UNKNOWN, False),
        ("PUT", InteractionKind.UNKNOWN, False),
        ("DELETE", InteractionKind.DELETE, True),
        ("BREW", InteractionKind.UNKNOWN, False),
    ],
)
def test_a_path_of_slashes_is_the_base(method: str, kind: InteractionKind, write: bool) -> None:
    """Fifty slashes are the base: a system search, or a system-level conditional DELETE
    (a write, so an intent is committed before it is forwarded)."""
    got = classify(method, "/" * 50, "a=%ZZ&&=&b", {"content-type": FORM["content-type"]}, None)
    assert (got.kind, got.is_write, got.resource_type) == (kind, write, None)


@pytest.mark.parametrize("method", _METHODS)
def test_an_operation_of_dollars_is_named_as_sent(method: str) -> None:
    """``$$$...`` is a system operation by that name; by POST it counts as a write, and a
    method that cannot invoke an operation makes it UNKNOWN."""
    got = classify(method, "$" * 100, "", {}, None)
    if method in ("", "BREW"):
        assert got.kind is InteractionKind.UNKNOWN and got.operation is None
        return
    assert got.kind is InteractionKind.OPERATION
    assert got.operation and not got.operation.strip("$")
    assert got.is_write == (method == "POST")


def test_post_operation_on_form_body_is_a_write_but_get_is_not() -> None:
    get: Any = classify("GET", "Patient/1/$everything", "", {}, None)
    post: Any = classify("POST", "Patient/1/$everything", "", {}, PARAMS)
    assert not get.is_write and post.is_write


def test_a_search_body_without_content_type_is_not_read_as_form_parameters() -> None:
    """Only a form-encoded body holds search parameters; one without Content-Type is
    classified all the same, with none read from it."""
    bare: Any = classify("POST", "Patient/_search", "", {}, b"name=x")
    form: Any = classify("POST", "Patient/_search", "", FORM, b"name=x")
    assert (bare.kind, bare.search) == (InteractionKind.SEARCH_TYPE, ())
    assert (form.kind, form.search) == (InteractionKind.SEARCH_TYPE, (("name", "x"),))


def test_blank_search_parameters_are_kept() -> None:
    """``name=`` is a parameter the client sent; the event records it."""
    got: Any = classify("GET", "Patient", "name=&_count=1", {}, None)
    assert (got.kind, got.search) == (InteractionKind.SEARCH_TYPE, (("name", ""), ("_count", "1")))


@pytest.mark.parametrize(
    ("method", "path", "detail"),
    [
        ("BREW", "Patient", "unsupported HTTP method BREW"),
        ("GET", "Patient//1", "empty path segment"),
        ("GET", "\x00", "unknown resource type '\\x00'"),
    ],
)
def test_unknown_requests_say_why(method: str, path: str, detail: str) -> None:
    """An UNKNOWN interaction keeps the method sent and says why it is unknown (the
    event's description)."""
    got: Any = classify(method, path, "", {}, None)
    assert (got.kind, got.method, got.detail) == (InteractionKind.UNKNOWN, method, detail)


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "expected"),
    [
        ("GET", "", "a=1", None, (InteractionKind.SEARCH_SYSTEM, None, (("a", "1"),), False, None)),
        (
            "DELETE",
            "",
            "",
            None,
            (
                InteractionKind.UNKNOWN,
                None,
                (),
                False,
                "DELETE on the base is not a FHIR interaction",
            ),
        ),
        (
            "DELETE",
            "",
            "identifier=x",
            None,
            (InteractionKind.DELETE, None, (("identifier", "x"),), True, None),
        ),
        (
            "GET",
            "_history",
            "_since=2020",
            None,
            (InteractionKind.HISTORY_SYSTEM, None, (("_since", "2020"),), False, None),
        ),
        (
            "POST",
            "_search",
            "a=1",
            b"b=2",
            (InteractionKind.SEARCH_SYSTEM, None, (("a", "1"), ("b", "2")), False, None),
        ),
        ("GET", "$x", "p=1", None, (InteractionKind.OPERATION, "x", (("p", "1"),), False, None)),
        (
            "GET",
            "$",
            "",
            None,
            (InteractionKind.UNKNOWN, None, (), False, "malformed system operation path"),
        ),
        (
            "PUT",
            "_history",
            "",
            None,
            (InteractionKind.UNKNOWN, None, (), False, "PUT on _history"),
        ),
        (
            "PUT",
            "metadata",
            "",
            None,
            (InteractionKind.UNKNOWN, None, (), False, "PUT on metadata"),
        ),
        ("GET", "_search", "", None, (InteractionKind.UNKNOWN, None, (), False, "GET on _search")),
    ],
)
def test_system_level_requests_keep_their_parameters(
    method: str, path: str, query: str, body: bytes | None, expected: tuple[Any, ...]
) -> None:
    """Interactions on the base: a conditional DELETE needs parameters, a system search
    reads form parameters too, a one-letter operation is an operation; what is none of
    these says why."""
    got: Any = classify(method, path, query, FORM, body)
    assert (got.kind, got.operation, got.search, got.conditional, got.detail) == expected
