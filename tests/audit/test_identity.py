"""The caller from the Authorization header: JWT claims (names configurable), RS256
signatures checked against a JWKS, the three BALP OAuth patterns, opaque and Basic."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.audit.identity import IdentityCache, identity_from_headers
from proxy.audit.vocabulary import TOKEN_VERIFICATION_EXT
from proxy.settings import IdentitySettings
from tests.factories import (
    FhirDouble,
    SigningKey,
    StartProxy,
    context,
    events_of,
    exchange,
    serving,
    unsigned_jwt,
)


def _keypair(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return key, jwk | {"kid": kid, "alg": "RS256", "use": "sig"}


@pytest.fixture(scope="module")
def idp() -> dict[str, Any]:
    signing, signing_jwk = _keypair("k1")
    other, _ = _keypair("k1")  # same kid, different key: a forged token
    return {
        "key": signing,
        "other": other,
        "public": {"keys": [signing_jwk]},
        "jwks": jwt.PyJWKSet.from_dict({"keys": [signing_jwk]}),
    }


def _token(key: Any, claims: dict[str, Any], kid: str = "k1") -> str:
    now = int(time.time())
    body = {"iat": now, "exp": now + 300, "aud": "fhir"} | claims
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def _user(event: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in event["agent"] if a["requestor"])


def _verification(event: dict[str, Any]) -> str:
    ext = _user(event)["extension"]
    return str(next(e["valueString"] for e in ext if e["url"] == TOKEN_VERIFICATION_EXT))


def _read(token: str, **kwargs: Any) -> dict[str, Any]:
    ex = exchange(
        "GET",
        "Observation/o1",
        headers={"Authorization": f"Bearer {token}"},
        response={"resourceType": "Observation", "id": "o1"},
        **kwargs,
    )
    (event,) = events_of(ex)
    return event


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("valid", "verified"),
        ("expired", "verification failed: expired"),
        ("forged", "verification failed: bad signature"),
        ("unknown kid", "verification failed: unknown signing key"),
        ("wrong audience", "verification failed: wrong audience"),
    ],
)
def test_rs256_tokens_are_verified_against_the_jwks(
    idp: dict[str, Any], case: str, expected: str
) -> None:
    claims = {"sub": "u1", "name": "Ann"}
    token = {
        "valid": lambda: _token(idp["key"], claims),
        "expired": lambda: _token(idp["key"], claims | {"exp": int(time.time()) - 60}),
        "forged": lambda: _token(idp["other"], claims),
        "unknown kid": lambda: _token(idp["key"], claims, kid="k9"),
        "wrong audience": lambda: _token(idp["key"], claims | {"aud": "billing"}),
    }[case]()
    settings = IdentitySettings(audience="fhir")
    event = _read(token, identity=settings, keys=idp["jwks"])
    assert _verification(event) == expected
    # The claims are recorded either way: the event says how far to trust them.
    assert _user(event)["who"]["display"] == "Ann"


def test_a_token_playing_on_the_algorithm_is_a_failed_verification_never_an_error() -> None:
    """A key verifies only with the algorithm it is for: HS256 "signed" with the JWKS's
    public key, another key type's algorithm, an ``alg`` list or ``none`` each fail
    verification (and say why), where they used to raise out of the verifier."""
    idp = SigningKey.generate("k1")
    keys = jwt.PyJWKSet.from_dict({"keys": [idp.jwk]})
    settings = IdentitySettings(audience="fhir")
    for name, token in idp.confused_tokens({"sub": "mallory", "aud": "fhir"}).items():
        identity = identity_from_headers({"authorization": f"Bearer {token}"}, settings, keys)
        assert (identity.verified, identity.failure) == (False, "algorithm not allowed"), name
    genuine = {"authorization": f"Bearer {idp.token({'sub': 'ada', 'aud': 'fhir'})}"}
    assert identity_from_headers(genuine, settings, keys).verified is True


def test_an_ec_key_verifies_its_curve_s_algorithm_only_and_a_symmetric_key_nothing() -> None:
    ec_private = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_private.public_key())) | {"kid": "e1"}
    secret = b"a-shared-secret-published-in-a-jwks-by-mistake"
    oct_jwk = {"kty": "oct", "kid": "s1", "k": base64.urlsafe_b64encode(secret).decode()}
    keys = jwt.PyJWKSet.from_dict({"keys": [ec_jwk, oct_jwk]})
    claims = {"sub": "u1", "exp": int(time.time()) + 300}

    def verified(token: str) -> tuple[bool | None, str | None]:
        identity = identity_from_headers(
            {"authorization": f"Bearer {token}"}, IdentitySettings(), keys
        )
        return identity.verified, identity.failure

    assert verified(jwt.encode(claims, ec_private, "ES256", headers={"kid": "e1"})) == (True, None)
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert verified(jwt.encode(claims, rsa_private, "RS256", headers={"kid": "e1"})) == (
        False,
        "algorithm not allowed",
    )
    assert verified(jwt.encode(claims, secret, "HS256", headers={"kid": "s1"})) == (
        False,
        "algorithm not allowed",
    )


def test_an_issuer_when_configured_must_match(idp: dict[str, Any]) -> None:
    settings = IdentitySettings(audience="fhir", issuer="https://idp.example.org/realms/a")
    for iss, expected in (
        ("https://idp.example.org/realms/a", "verified"),
        ("https://idp.example.org/realms/b", "verification failed: wrong issuer"),
    ):
        event = _read(
            _token(idp["key"], {"sub": "u1", "iss": iss}), identity=settings, keys=idp["jwks"]
        )
        assert _verification(event) == expected


def test_without_a_jwks_the_event_says_the_token_was_not_verified(idp: dict[str, Any]) -> None:
    event = _read(_token(idp["key"], {"sub": "u1"}))
    assert _verification(event) == "not verified (no JWKS configured)"


def test_claim_names_are_configurable() -> None:
    claims = {
        "preferred_username": "ann.k",
        "given": "Ann K",
        "azp": "portal",
        "iss": "https://idp.example.org/realms/x",
        "token_id": "t-77",
        "fhirUser": "Practitioner/pr1",
        "pou": ["TREAT", "ETREAT"],
        "realm_access": {"roles": ["doctor", "admin"]},
    }
    settings = IdentitySettings(
        user_claim="preferred_username",
        name_claim="given",
        jti_claim="token_id",
        purpose_of_use_claim="pou",
    )
    event = _read(unsigned_jwt(claims), identity=settings)
    user = _user(event)
    assert user["who"]["identifier"] == {
        "value": "ann.k",
        "system": "https://idp.example.org/realms/x",
    }
    assert user["who"]["display"] == "Ann K"
    assert user["who"]["reference"] == "Practitioner/pr1"
    assert user["name"] == "Ann K"
    assert [r["text"] for r in user["role"]] == ["doctor", "admin"]
    assert [p["coding"][0]["code"] for p in user["purposeOfUse"]] == ["TREAT", "ETREAT"]
    assert user["policy"] == ["t-77"]
    oclient = next(a for a in event["agent"] if a["who"].get("identifier") == {"value": "portal"})
    assert oclient["type"]["coding"][0]["code"] == "110150"
    assert oclient["requestor"] is False


def test_minimal_pattern_keeps_identifiers_and_jti_but_not_names_or_roles() -> None:
    claims = {"sub": "u1", "name": "Ann", "jti": "j-1", "roles": ["r"], "client_id": "app"}
    ex = exchange(
        "GET",
        "Observation/o1",
        headers={"Authorization": f"Bearer {unsigned_jwt(claims)}"},
        response={"resourceType": "Observation", "id": "o1"},
    )
    (event,) = events_of(ex, context(identity={"token_pattern": "minimal"}))
    user = _user(event)
    assert user["policy"] == ["j-1"]
    assert "role" not in user and "name" not in user
    assert "system" not in user["who"]["identifier"]
    assert len(event["agent"]) == 3, "no separate OAuth client agent in the minimal pattern"
    assert "UserOauthAgent" in {c["code"] for c in user["type"]["coding"]}


@pytest.mark.parametrize(
    "token", ["OPAQUESHORT12345", "A" * 50 + "0123456789abcdef0123456789ABCDEF"]
)
def test_an_opaque_token_is_recorded_only_as_its_keyed_hash(token: str) -> None:
    """BALP's opaque pattern keeps the last 32 characters, which is the whole of a token
    of 32 or fewer: the proxy records HMAC-SHA256(key, token) instead."""
    key = b"k" * 32
    headers = {"authorization": f"Bearer {token}"}
    identity = identity_from_headers(headers, IdentitySettings(), token_key=key)
    assert identity.token_kind == "opaque"
    expected = "hmac-sha256:" + hmac.new(key, token.encode(), hashlib.sha256).hexdigest()[:32]
    assert identity.token_hash == expected
    other_key = identity_from_headers(headers, IdentitySettings(), token_key=b"o" * 32)
    assert other_key.token_hash != expected, "without the key the hash cannot be recomputed"
    event = _read(token)
    (policy,) = _user(event)["policy"]
    assert policy.startswith("hmac-sha256:")
    assert token[-16:] not in json.dumps(event)


@pytest.mark.parametrize(
    "token",
    ["abc.def.ghi", "eyJhbGciOiJub25lIn0.e30", "not-a-jwt", "a.b", "....", "é.ü.ö"],
)
def test_garbage_bearer_tokens_are_opaque_and_never_raise(token: str) -> None:
    identity = identity_from_headers({"authorization": f"Bearer {token}"}, IdentitySettings())
    assert identity.token_kind == "opaque"
    assert identity.token_hash is not None and identity.token_hash.startswith("hmac-sha256:")
    assert identity.user_id is None, "no claim is read from what does not decode as a JWT"


def test_basic_credentials_give_the_user_name_only() -> None:
    header = "Basic " + base64.b64encode(b"ann:s3cret:with:colons").decode()
    identity = identity_from_headers({"authorization": header}, IdentitySettings())
    assert identity.token_kind == "basic"
    assert identity.user_id == "ann"
    assert "s3cret" not in repr(identity)
    broken = identity_from_headers({"authorization": "Basic %%%"}, IdentitySettings())
    assert broken.token_kind == "basic" and broken.user_id is None


def test_claims_of_whitespace_alone_name_nobody() -> None:
    # FHIR strings hold more than whitespace: an event naming a user " " (or a line
    # separator) would break its profile. Such claims are taken as absent.
    blank = {"sub": "\u2028", "name": " ", "client_id": "\t", "roles": [" ", "nurse"]}
    token = unsigned_jwt({**blank, "preferred_username": "ann"})
    identity = identity_from_headers({"authorization": f"Bearer {token}"}, IdentitySettings())
    assert identity.user_id is None and identity.client_id is None
    assert identity.user_name == "ann" and identity.roles == ("nurse",)
    header = "Basic " + base64.b64encode(b" :pw").decode()
    basic = identity_from_headers({"authorization": header}, IdentitySettings())
    assert basic.token_kind == "basic" and basic.user_id is None


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer   ", "Digest x=1"])
def test_no_usable_credential_gives_no_user_agent(header: str) -> None:
    headers = {"Authorization": header} if header else {}
    ex = exchange(
        "GET", "Observation/o1", headers=headers, response={"resourceType": "Observation"}
    )
    (event,) = events_of(ex)
    assert [a for a in event["agent"] if a["requestor"]] == []
    assert len(event["agent"]) == 2


async def test_proxy_fetches_the_jwks_and_records_verified_tokens(
    idp: dict[str, Any],
    fhir_double: FhirDouble,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    """End to end: the JWKS comes over HTTP from the IdP; a signed token's event says
    verified, a forged one's says why not, and both requests are served."""

    async def certs(request: web.Request) -> web.Response:
        return web.json_response(idp["public"])

    async with serving(("GET", "/certs", certs)) as jwks_server:
        proxy = await start_proxy(
            fhir_double,
            audit={"identity": {"jwks_url": str(jwks_server.make_url("/certs"))}},
        )
        for key in ("key", "other"):
            token = _token(idp[key], {"sub": f"user-{key}", "aud": "fhir"})
            async with http.get(
                f"{proxy.url}/metadata", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 200
                await resp.read()
    events = await proxy.stored_events()
    by_user = {_user(e)["who"]["identifier"]["value"]: _verification(e) for e in events}
    assert by_user == {
        "user-key": "verified",
        "user-other": "verification failed: bad signature",
    }


async def test_a_token_playing_on_the_algorithm_is_forwarded_and_audited_as_unverified(
    fhir_double: FhirDouble, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Through a real proxy with a JWKS: each forgery is served as any unverified token
    is (the FHIR server decides), and its event says the verification failed and why;
    none is a 500 without an event."""
    idp = SigningKey.generate("k1")

    async def certs(request: web.Request) -> web.Response:
        return web.json_response({"keys": [idp.jwk]})

    async with serving(("GET", "/certs", certs)) as jwks_server:
        proxy = await start_proxy(
            fhir_double,
            audit={"identity": {"jwks_url": str(jwks_server.make_url("/certs"))}},
        )
        forgeries = idp.confused_tokens({"sub": "mallory"})
        for name, token in forgeries.items():
            headers = {"Authorization": f"Bearer {token}", "X-Request-Id": name.replace(" ", "-")}
            async with http.get(f"{proxy.url}/metadata", headers=headers) as resp:
                assert resp.status == 200, (name, await resp.text())
    events = await proxy.stored_events()
    assert len(events) == len(forgeries)
    assert {_verification(e) for e in events} == {"verification failed: algorithm not allowed"}


def _cache(**kwargs: Any) -> IdentityCache:
    return IdentityCache(IdentitySettings(audience="fhir"), token_key=b"k" * 32, **kwargs)


def test_the_cache_answers_a_repeated_credential_as_identity_from_headers_does(
    idp: dict[str, Any],
) -> None:
    cache = _cache()
    token = _token(idp["key"], {"sub": "dr-who"})
    headers = {"authorization": f"Bearer {token}"}
    first = cache.identity(headers, idp["jwks"])
    assert first == identity_from_headers(
        headers, IdentitySettings(audience="fhir"), idp["jwks"], token_key=b"k" * 32
    )
    assert first.verified is True and first.user_id == "dr-who"
    assert cache.identity(headers, idp["jwks"]) is first, "read once"
    assert cache.identity({}, idp["jwks"]).token_kind == "none"
    # A forged token (same kid, other key) is its own entry, and fails.
    forged = {"authorization": f"Bearer {_token(idp['other'], {'sub': 'dr-who'})}"}
    assert cache.identity(forged, idp["jwks"]).failure == "bad signature"
    # Nothing of a credential is kept: entries are found by a digest.
    for secret in (token, forged["authorization"]):
        assert secret.encode() not in repr(cache._entries).encode()
        assert all(secret.encode()[:40] not in key for key in cache._entries)


def test_a_cached_verification_ends_with_the_token_and_with_the_jwks(
    idp: dict[str, Any],
) -> None:
    cache = _cache()
    now = int(time.time())
    # Whole seconds, as JWTs have them: at least one second of margin for the first calls.
    expiring = {"authorization": f"Bearer {_token(idp['key'], {'exp': now + 2})}"}
    early = {"authorization": f"Bearer {_token(idp['key'], {'nbf': now + 2})}"}
    assert cache.identity(expiring, idp["jwks"]).verified is True
    assert cache.identity(early, idp["jwks"]).verified is False, "not valid yet"
    time.sleep(max(0.0, now + 2.2 - time.time()))
    assert cache.identity(expiring, idp["jwks"]).failure == "expired"
    assert cache.identity(early, idp["jwks"]).verified is True, "its failure was not kept"
    # Keys rotated: the JWKS the identity provider now serves no longer has the key.
    rotated = jwt.PyJWKSet.from_dict({"keys": [_keypair("k2")[1]]})
    assert cache.identity(early, rotated).failure == "unknown signing key"


def test_the_cache_is_bounded_and_lets_the_oldest_go_first(idp: dict[str, Any]) -> None:
    cache = _cache(max_entries=2)
    headers = [
        {"authorization": f"Bearer {_token(idp['key'], {'sub': f'u{n}'})}"} for n in range(3)
    ]
    first = [cache.identity(h, None) for h in headers]
    assert len(cache._entries) == 2
    assert cache.identity(headers[2], None) is first[2]
    assert cache.identity(headers[0], None) is not first[0], "let go, read again"
    assert cache.identity(headers[0], None) == first[0]
