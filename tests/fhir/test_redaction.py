"""Credential parameters are redacted from every recorded form of a query (pure)."""

from __future__ import annotations

import pytest

from proxy.fhir.interaction import (
    CREDENTIAL_PARAMS,
    classify,
    redact_params,
    redact_query,
    redact_text,
)

NAMES = CREDENTIAL_PARAMS | {"session_ref"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("name=x&access_token=SECRET", "name=x&access_token=REDACTED"),
        ("ACCESS_TOKEN=SECRET", "ACCESS_TOKEN=REDACTED"),
        ("access%5Ftoken=SECRET", "access%5Ftoken=REDACTED"),
        ("password=a&password=b&_count=1", "password=REDACTED&password=REDACTED&_count=1"),
        ("patient=x&code=8867-4", "patient=x&code=8867-4"),
        ("id_token=&x=1", "id_token=REDACTED&x=1"),
        ("session_ref=s1", "session_ref=REDACTED"),
        ("password=p%26q&name=x", "password=REDACTED&name=x"),
        ("name=access_token%3DSECRET", "name=access_token%3DSECRET"),
        ("access_token[]=S1&access_token[]=S2", "access_token[]=REDACTED&access_token[]=REDACTED"),
        ("access_token%5B%5D=S&Token[0]=T", "access_token%5B%5D=REDACTED&Token[0]=REDACTED"),
        (
            "sig=S&apikey=A&client_assertion=C",
            "sig=REDACTED&apikey=REDACTED&client_assertion=REDACTED",
        ),
        ("tokens=kept&token_type=kept", "tokens=kept&token_type=kept"),
        ("", ""),
        ("plain", "plain"),
    ],
)
def test_redact_query_keeps_everything_but_credential_values(raw: str, expected: str) -> None:
    assert redact_query(raw, NAMES) == expected


def test_redacted_search_parameters_and_classification() -> None:
    interaction = classify(
        "POST",
        "Patient/_search",
        "",
        {"content-type": "application/x-www-form-urlencoded"},
        redact_query("name=x&client_secret=S&api_key=K", NAMES).encode(),
    )
    assert interaction.search == (
        ("name", "x"),
        ("client_secret", "REDACTED"),
        ("api_key", "REDACTED"),
    )
    assert redact_params((("Password", "p"), ("name", "n"), ("token[]", "t")), NAMES) == (
        ("Password", "REDACTED"),
        ("name", "n"),
        ("token[]", "REDACTED"),
    )


def test_redact_text_in_an_error_message_quoting_a_url() -> None:
    message = "400, url='http://up/fhir/Patient?name=a&access_token=SEC&api_key=K2'"
    assert redact_text(message, NAMES) == (
        "400, url='http://up/fhir/Patient?name=a&access_token=REDACTED&api_key=REDACTED'"
    )
    listed = "url='http://up/fhir/Patient?access_token[]=S1&sig%5B%5D=S2&tokens=kept'"
    assert redact_text(listed, NAMES) == (
        "url='http://up/fhir/Patient?access_token[]=REDACTED&sig%5B%5D=REDACTED&tokens=kept'"
    )


def test_code_is_a_search_parameter_not_a_credential() -> None:
    """``code`` is Observation's (Condition's, Procedure's...) most used search parameter;
    OAuth's authorization code never goes to a resource server."""
    assert "code" not in CREDENTIAL_PARAMS
    query = "patient=x&code=http%3A%2F%2Floinc.org%7C8867-4&code:text=heart"
    assert redact_query(query, CREDENTIAL_PARAMS) == query
    assert redact_query("code=8867-4", CREDENTIAL_PARAMS | {"code"}) == "code=REDACTED", (
        "an operator can still have it redacted"
    )
