"""Route templates and scrubbed paths of every kind of FHIR interaction, from requests as the
classifier sees them: a table of method and path to ``http.route`` and ``url.path``."""

from __future__ import annotations

import pytest

from proxy.fhir.interaction import InteractionKind, classify
from proxy.telemetry.routes import fhir_route, scrubbed_path

BUNDLE_BODY = b'{"resourceType":"Bundle","type":"%s","entry":[]}'

ROUTES = [
    # method, path below /fhir, body, kind, route, url.path
    ("GET", "Patient/pat-4711", None, "read", "/fhir/{type}/{id}", "/fhir/Patient/REDACTED"),
    ("HEAD", "Patient/pat-4711", None, "read", "/fhir/{type}/{id}", "/fhir/Patient/REDACTED"),
    (
        "GET",
        "Patient/pat-4711/_history/3",
        None,
        "vread",
        "/fhir/{type}/{id}/_history/{vid}",
        "/fhir/Patient/REDACTED/_history/REDACTED",
    ),
    ("PUT", "Patient/pat-4711", b"{}", "update", "/fhir/{type}/{id}", "/fhir/Patient/REDACTED"),
    ("PUT", "Patient", b"{}", "update", "/fhir/{type}", "/fhir/Patient"),
    ("PATCH", "Patient/pat-4711", b"[]", "patch", "/fhir/{type}/{id}", "/fhir/Patient/REDACTED"),
    ("DELETE", "Patient/pat-4711", None, "delete", "/fhir/{type}/{id}", "/fhir/Patient/REDACTED"),
    ("DELETE", "Patient", None, "delete", "/fhir/{type}", "/fhir/Patient"),
    ("POST", "Patient", b"{}", "create", "/fhir/{type}", "/fhir/Patient"),
    (
        "GET",
        "Patient/pat-4711/_history",
        None,
        "history-instance",
        "/fhir/{type}/{id}/_history",
        "/fhir/Patient/REDACTED/_history",
    ),
    ("GET", "Patient/_history", None, "history-type", "/fhir/{type}/_history", None),
    ("GET", "_history", None, "history-system", "/fhir/_history", None),
    ("GET", "Observation", None, "search-type", "/fhir/{type}", None),
    ("POST", "Observation/_search", b"", "search-type", "/fhir/{type}/_search", None),
    ("GET", "", None, "search-system", "/fhir", None),
    ("POST", "_search", b"", "search-system", "/fhir/_search", None),
    (
        "GET",
        "Patient/pat-4711/Observation",
        None,
        "search-compartment",
        "/fhir/{compartment}/{id}/{type}",
        "/fhir/Patient/REDACTED/Observation",
    ),
    (
        "POST",
        "Patient/pat-4711/Observation/_search",
        b"",
        "search-compartment",
        "/fhir/{compartment}/{id}/{type}/_search",
        "/fhir/Patient/REDACTED/Observation/_search",
    ),
    (
        "GET",
        "Patient/pat-4711/*",
        None,
        "search-compartment",
        "/fhir/{compartment}/{id}/*",
        "/fhir/Patient/REDACTED/*",
    ),
    ("GET", "metadata", None, "capabilities", "/fhir/metadata", None),
    ("POST", "", BUNDLE_BODY % b"batch", "batch", "/fhir", None),
    ("POST", "", BUNDLE_BODY % b"transaction", "transaction", "/fhir", None),
    ("POST", "$convert", b"{}", "operation", "/fhir/${operation}", "/fhir/$convert"),
    (
        "GET",
        "Patient/$match",
        None,
        "operation",
        "/fhir/{type}/${operation}",
        "/fhir/Patient/$match",
    ),
    (
        "GET",
        "Patient/pat-4711/$everything",
        None,
        "operation",
        "/fhir/{type}/{id}/${operation}",
        "/fhir/Patient/REDACTED/$everything",
    ),
    # Not FHIR interactions: no route; every segment that is not a FHIR word scrubbed.
    ("GET", "Nonsense/pat-4711", None, "unknown", None, "/fhir/REDACTED/REDACTED"),
    ("TRACE", "Patient/pat-4711", None, "unknown", None, "/fhir/Patient/REDACTED"),
]


@pytest.mark.parametrize(("method", "path", "body", "kind", "route", "url_path"), ROUTES)
def test_route_and_scrubbed_path_of_each_interaction(
    method: str, path: str, body: bytes | None, kind: str, route: str | None, url_path: str | None
) -> None:
    interaction = classify(method, path, "", {"content-type": "application/fhir+json"}, body)
    assert interaction.kind is InteractionKind(kind)
    assert fhir_route("/fhir", path, interaction) == route
    expected_path = url_path if url_path is not None else "/fhir" + (f"/{path}" if path else "")
    assert scrubbed_path("/fhir", path) == expected_path
    assert "pat-4711" not in (route or "") + scrubbed_path("/fhir", path)


def test_a_base_at_the_root_and_paths_outside_the_base() -> None:
    read = classify("GET", "Patient/1", "", {}, None)
    assert fhir_route("", "Patient/1", read) == "/{type}/{id}"
    assert fhir_route("", "", classify("GET", "", "", {}, None)) == "/"
    assert scrubbed_path("", "") == "/"
    assert scrubbed_path("", "Patient/1") == "/Patient/REDACTED"
    # Outside the base (forwarded by audit.forward_outside_base): the absolute path, no route.
    outside = "/.well-known/smart-configuration"
    assert fhir_route("/fhir", outside, classify("GET", outside, "", {}, None)) is None
    assert scrubbed_path("/fhir", outside) == "/REDACTED/REDACTED"
    assert fhir_route("/fhir", "Patient/1", None) is None
