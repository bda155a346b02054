"""The builder's rows: for every interaction kind, outcome, identity, FHIR version and
event shape, the index columns the builder makes beside an event are the ones the store's
own reader (``event_row``, used for events from outside) finds in that event."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admin.access import build_access_events
from proxy.admin.auth import AdminCaller
from proxy.audit.balp import (
    AuditContext,
    BuildOptions,
    _audited,
    _instant,
    build_events,
    form_encoded,
    interaction_events,
)
from proxy.audit.identity import Identity
from proxy.audit.intents import (
    STORE_FULL_OUTCOME_DESC,
    build_unknown_outcome_events,
    intent_summary,
)
from proxy.audit.rows import (
    Built,
    BuiltEvent,
    FannedEvent,
    recorded_ts,
    store_entries,
    store_rows,
)
from proxy.audit.validate import validate_event
from proxy.exchange import Exchange
from proxy.fhir.interaction import Interaction, InteractionKind
from proxy.log.entry import entry_of
from proxy.log.tree import leaf_hash
from proxy.store.index import event_row
from proxy.store.leaves import template_leaves
from proxy.store.marks import ADMIN_ACCESS_TAG
from proxy.store.records import FanOut
from tests.factories import NOW, context, exchange, patients_of, unsigned_jwt

CLAIMS = {
    "sub": "u1",
    "name": "Ann",
    "jti": "jti-1",
    "client_id": "app",
    "iss": "https://idp.example.org",
    "fhirUser": "Practitioner/pr1",
    "purpose_of_use": ["TREAT"],
}
JWT = {"Authorization": f"Bearer {unsigned_jwt(CLAIMS)}"}
OPAQUE = {"Authorization": "Bearer opaque-token-0123456789abcdef"}
OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "meta": {"versionId": "2", "security": [{"system": "s", "code": "R", "display": "r"}]},
    "status": "final",
    "code": {"text": "pulse"},
    "subject": {"reference": "Patient/p1"},
}
PATIENT = {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3"}}
NOT_FOUND = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "not-found", "diagnostics": "gone"}],
}


def _searchset(patients: int) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {**OBS, "id": f"o{n}", "subject": {"reference": f"Patient/p{n}"}}}
            for n in range(patients)
        ],
    }


def _bundle(kind: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"request": {"method": "GET", "url": "Patient/p1"}},
            {"resource": OBS, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "DELETE", "url": "Observation/o9"}},
        ],
    }


def _bundle_response(kind: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": f"{kind}-response",
        "entry": [
            {"resource": PATIENT, "response": {"status": "200 OK"}},
            {"response": {"status": "201 Created", "location": "Observation/o1/_history/1"}},
            {"response": {"status": "404 Not Found", "outcome": NOT_FOUND}},
        ],
    }


@dataclass(frozen=True)
class Case:
    """One request and the upstream's answer."""

    kind: InteractionKind
    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    response: Any = None
    response_headers: dict[str, str] = field(default_factory=dict)

    def exchange(self, **overrides: Any) -> Exchange:
        fields: dict[str, Any] = {
            "query": self.query,
            "headers": {**JWT, "Accept": "application/fhir+json", **self.headers},
            "body": self.body,
            "response": self.response,
            "response_headers": self.response_headers,
            "request_id": f"rid-{self.kind.value}",
        }
        fields.update(overrides)
        return exchange(self.method, self.path, **fields)


FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CASES = [
    Case(InteractionKind.READ, "GET", "Patient/p1", response=PATIENT),
    Case(InteractionKind.VREAD, "GET", "Observation/o1/_history/2", response=OBS),
    Case(
        InteractionKind.CREATE,
        "POST",
        "Observation",
        body=OBS,
        response=OBS,
        response_headers={"Location": "http://server.example.com/fhir/Observation/o1/_history/1"},
    ),
    Case(InteractionKind.UPDATE, "PUT", "Observation/o1", body=OBS, response=OBS),
    Case(
        InteractionKind.PATCH,
        "PATCH",
        "Patient/p1",
        headers={"Content-Type": "application/json-patch+json"},
        body=b'[{"op":"replace","path":"/active","value":false}]',
        response=PATIENT,
    ),
    Case(InteractionKind.DELETE, "DELETE", "Observation/o1"),
    Case(
        InteractionKind.SEARCH_TYPE,
        "GET",
        "Observation",
        query="code=8867-4",
        response=_searchset(7),
    ),
    Case(InteractionKind.SEARCH_SYSTEM, "GET", "", query="_type=Patient", response=_searchset(2)),
    Case(
        InteractionKind.SEARCH_COMPARTMENT, "GET", "Patient/p1/Observation", response=_searchset(1)
    ),
    Case(InteractionKind.HISTORY_INSTANCE, "GET", "Patient/p1/_history", response=_searchset(0)),
    Case(InteractionKind.HISTORY_TYPE, "GET", "Patient/_history", response=_searchset(0)),
    Case(InteractionKind.HISTORY_SYSTEM, "GET", "_history", response=_searchset(0)),
    Case(
        InteractionKind.CAPABILITIES,
        "GET",
        "metadata",
        response={"resourceType": "CapabilityStatement"},
    ),
    Case(InteractionKind.OPERATION, "GET", "Patient/p1/$everything", response=_searchset(1)),
    Case(
        InteractionKind.BATCH, "POST", "", body=_bundle("batch"), response=_bundle_response("batch")
    ),
    Case(
        InteractionKind.TRANSACTION,
        "POST",
        "",
        body=_bundle("transaction"),
        response=_bundle_response("transaction"),
    ),
    Case(InteractionKind.UNKNOWN, "GET", "Patient//p1"),
    # A search posted as a form: its body is part of the recorded query.
    Case(
        InteractionKind.SEARCH_TYPE,
        "POST",
        "Observation/_search",
        headers=FORM,
        body=b"patient=Patient/p1&code=8867-4",
        response=_searchset(1),
    ),
    # A request longer than an entity's query keeps: cut, with its digest in the description.
    Case(
        InteractionKind.SEARCH_TYPE,
        "GET",
        "Observation",
        query="code=" + "x" * 5000,
        response=_searchset(1),
    ),
]
FAILURES: list[dict[str, Any]] = [
    {"status": 404, "response": NOT_FOUND},
    {"status": 403, "response": None},
    {"status": 502, "response": None},
    {"status": None, "response": None, "error": "upstream timed out"},
]
# A token claiming emergency treatment: its events carry the break-glass mark.
BREAK_GLASS = {"Authorization": f"Bearer {unsigned_jwt({**CLAIMS, 'purpose_of_use': ['ETREAT']})}"}
IDENTITIES: list[dict[str, str]] = [JWT, OPAQUE, {"Authorization": ""}, BREAK_GLASS]
CONTEXTS: dict[str, AuditContext] = {
    "R4": context(),
    "R5": context(fhir_version="R5"),
    "R4-minimal": context(identity={"token_pattern": "minimal"}),
    "R4-opaque": context(identity={"token_pattern": "opaque"}),
    "R4-many-patients": context(max_patient_events=3, max_patients_listed=5),
    "R5-many-patients": context(fhir_version="R5", max_patient_events=3, max_patients_listed=5),
}


def assert_rows_match(built: Sequence[Built]) -> None:
    assert built
    for item in built:
        event, row = item.event, item.row
        assert row._asdict() == event_row(event)._asdict()
        assert orjson.loads(row.body) == event
        # The entry the writer joins from the encoding's template, by the event's row, is
        # the log's own definition of it (RFC 8785 JSON of the event without meta); None
        # leaves the writer to make it from the JSON.
        if item.entry is not None:
            assert template_leaves(item.entry, None, row) == [leaf_hash(entry_of(event))], event
    rows = store_rows(built)
    templates = store_entries(built) or [None] * len(rows)
    assert len(templates) == len(rows)
    for new, template in zip(rows, templates, strict=True):
        if isinstance(new, FanOut) and template is not None:
            events = [orjson.loads(new.event(i)[1]) for i in range(len(new.patients))]
            leaves = template_leaves(template, len(new.patients), new.stored())
            assert leaves == [leaf_hash(entry_of(e)) for e in events]


def test_the_table_covers_every_interaction_kind() -> None:
    assert {case.kind for case in CASES} == set(InteractionKind)
    for case in CASES:
        interaction = case.exchange().interaction
        assert interaction is not None and interaction.kind is case.kind, case


def _cases() -> Iterator[Any]:
    for case in CASES:
        for name in CONTEXTS:
            yield pytest.param(case, name, id=f"{case.kind.value}-{case.method}-{name}")


@pytest.mark.parametrize(("case", "ctx_name"), list(_cases()))
def test_rows_of_successes_failures_and_every_identity_match_the_events(
    case: Case, ctx_name: str
) -> None:
    ctx = CONTEXTS[ctx_name]
    for identity in IDENTITIES:
        assert_rows_match(build_events(case.exchange(headers=identity), ctx, NOW))
    for failure in FAILURES:
        assert_rows_match(build_events(case.exchange(**failure), ctx, NOW))
    # The trace of the request is on the stored event, and the row is still its own.
    traced = build_events(case.exchange(), ctx, NOW, traceparent=f"00-{'1' * 32}-{'2' * 16}-01")
    assert_rows_match(traced)
    assert all(b"traceparent" in item.row.body for item in traced)


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.kind.value}-{case.method}")
def test_events_serialized_from_their_parts_are_those_built_as_dicts(case: Case) -> None:
    """An R4 event without tags is written from its serialized parts; with a tag it is
    made as a dict and serialized whole. Tag aside, the two are the same event, for
    every kind of interaction, identity and failure."""
    tag = {"system": "urn:test", "code": "t"}
    variants: list[dict[str, Any]] = [{"headers": identity} for identity in IDENTITIES]
    variants += FAILURES
    for variant in variants:
        plain = build_events(case.exchange(**variant), context(), NOW, traceparent=None)
        tagged = build_events(case.exchange(**variant), context(), NOW, tags=(tag,))
        assert len(plain) == len(tagged)
        for one, other in zip(plain, tagged, strict=True):
            event, dict_made = one.event, other.event
            meta = dict_made.pop("meta")
            assert meta.pop("tag") == [tag]
            if meta:
                dict_made["meta"] = meta
            event.pop("id"), dict_made.pop("id")
            assert event == dict_made, variant


def test_instants_are_written_as_isoformat_writes_them() -> None:
    """``_instant`` (one second's start written once) and ``recorded_ts`` (integer
    milliseconds) against ``isoformat`` and ``timestamp`` of the time cut to the
    millisecond, for UTC, other offsets and naive times, before and after 1970."""
    rng = random.Random(7)
    zones = [UTC, None, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    for _ in range(20_000):
        at = datetime(1900, 1, 1, tzinfo=UTC) + timedelta(
            microseconds=rng.randrange(250 * 365 * 86_400 * 10**6)
        )
        zone = rng.choice(zones)
        at = at.astimezone(zone).replace(tzinfo=None) if zone is None else at.astimezone(zone)
        assert _instant(at) == at.isoformat(timespec="milliseconds")
        cut = at.replace(microsecond=at.microsecond - at.microsecond % 1000)
        expected = (cut if cut.tzinfo is not None else cut.replace(tzinfo=UTC)).timestamp()
        assert recorded_ts(at) == expected


def test_many_patients_make_one_event_whose_row_lists_those_it_names() -> None:
    search = CASES[6].exchange()
    (built,) = build_events(search, CONTEXTS["R4-many-patients"], NOW)
    assert built.row.patients == "|" + "|".join(f"Patient/p{n}" for n in range(5)) + "|"
    assert_rows_match([built])


def test_events_before_now_are_recorded_at_now() -> None:
    ex = CASES[0].exchange()
    later = NOW.replace(microsecond=123_456)
    (built,) = build_events(ex, context(), later)
    assert built.row.recorded == "2020-04-29T09:49:00.123+00:00"
    assert_rows_match([built])


@pytest.mark.parametrize("version", ["R4", "R5"])
@pytest.mark.parametrize(
    "kind",
    [
        InteractionKind.CREATE,
        InteractionKind.UPDATE,
        InteractionKind.PATCH,
        InteractionKind.DELETE,
        InteractionKind.TRANSACTION,
    ],
)
def test_rows_of_outcome_unknown_events_match_the_events(
    version: str, kind: InteractionKind
) -> None:
    case = next(c for c in CASES if c.kind is kind)
    ex = case.exchange(status=None, response=None)
    ex.prior_patients = ("Patient/p9",)
    summary = orjson.loads(orjson.dumps(intent_summary(ex)))  # as stored
    ctx = context(fhir_version=version)
    for description in ({}, {"description": STORE_FULL_OUTCOME_DESC}):
        built = build_unknown_outcome_events(summary, ctx, NOW, **description)
        assert_rows_match(built)
        assert {item.row.outcome for item in built} == {"8"}


@pytest.mark.parametrize("version", ["R4", "R5"])
@pytest.mark.parametrize("patient", [None, "Patient/p1"])
def test_rows_of_admin_access_events_match_the_events(version: str, patient: str | None) -> None:
    search = (("patient", patient),) if patient else ()
    built = build_access_events(
        caller=AdminCaller(identity=Identity(token_kind="jwt", user_id="auditor")),
        interaction=Interaction(
            kind=InteractionKind.SEARCH_TYPE,
            method="GET",
            resource_type="AuditEvent",
            search=search,
        ),
        method="GET",
        path="AuditEvent",
        query_string=f"patient={patient}" if patient else "",
        request_id="rid-admin",
        client_address="10.0.0.1",
        base_url="http://admin.example.org",
        status=200,
        ctx=context(fhir_version=version),
        now=NOW,
    )
    assert_rows_match(built)
    for item in built:
        assert ADMIN_ACCESS_TAG in item.event["meta"]["tag"]


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_the_trace_is_a_valid_detail_of_the_x_request_id_entity(version: str) -> None:
    traceparent = f"00-{'1' * 32}-{'2' * 16}-01"
    ctx = context(fhir_version=version)
    (built,) = build_events(CASES[0].exchange(), ctx, NOW, traceparent=traceparent)
    event, row = built.event, built.row
    assert validate_event(event, version) is None
    (detail,) = [d for e in event["entity"] for d in e.get("detail", ())]
    assert detail["valueString"] == traceparent
    assert row.request_id == "rid-read", "admin search finds R5 events by request id too"


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_validating_events_leaves_the_fragments_they_share_as_built(version: str) -> None:
    """Events of one exchange, and of one client's exchanges, share fragments (agents,
    entities): the sampled validation reads them after the rows are made, and must not
    change what the next event is built from."""
    ctx = context(fhir_version=version)
    first = build_events(CASES[6].exchange(), ctx, NOW)
    for item in first:
        assert validate_event(item.event, version) is None
    second = build_events(CASES[6].exchange(), ctx, NOW)
    for item, other in zip(first, second, strict=True):
        assert orjson.loads(item.row.body) == item.event
        assert item.event["agent"] == other.event["agent"]


def test_the_events_of_several_patients_reach_the_store_as_one_fan_out() -> None:
    """An R4 search about seven patients: seven events, handed to the store as one
    FanOut whose rows are the events' own (ids distinct, one patient each)."""
    built = build_events(CASES[6].exchange(), context(), NOW)
    assert len(built) == 7
    assert {type(item) for item in built} == {FannedEvent}
    (fan,) = store_rows(built)
    assert isinstance(fan, FanOut) and fan.rows() == [item.row for item in built]
    assert len({row.event_id for row in fan.rows()}) == 7
    assert [patients_of(item.event) for item in built] == [[f"Patient/p{n}"] for n in range(7)]
    assert_rows_match(built)


def test_events_a_fan_out_cannot_express_are_built_one_by_one() -> None:
    """R5 events are converted one by one, and a version-specific patient reference has
    terms of its own: each such event is built and handed over whole."""
    built = build_events(CASES[6].exchange(), context(fhir_version="R5"), NOW)
    assert len(built) == 7 and {type(item) for item in built} == {BuiltEvent}
    assert_rows_match(built)
    ex = CASES[6].exchange()
    versioned = _audited(ex)._replace(patients=("Patient/p1/_history/3", "Patient/p2"))
    built = interaction_events(ex, versioned, context(), NOW, options=BuildOptions.of(context()))
    assert [patients_of(item.event) for item in built] == [[p] for p in versioned.patients]
    assert {type(item) for item in built} == {BuiltEvent}
    assert_rows_match(built)


@given(
    st.lists(
        st.tuples(
            st.text(alphabet=st.sampled_from("aZ09_.~- &=+%/?:é€\x00\n"), max_size=8),
            st.text(max_size=8),
        ),
        max_size=4,
    )
)
@settings(max_examples=300, deadline=None)
def test_a_query_entity_encodes_search_parameters_as_urlencode_does(
    pairs: list[tuple[str, str]],
) -> None:
    assert form_encoded(pairs) == urlencode(pairs)


def test_the_builder_gives_the_entry_parts_of_every_r4_event_of_the_table() -> None:
    # The store's writer parses an R4 event again only where the builder could not give
    # its entry's parts: for the R4 events of every case, context and identity above, it
    # gave them (and assert_rows_match checks each entry against the log's definition).
    for case in CASES:
        for ctx in CONTEXTS.values():
            for identity in IDENTITIES:
                built = build_events(case.exchange(headers=identity), ctx, NOW)
                templates = store_entries(built)
                if ctx.fhir_version == "R4":
                    assert templates is not None and None not in templates, (case, ctx)


NASTY = st.text(
    alphabet=st.sampled_from(['"', "\\", ":", ",", "[", "1", "-", "0", "é", "\u2028", "😀", "a"]),
    max_size=12,
)


@given(query=NASTY, user=NASTY, request_id=NASTY, reason=NASTY)
@settings(max_examples=200, deadline=None)
def test_entries_of_events_holding_what_a_client_chose_are_the_log_s_or_left_to_the_writer(
    query: str, user: str, request_id: str, reason: str
) -> None:
    # What a client puts in a query, a token, a request id or an error can look like a
    # number to the builder's test (":1", ",-0", "[1"), escape, or be outside ASCII: the
    # entry joined from its parts is the log's own, or the writer makes it from the JSON.
    token = unsigned_jwt({**CLAIMS, "name": user, "sub": user or "u"})
    headers = {"Authorization": f"Bearer {token}", "X-Request-Id": request_id or "r"}
    search = Case(InteractionKind.SEARCH_TYPE, "GET", "Observation", response=_searchset(3))
    for ctx in (CONTEXTS["R4"], CONTEXTS["R5"]):
        assert_rows_match(
            build_events(
                search.exchange(headers=headers, query=urlencode({"code": query})), ctx, NOW
            )
        )
        failed = search.exchange(headers=headers, status=None, response=None, error=reason or "x")
        assert_rows_match(build_events(failed, ctx, NOW))
