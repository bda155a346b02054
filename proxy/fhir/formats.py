"""FHIR bodies in JSON, XML and YAML, read as the audit reads them, and written back with
their credentials redacted. Pure; never raises on odd input.

Reading gives the JSON form of a resource (a dict), whatever the body's format, so that
classification, patient inference and the builder read one shape:

- JSON through orjson;
- FHIR XML through lxml with a hardened parser: a document with a DTD is refused before
  the parser sees it (so no entity is ever declared, expanded or fetched), entities are
  not substituted, nothing is loaded over the network, depth is bounded
  (:data:`MAX_XML_DEPTH`) and libxml2's own limits on huge documents stay on. The
  document is read as a stream of elements, each let go of once converted, so a large
  Bundle can be read entry by entry (:func:`xml_resource` with ``on_entry``);
- YAML through PyYAML's safe loader (libyaml), after a pass over its events that refuses
  anchors and aliases (an alias bomb is a few bytes that walk as billions of nodes) and
  bounds depth.

The XML form converted is the JSON form as far as the audit reads it: an element that
repeats in the document, or that the audit reads as a list (:data:`XML_LISTS`), is a
list; a primitive is its ``value`` as a string; the extensions of primitives and the
narrative's XHTML are left out.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import IO, Any

import orjson
import yaml

from proxy.fhir.interaction import REDACTED, parse_json_object, redact_query


class BodyFormat(StrEnum):
    """What a body is written in, as the audit reads it."""

    JSON = "json"
    XML = "xml"
    YAML = "yaml"
    FORM = "form"
    GRAPHQL = "graphql"
    OTHER = "other"


_BY_MEDIA_TYPE = {
    "application/fhir+json": BodyFormat.JSON,
    "application/json": BodyFormat.JSON,
    "application/json+fhir": BodyFormat.JSON,
    "text/json": BodyFormat.JSON,
    "application/fhir+xml": BodyFormat.XML,
    "application/xml": BodyFormat.XML,
    "application/xml+fhir": BodyFormat.XML,
    "text/xml": BodyFormat.XML,
    "application/fhir+yaml": BodyFormat.YAML,
    "application/yaml": BodyFormat.YAML,
    "application/x-yaml": BodyFormat.YAML,
    "text/yaml": BodyFormat.YAML,
    "text/x-yaml": BodyFormat.YAML,
    "application/x-www-form-urlencoded": BodyFormat.FORM,
    "application/graphql": BodyFormat.GRAPHQL,
}


def body_format(content_type: str, body: bytes | None = None) -> BodyFormat:
    """The format of a body from its ``Content-Type`` (parameters ignored; ``+json``,
    ``+xml`` and ``+yaml`` suffixes understood). Without a known type, a body that starts
    with ``{`` is JSON and one that starts with ``<`` XML."""
    media = content_type.split(";", 1)[0].strip().lower()
    known = _BY_MEDIA_TYPE.get(media)
    if known is not None:
        return known
    for suffix, fmt in (("+json", BodyFormat.JSON), ("+xml", BodyFormat.XML)):
        if media.endswith(suffix):
            return fmt
    if media.endswith("+yaml"):
        return BodyFormat.YAML
    head = body[:64].lstrip(b"\xef\xbb\xbf \t\r\n") if body else b""
    if head.startswith(b"{"):
        return BodyFormat.JSON
    if head.startswith(b"<"):
        return BodyFormat.XML
    return BodyFormat.OTHER


def parse_resource(body: bytes | None, content_type: str) -> dict[str, Any] | None:
    """The JSON form of the resource in ``body`` (JSON, FHIR XML or YAML, by
    ``content_type``), or None when it is empty, not one of those, refused (a DTD, too
    deep, aliases) or not an object."""
    if not body:
        return None
    fmt = body_format(content_type, body)
    if fmt is BodyFormat.JSON:
        return parse_json_object(body)
    if fmt is BodyFormat.XML:
        return xml_resource(io.BytesIO(body))
    if fmt is BodyFormat.YAML:
        return yaml_resource(body)
    return None


# --- XML --------------------------------------------------------------------------------------

FHIR_NS = "http://hl7.org/fhir"
_FHIR = "{" + FHIR_NS + "}"
MAX_XML_DEPTH = 100
"""Most nested elements a FHIR XML document may have; a deeper one is not read (FHIR
resources nest a few dozen deep at most; libxml2 alone allows 256)."""
XML_LISTS = frozenset(
    {
        "entry",
        "issue",
        "security",
        "tag",
        "profile",
        "link",
        "parameter",
        "part",
        "contained",
        "coding",
        "extension",
        "modifierExtension",
    }
)
"""Elements the audit reads as lists (a Bundle's entries, an outcome's issues, the
security labels...), lists even when the document holds one of them."""
_PROLOG_LIMIT = 64 * 1024
"""Most bytes before the root element that are looked at for a DTD; a document whose
prolog is longer is not read."""
_PROLOG = re.compile(rb"(?:\s+|<\?.*?\?>|<!--.*?-->)*", re.S)


class XmlRefused(ValueError):
    """A document the reader will not read (a DTD, too deep, not FHIR)."""


def _check_prolog(head: bytes) -> None:
    """Refuse a document whose prolog (what comes before the root element) holds a
    DTD, or that does not reach its root element within :data:`_PROLOG_LIMIT` bytes."""
    head = head.removeprefix(b"\xef\xbb\xbf")
    end = _PROLOG.match(head)
    rest = head[end.end() if end else 0 :]
    if rest.startswith(b"<!"):
        raise XmlRefused("a document with a DTD is not read")
    if not rest.startswith(b"<"):
        raise XmlRefused("no root element where one was expected")


def _events(source: IO[bytes]) -> Iterator[tuple[str, Any]]:
    """The start and end events of a FHIR XML document, through the hardened parser."""
    # lxml (and what it loads, rnc2rng among them) is imported on the first XML body:
    # most deployments never see one and need not hold it in memory.
    from lxml import etree

    head = source.read(_PROLOG_LIMIT)
    _check_prolog(head)
    source.seek(0)
    parser_events = etree.iterparse(
        source,
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    depth = 0
    for event, elem in parser_events:
        if event == "start":
            depth += 1
            if depth > MAX_XML_DEPTH:
                raise XmlRefused(f"deeper than {MAX_XML_DEPTH} elements")
            if depth == 1 and elem.getroottree().docinfo.internalDTD is not None:
                raise XmlRefused("a document with a DTD is not read")  # a backstop
        else:
            depth -= 1
        yield event, elem


_SKIP: Any = None
"""The frame of an element outside the FHIR namespace (the narrative's XHTML), whose
subtree is left out."""


def xml_resource(
    source: IO[bytes],
    *,
    on_entry: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """The JSON form of the FHIR XML resource in ``source`` (positioned at its start), or
    None when it is not one or is refused. ``on_entry`` is given each entry of a root
    Bundle, once read, and what it returns is kept instead (a large Bundle cut entry by
    entry)."""
    from lxml import etree

    try:
        return _xml_resource(source, on_entry)
    except (etree.LxmlError, XmlRefused, ValueError, OSError):
        return None


def _xml_resource(
    source: IO[bytes], on_entry: Callable[[dict[str, Any]], dict[str, Any]] | None
) -> dict[str, Any] | None:
    # A frame per open element: [name, object, primitive value, inline resource].
    stack: list[list[Any]] = []
    for event, elem in _events(source):
        if event == "start":
            tag = elem.tag
            if (
                (stack and stack[-1] is _SKIP)
                or not isinstance(tag, str)
                or not tag.startswith(_FHIR)
            ):
                if not stack:
                    return None  # not a FHIR document
                stack.append(_SKIP)
                continue
            name = tag[len(_FHIR) :]
            obj: dict[str, Any] = {}
            if name[:1].isupper():
                obj["resourceType"] = name
            elif not stack:
                return None  # the root of a FHIR document is a resource
            attrs = elem.attrib
            element_id = attrs.get("id")
            if element_id is not None:
                obj["id"] = element_id
            url = attrs.get("url")
            if url is not None:
                obj["url"] = url
            stack.append([name, obj, attrs.get("value"), None])
            continue
        frame = stack.pop()
        parent_elem = elem.getparent()
        elem.clear()
        if parent_elem is not None:
            parent_elem.remove(elem)  # the tree never holds more than the open elements
        if frame is _SKIP:
            continue
        name, obj, value, resource = frame
        result: Any
        if resource is not None:
            result = resource
        elif value is not None:
            result = value
        else:
            result = obj
        if not stack:
            return result if isinstance(result, dict) else None
        parent = stack[-1]
        if parent is _SKIP:
            continue
        if name[:1].isupper():
            parent[3] = result  # an inline resource is the value of the element holding it
            continue
        if (
            on_entry is not None
            and name == "entry"
            and len(stack) == 1
            and isinstance(result, dict)
        ):
            result = on_entry(result)
        siblings = parent[1]
        existing = siblings.get(name)
        if existing is None:
            siblings[name] = [result] if name in XML_LISTS else result
        elif isinstance(existing, list):
            existing.append(result)
        else:
            siblings[name] = [existing, result]
    return None


# --- YAML -------------------------------------------------------------------------------------

MAX_YAML_DEPTH = 100
"""Most nested collections a YAML body may have."""


class _FhirYamlLoader(yaml.CSafeLoader):
    """PyYAML's safe loader (libyaml) that leaves dates as strings, as JSON has them."""


_FhirYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_acceptable(body: bytes) -> bool:
    """No anchors, aliases or explicit tags, one document, and at most
    :data:`MAX_YAML_DEPTH` collections deep."""
    depth = 0
    documents = 0
    for event in yaml.parse(body, Loader=_FhirYamlLoader):
        if isinstance(event, yaml.AliasEvent):
            return False
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            return False
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                return False
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                return False
    return True


def yaml_resource(body: bytes) -> dict[str, Any] | None:
    """The resource in a YAML body, or None when it is not a mapping or is refused."""
    try:
        if not _yaml_acceptable(body):
            return None
        value = yaml.load(body, Loader=_FhirYamlLoader)  # a safe loader (see the class)
    except (yaml.YAMLError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --- redaction --------------------------------------------------------------------------------

_GRAPHQL_ARGUMENT = r"(?i)\b({names})(\s*:\s*)(\"(?:[^\"\\]|\\.)*\"|[^\s,)}}]+)"


def _redact_graphql(text: str, names: frozenset[str]) -> str:
    """``text`` (a GraphQL query) with the value of every argument named in ``names``
    replaced by :data:`REDACTED`."""
    if ":" not in text or not names:
        return text
    pattern = _GRAPHQL_ARGUMENT.format(names="|".join(re.escape(n) for n in sorted(names)))
    return re.sub(pattern, lambda m: f'{m.group(1)}{m.group(2)}"{REDACTED}"', text)


def _redact_json(value: Any, names: frozenset[str]) -> tuple[Any, bool]:
    """``value`` with the values of object members named in ``names``, of Parameters
    parameters so named, and of GraphQL arguments in a ``query`` string redacted; and
    whether anything was."""
    if isinstance(value, list):
        out_list = []
        changed = False
        for item in value:
            new, hit = _redact_json(item, names)
            out_list.append(new)
            changed |= hit
        return out_list, changed
    if not isinstance(value, dict):
        return value, False
    out: dict[str, Any] = {}
    changed = False
    named = value.get("name")
    credential_parameter = isinstance(named, str) and named.strip().lower() in names
    for key, item in value.items():
        if key.strip().lower() in names:
            out[key] = REDACTED
            changed = True
        elif credential_parameter and key.startswith(("value", "resource", "part")):
            out["valueString" if key.startswith("value") else key] = REDACTED
            changed = True
        elif key == "query" and isinstance(item, str):
            redacted = _redact_graphql(item, names)
            out[key] = redacted
            changed |= redacted != item
        else:
            out[key], hit = _redact_json(item, names)
            changed |= hit
    return out, changed


def _redact_xml(body: bytes, names: frozenset[str]) -> bytes | None:
    """A FHIR XML body with the values of Parameters parameters named in ``names`` (and
    of elements so named) redacted; None when it cannot be read."""
    from lxml import etree

    try:
        root: Any = None
        for event, elem in _events(io.BytesIO(body)):
            if event == "start" and root is None:
                root = elem
    except (etree.LxmlError, XmlRefused, ValueError):
        return None
    if root is None:
        return None
    changed = False
    for elem in root.iter():
        if not isinstance(elem.tag, str):
            continue
        local = etree.QName(elem).localname
        if local.lower() in names and "value" in elem.attrib:
            elem.set("value", REDACTED)
            changed = True
        if local != "parameter":
            continue
        name = elem.find(f"{_FHIR}name")
        if name is None or (name.get("value") or "").strip().lower() not in names:
            continue
        for child in list(elem):
            child_name = etree.QName(child).localname if isinstance(child.tag, str) else ""
            if child_name.startswith(("value", "resource", "part")):
                elem.remove(child)
                changed = True
        redacted = etree.SubElement(elem, f"{_FHIR}valueString")
        redacted.set("value", REDACTED)
    if not changed:
        return body
    result: bytes = etree.tostring(root, encoding="utf-8", xml_declaration=True)
    return result


def redacted_body(body: bytes, content_type: str, names: frozenset[str]) -> bytes | None:
    """``body`` as it may be recorded: itself when it holds no credential, else written
    again with the value of each member, parameter or argument named in ``names`` (lower
    case) replaced by :data:`REDACTED` (forms, JSON and FHIR XML ``Parameters``, GraphQL,
    YAML). None when it is in a format in which credentials cannot be found, or cannot
    be read: such a body is not recorded."""
    fmt = body_format(content_type, body)
    if fmt is BodyFormat.FORM:
        return redact_query(body.decode("latin-1"), names).encode("latin-1")
    if fmt is BodyFormat.GRAPHQL:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
        redacted = _redact_graphql(text, names)
        return body if redacted == text else redacted.encode()
    if fmt is BodyFormat.JSON:
        try:
            new, changed = _redact_json(orjson.loads(body), names)
        except (orjson.JSONDecodeError, RecursionError):  # (JSON nests deeper than Python)
            return None
        return orjson.dumps(new) if changed else body
    if fmt is BodyFormat.XML:
        return _redact_xml(body, names)
    if fmt is BodyFormat.YAML:
        parsed_yaml = yaml_resource(body)
        if parsed_yaml is None:
            return None
        new, changed = _redact_json(parsed_yaml, names)
        if not changed:
            return body
        return yaml.safe_dump(new, sort_keys=False, allow_unicode=True).encode()
    return None
