"""The log entry of an AuditEvent, and the extension that tells its place in the log.

**The entry is the RFC 8785 (JCS) canonical JSON of the event without its ``meta`` and
without the log-position extension.** An auditor recomputes it from the event as a FHIR
repository holds it: the repository re-serializes the JSON (key order, spacing, number
forms, which JCS makes one) and sets ``meta`` (``versionId``, ``lastUpdated``, sometimes
``source``), which is therefore left out, together with the position extension the proxy
adds when it ships the event. What ``meta`` holds besides (the BALP profile claimed, the
proxy's tags) is not covered by the log.

The position is a complex extension on the AuditEvent, :data:`POSITION_URL`, with
``origin`` (the checkpoint origin of the shard's log) and ``index`` (the leaf index, in
decimal: a 32-bit ``valueInteger`` would not last). Removing it: drop that one entry from
``extension``, and ``extension`` itself if nothing is left.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson
import rfc8785

POSITION_URL = "urn:fhir-audit-proxy:log-position"
"""The extension that carries an event's origin and leaf index."""

_SAFE_INTEGER = 2**53
"""JCS numbers are IEEE doubles: integers beyond this are not written as they are."""


def _needs_full_canonicalization(value: Any) -> bool:
    """Whether ``value`` holds what orjson does not write as RFC 8785 does: a float (ES6
    number formatting), an integer beyond 2**53 (written as a double), a key outside
    ASCII (JCS sorts keys by UTF-16 code units, orjson by code points). Strings, small
    integers, booleans and null orjson writes exactly as JCS (tests check every code
    point)."""
    kind = type(value)
    if kind is dict:
        if not "".join(value).isascii():
            return True
        items = value.values()
    elif kind is list:
        items = value
    else:
        return kind is float or (kind is int and not -_SAFE_INTEGER < value < _SAFE_INTEGER)
    for item in items:
        t = type(item)
        if t is str:
            continue
        if t is dict or t is list:
            if _needs_full_canonicalization(item):
                return True
        elif t is float or (t is int and not -_SAFE_INTEGER < item < _SAFE_INTEGER):
            return True
    return False


def _token_table() -> bytes:
    table = bytearray(b"x" * 256)
    table[ord('"')] = ord("q")
    table[ord(":")] = ord("c")
    for c in b"[,":
        table[c] = ord("a")
    for c in b"-0123456789":
        table[c] = ord("d")
    return bytes(table)


_TOKENS = _token_table()
"""Each byte as what it may be in compact JSON: a quote, a colon, what precedes a list
item, what may begin a number; anything else."""


def sorted_json_is_canonical(json_text: bytes) -> bool:
    """Whether ``json_text``, as ``orjson.dumps(value, option=orjson.OPT_SORT_KEYS)``
    wrote it for a value whose keys are ASCII, is the value's RFC 8785 form: when it holds
    no number (JCS writes floats, and integers beyond 2**53, otherwise). A number in
    compact JSON begins after a key's ``":``, or after ``[`` or ``,`` in a list; the same
    bytes inside a string (``"a\\":1"``, ``"1,2"``) make this say False too, which sends
    the value to :func:`canonical_json`: slower, never wrong."""
    tokens = json_text.translate(_TOKENS)
    return b"qcd" not in tokens and b"ad" not in tokens


class EntryTemplate(NamedTuple):
    """The log entries of events that differ only in their id and the patients they name,
    as parts in RFC 8785 form (keys sorted), which the store's writer joins for each
    event: ``head``, then each patient's entity (``patient_before``, the reference as a
    JSON string, ``patient_after``, ``,``), then ``tail``, the id as a JSON string,
    ``after``. The builder makes one for the events of an interaction
    (:mod:`proxy.audit.encoding`) where it can: the entry it gives is the one
    :func:`entry_of` makes of each event (the builder's tests hold every event to it)."""

    head: bytes
    """Up to the entities' ``[``: ``{"action":…,"agent":[…],"entity":[``."""
    patient_before: bytes
    patient_after: bytes
    tail: bytes
    """The entities after the patients', the list's end, up to the id's value:
    ``{…},{…}],"id":``."""
    after: bytes
    """From the id's value on: ``,"outcome":…}``."""

    def entry(self, event_id: str, patients: Sequence[str]) -> bytes:
        """The entry of the event ``event_id`` naming ``patients`` (in its order)."""
        parts = [self.head]
        for p in patients:
            parts += (self.patient_before, orjson.dumps(p), self.patient_after, b",")
        parts += (self.tail, orjson.dumps(event_id), self.after)
        return b"".join(parts)

    def one_patient_leaves(self, event_ids: Sequence[str], patients: Sequence[str]) -> list[bytes]:
        """The leaf hashes of events that name one patient each (``event_ids[i]`` names
        ``patients[i]``, a fan-out's): their entries as :meth:`entry` joins them, the
        hash of the head they share made once."""
        head = hashlib.sha256(b"\x00" + self.head + self.patient_before)
        middle = self.patient_after + b"," + self.tail
        out = []
        for event_id, p in zip(event_ids, patients, strict=True):
            h = head.copy()
            h.update(b"".join((orjson.dumps(p), middle, orjson.dumps(event_id), self.after)))
            out.append(h.digest())
        return out


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON of ``value``. Integers beyond 2**53 are written as the
    double JSON parsers read them as."""
    if not _needs_full_canonicalization(value):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return rfc8785.dumps(_as_doubles(value))


def _as_doubles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_doubles(v) for v in value]
    if type(value) is int and not -_SAFE_INTEGER < value < _SAFE_INTEGER:
        return float(value)
    return value


def without_position(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` (not changed) without ``meta`` and without the position extension."""
    out = {k: v for k, v in event.items() if k != "meta"}
    extensions = out.get("extension")
    if isinstance(extensions, list):
        kept = [x for x in extensions if not (isinstance(x, dict) and x.get("url") == POSITION_URL)]
        if kept:
            out["extension"] = kept
        else:
            del out["extension"]
    return out


def entry_of(event: dict[str, Any]) -> bytes:
    """The log entry of an AuditEvent (the module's definition)."""
    return canonical_json(without_position(event))


class _NotPlain(Exception):
    """The JSON holds what orjson does not write as JCS."""


def _refuse(_: str) -> Any:
    raise _NotPlain


def _safe_integer(text: str) -> int:
    value = int(text)
    if not -_SAFE_INTEGER < value < _SAFE_INTEGER:
        raise _NotPlain
    return value


def _ascii_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, _ in pairs:
        if not key.isascii():
            raise _NotPlain
    return dict(pairs)


_PLAIN = json.JSONDecoder(parse_float=_refuse, parse_int=_safe_integer, parse_constant=_refuse)
"""Parses JSON that has no float and no integer beyond 2**53, else raises :class:`_NotPlain`:
the standard library's C scanner calls these hooks only for numbers, so the check costs
nothing for the strings that make most of an AuditEvent."""
_PLAIN_KEYS = json.JSONDecoder(
    parse_float=_refuse,
    parse_int=_safe_integer,
    parse_constant=_refuse,
    object_pairs_hook=_ascii_keys,
)
"""The same, checking that every key is ASCII (for text that is not ASCII throughout)."""


def _plain_keys_only(body: bytes) -> bool:
    """Whether every key in ``body`` is ASCII for certain: the bytes are, and no escape
    (``\\u00e9``, a surrogate pair) can make a key that is not."""
    return body.isascii() and b"\\u" not in body


def entry_of_json(body: bytes) -> bytes:
    """The log entry of an AuditEvent given as JSON: the same bytes as :func:`entry_of` of
    it parsed, made without walking the event when its JSON holds nothing orjson writes
    otherwise than JCS (the writer makes every new event's entry)."""
    try:
        event = (_PLAIN if _plain_keys_only(body) else _PLAIN_KEYS).decode(body.decode())
    except _NotPlain:
        event = orjson.loads(body)
        if not isinstance(event, dict):
            raise ValueError("an AuditEvent is a JSON object") from None
        return entry_of(event)
    if not isinstance(event, dict):
        raise ValueError("an AuditEvent is a JSON object")
    return orjson.dumps(without_position(event), option=orjson.OPT_SORT_KEYS)


def with_position(event: dict[str, Any], origin: str, index: int) -> dict[str, Any]:
    """A copy of ``event`` carrying its place in the log (any earlier position replaced)."""
    position = {
        "url": POSITION_URL,
        "extension": [
            {"url": "origin", "valueString": origin},
            {"url": "index", "valueString": str(index)},
        ],
    }
    extensions = [
        x
        for x in event.get("extension") or ()
        if not (isinstance(x, dict) and x.get("url") == POSITION_URL)
    ]
    return {**event, "extension": [*extensions, position]}


def position_of(event: dict[str, Any]) -> tuple[str, int] | None:
    """The origin and leaf index an event carries, or None."""
    for x in event.get("extension") or ():
        if isinstance(x, dict) and x.get("url") == POSITION_URL:
            parts = {
                p.get("url"): p.get("valueString")
                for p in x.get("extension") or ()
                if isinstance(p, dict)
            }
            origin, index = parts.get("origin"), parts.get("index")
            if isinstance(origin, str) and isinstance(index, str) and index.isdigit():
                return origin, int(index)
    return None
