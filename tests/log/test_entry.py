"""The log entry: RFC 8785 canonical JSON of the event without ``meta`` and its position.
The fast path (orjson with sorted keys) writes exactly what the RFC 8785 library writes,
every code point included; numbers it would write otherwise go to the library."""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.log.entry import (
    canonical_json,
    entry_of,
    entry_of_json,
    position_of,
    with_position,
    without_position,
)
from tests.factories import audit_event


def test_every_code_point_is_written_as_rfc_8785_writes_it() -> None:
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    for at in range(0, len(chars), 4096):
        chunk = "".join(chars[at : at + 4096])
        assert canonical_json({"k": chunk}) == rfc8785.dumps({"k": chunk})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_json_is_rfc_8785(value: Any) -> None:
    def as_doubles(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: as_doubles(x) for k, x in v.items()}
        if isinstance(v, list):
            return [as_doubles(x) for x in v]
        return float(v) if type(v) is int and abs(v) >= 2**53 else v

    assert canonical_json(value) == rfc8785.dumps(as_doubles(value))
    event = {"resourceType": "AuditEvent", "value": value, "ключ": value}
    assert entry_of_json(orjson.dumps(event)) == entry_of(event)
    del event["ключ"]
    assert entry_of_json(orjson.dumps(event)) == entry_of(event)
    assert entry_of_json(orjson.dumps(event, option=orjson.OPT_INDENT_2)) == entry_of(event)
    assert entry_of_json(json.dumps(event, indent=1).encode()) == entry_of(event)


def test_keys_written_as_escapes_are_ordered_as_rfc_8785_orders_them() -> None:
    """ASCII bytes can still hold keys outside ASCII (``\\u`` escapes); JCS orders keys by
    UTF-16 code units, so a key past the BMP comes before U+FFFF."""
    for body in (
        rb'{"resourceType":"AuditEvent","\ud83d\ude00":"a","\uffff":"b"}',
        rb'{"resourceType":"AuditEvent","\ud83d\ude00":"a","\uffff":"b","n":[1]}',
    ):
        assert body.isascii()
        assert entry_of_json(body) == entry_of(orjson.loads(body))


def test_the_entry_leaves_out_meta_and_the_position_only() -> None:
    event = audit_event(1, meta={"versionId": "3", "lastUpdated": "2026-12-01T00:00:00Z"})
    event["extension"] = [{"url": "http://example.org/other", "valueString": "kept"}]
    shipped = with_position(event, "audit.example.org/x/0a", 2**40)
    assert position_of(shipped) == ("audit.example.org/x/0a", 2**40)
    assert shipped["extension"][0] == event["extension"][0], "other extensions stay"
    assert entry_of(shipped) == entry_of(event)
    reserialized = orjson.loads(orjson.dumps(dict(reversed(list(shipped.items())))))
    reserialized["meta"] = {"versionId": "1", "lastUpdated": "2027-01-01T00:00:00Z"}
    assert entry_of(reserialized) == entry_of(event)
    bare = without_position(with_position(audit_event(2), "o", 1))
    assert "extension" not in bare and "meta" not in bare
    event["outcome"] = "4"
    assert entry_of(event) != entry_of(shipped), "every other element is covered"


def test_numbers_orjson_writes_otherwise_are_found_wherever_they_stand() -> None:
    """The fast path is taken only where orjson's sorted output is RFC 8785: a number
    with a fraction or an exponent, as a member, first or later in an array, negative,
    or an integer past 2**53 or past 2**64, each sends the entry the slow way; strings
    that look like numbers (a timestamp, a quoted member) change nothing."""
    values: list[Any] = [
        1.5,
        -0.25,
        1e21,
        1e-7,
        [1.0],
        ["a", 2.5],
        [1, -3e5],
        {"x": 0.1},
        2**53,
        -(2**60),
    ]
    for value in values:
        event: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "n": value,
            "recorded": "2026-12-05T12:00:00.5Z",
        }
        expected = rfc8785.dumps(
            event if not isinstance(value, int) else {**event, "n": float(value)}
        )
        assert entry_of_json(orjson.dumps(event)) == expected, value
    big = b'{"resourceType":"AuditEvent","n":123456789012345678901234567890}'
    assert entry_of_json(big) == rfc8785.dumps(
        {"n": float(123456789012345678901234567890), "resourceType": "AuditEvent"}
    )
    lookalike: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "period": {"start": "2026-12-05T12:00:00.000+00:00"},
        "description": '{"a":1.5,"b":[2.5,3e4]}',
        "n": 7,
    }
    assert entry_of_json(orjson.dumps(lookalike)) == rfc8785.dumps(lookalike)
