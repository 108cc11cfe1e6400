"""JWT-SVIDs per the SPIFFE JWT-SVID spec, validated by py-spiffe against our bundle."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from spiffe.bundle.jwt_bundle.errors import AuthorityNotFoundError
from spiffe.svid.errors import InvalidTokenError

from identity.errors import InvalidInputError
from identity.keys import KeyType
from tests.identity.certs import WORKLOAD_ID, standalone_ca, validate_jwt


def _sign(ca, now, audience=("spiffe://example.org/ns/db",), ttl=None):
    return ca.sign_jwt_svid(spiffe_id=WORKLOAD_ID, audience=audience, ttl=ttl, now=now)


@pytest.mark.parametrize(
    ("jwt_key_type", "alg"),
    [(KeyType.EC_P256, "ES256"), (KeyType.EC_P384, "ES384"), (KeyType.RSA_2048, "RS256")],
)
def test_header_and_claims(make_ca, clock, jwt_key_type, alg):
    ca = make_ca(clock, jwt_key_type=jwt_key_type)
    now = clock.advance(timedelta(minutes=1))
    issue = _sign(ca, now, audience=("spiffe://example.org/ns/db", "https://api"))

    header = jwt.get_unverified_header(issue.token)
    assert header == {"alg": alg, "kid": ca.active.jwt.key_id, "typ": "JWT"}
    assert issue.key_id == ca.active.jwt.key_id

    claims = jwt.decode(issue.token, options={"verify_signature": False})
    assert claims == {
        "sub": "spiffe://example.org/ns/default/sa/web",
        "aud": ["spiffe://example.org/ns/db", "https://api"],
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "iat": int(now.timestamp()),
    }
    assert issue.expires_at == now + timedelta(minutes=5)
    assert issue.capped is False
    assert issue.audience == ("spiffe://example.org/ns/db", "https://api")

    svid = validate_jwt(issue.token, ca.bundle, {"spiffe://example.org/ns/db"}, at=now)
    assert str(svid.spiffe_id) == str(WORKLOAD_ID)
    assert svid.audience == {"spiffe://example.org/ns/db", "https://api"}
    assert svid.expiry == claims["exp"]


def test_default_key_type_is_es256(make_ca, clock):
    ca = make_ca(clock)
    assert jwt.get_unverified_header(_sign(ca, clock()).token)["alg"] == "ES256"


@pytest.mark.parametrize(
    ("settings", "ttl", "lifetime"),
    [
        ({}, None, timedelta(minutes=5)),
        ({}, timedelta(seconds=90), timedelta(seconds=90)),
        ({"jwt_svid_ttl": timedelta(minutes=2)}, None, timedelta(minutes=2)),
    ],
)
def test_lifetime(make_ca, clock, settings, ttl, lifetime):
    ca = make_ca(clock, **settings)
    now = clock()
    issue = _sign(ca, now, ttl=ttl)
    assert issue.expires_at == now + lifetime
    claims = jwt.decode(issue.token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == int(lifetime.total_seconds())


def test_lifetime_is_capped_at_the_ca_not_after(make_ca, clock):
    ca = make_ca(clock)
    now = clock.advance(timedelta(hours=3))
    issue = _sign(ca, now, ttl=timedelta(days=3))
    assert issue.capped is True
    assert issue.expires_at == ca.active.not_after
    claims = jwt.decode(issue.token, options={"verify_signature": False})
    assert claims["exp"] == int(ca.active.not_after.timestamp())


def test_validation_fails_for_another_audience(make_ca, clock):
    ca = make_ca(clock)
    issue = _sign(ca, clock(), audience=("spiffe://example.org/ns/db",))
    with pytest.raises(InvalidTokenError, match="Audience doesn't match"):
        validate_jwt(issue.token, ca.bundle, {"spiffe://example.org/ns/cache"}, at=clock())


def test_validation_follows_expiry(make_ca, clock):
    ca = make_ca(clock)
    now = clock()
    issue = _sign(ca, now)
    audience = {"spiffe://example.org/ns/db"}
    validate_jwt(issue.token, ca.bundle, audience, at=now + timedelta(minutes=5, seconds=-1))
    with pytest.raises(InvalidTokenError, match="expired"):
        validate_jwt(issue.token, ca.bundle, audience, at=now + timedelta(minutes=5))


def test_validation_fails_against_another_cas_bundle(make_ca, clock, tmp_path: Path):
    ca = make_ca(clock)
    issue = _sign(ca, clock())
    audience = {"spiffe://example.org/ns/db"}
    with standalone_ca(tmp_path / "other", clock()) as other:
        with pytest.raises(AuthorityNotFoundError):
            validate_jwt(issue.token, other.bundle, audience, at=clock())
        foreign = _sign(other, clock())
        with pytest.raises(AuthorityNotFoundError):
            validate_jwt(foreign.token, ca.bundle, audience, at=clock())


def test_a_token_signed_by_another_key_under_our_kid_is_refused(make_ca, clock, tmp_path: Path):
    ca = make_ca(clock)
    with standalone_ca(tmp_path / "other", clock()) as other:
        forged = jwt.encode(
            jwt.decode(_sign(ca, clock()).token, options={"verify_signature": False}),
            other.active.jwt_key,
            algorithm="ES256",
            headers={"kid": ca.active.jwt.key_id, "typ": "JWT"},
        )
    with pytest.raises(InvalidTokenError, match="Signature verification failed"):
        validate_jwt(forged, ca.bundle, {"spiffe://example.org/ns/db"}, at=clock())


@pytest.mark.parametrize(
    "audience",
    [(), ("",), ("   ",), ("spiffe://example.org/ns/db", "")],
    ids=["none", "empty", "blank", "one-empty"],
)
def test_missing_or_blank_audience_is_refused(make_ca, clock, audience):
    ca = make_ca(clock)
    with pytest.raises(InvalidInputError) as info:
        _sign(ca, clock(), audience=audience)
    assert info.value.field == "audience"
    assert "audience" in info.value.message
