"""The local trust bundle in the SPIFFE bundle format (JWKS) and as PEM."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from cryptography import x509
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from spiffe import JwtBundle, TrustDomain

from identity.keys import KeyType
from tests.identity.certs import spki


def _jwk_public_key(key: dict[str, object]) -> object:
    algorithm = ECAlgorithm if key["kty"] == "EC" else RSAAlgorithm
    return algorithm.from_jwk(json.dumps(key))


def _x5c_certs(jwks: dict) -> list[x509.Certificate]:
    return [
        x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0]))
        for k in jwks["keys"]
        if k["use"] == "x509-svid"
    ]


@pytest.mark.parametrize(
    ("key_type", "jwt_key_type", "x509_params", "jwt_params"),
    [
        (KeyType.EC_P256, KeyType.EC_P256, {"kty": "EC", "crv": "P-256"}, {"crv": "P-256"}),
        (KeyType.EC_P384, KeyType.EC_P384, {"kty": "EC", "crv": "P-384"}, {"crv": "P-384"}),
        (KeyType.RSA_2048, KeyType.RSA_2048, {"kty": "RSA", "e": "AQAB"}, {"kty": "RSA"}),
    ],
)
def test_jwks_follows_the_spiffe_bundle_format(
    make_ca, clock, key_type, jwt_key_type, x509_params, jwt_params
):
    ca = make_ca(clock, key_type=key_type, jwt_key_type=jwt_key_type)
    jwks = ca.bundle.jwks()
    assert set(jwks) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert isinstance(jwks["spiffe_sequence"], int)
    assert jwks["spiffe_sequence"] >= 1
    assert jwks["spiffe_refresh_hint"] == 300
    json.dumps(jwks)  # serialisable as is

    x509_keys = [k for k in jwks["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in jwks["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) == 1
    assert len(jwt_keys) == 1
    assert len(jwks["keys"]) == 2

    (x509_key,) = x509_keys
    assert x509_params.items() <= x509_key.items()
    assert len(x509_key["x5c"]) == 1
    cert = x509.load_der_x509_certificate(base64.b64decode(x509_key["x5c"][0]))
    assert cert == ca.active.certificate
    assert spki(_jwk_public_key(x509_key)) == spki(cert.public_key())
    assert "d" not in x509_key

    (jwt_key,) = jwt_keys
    assert jwt_params.items() <= jwt_key.items()
    assert jwt_key["kid"] == ca.active.jwt.key_id
    assert "x5c" not in jwt_key
    assert "d" not in jwt_key
    assert spki(_jwk_public_key(jwt_key)) == spki(ca.active.jwt_key)


def test_refresh_hint_follows_the_setting(make_ca, clock):
    ca = make_ca(clock, refresh_hint=timedelta(seconds=45))
    assert ca.bundle.jwks()["spiffe_refresh_hint"] == 45


def test_pem_and_jwks_hold_the_same_roots(make_ca, clock):
    ca = make_ca(clock)
    clock.now = ca.active.prepare_at
    ca.rotate(clock())
    roots = list(ca.bundle.x509_authorities)
    assert len(roots) == 2
    assert x509.load_pem_x509_certificates(ca.bundle.pem()) == roots
    assert _x5c_certs(ca.bundle.jwks()) == roots
    assert {s.certificate for s in ca.slots} == set(roots)


def test_jwt_bundle_json_is_what_py_spiffe_parses(make_ca, clock):
    ca = make_ca(clock)
    clock.now = ca.active.prepare_at
    ca.rotate(clock())
    parsed = JwtBundle.parse(TrustDomain("example.org"), ca.bundle.jwt_bundle_json())
    assert set(parsed.jwt_authorities) == {s.jwt.key_id for s in ca.slots}
    for slot in ca.slots:
        assert spki(parsed.get_jwt_authority(slot.jwt.key_id)) == spki(slot.jwt.public_key)
    jwt_keys = [k for k in ca.bundle.jwks()["keys"] if k["use"] == "jwt-svid"]
    assert json.loads(ca.bundle.jwt_bundle_json()) == {"keys": jwt_keys}


def test_sequence_increases_when_the_content_changes_and_only_then(make_ca, clock):
    ca = make_ca(clock)
    first = ca.active
    seq = ca.bundle.sequence
    assert ca.bundle.jwks()["spiffe_sequence"] == seq

    # nothing due: no change, same sequence
    clock.now = first.prepare_at - timedelta(seconds=1)
    assert ca.rotate(clock()) == []
    assert ca.bundle.sequence == seq

    # a new root and JWT key are published
    clock.now = first.prepare_at
    ca.rotate(clock())
    assert ca.bundle.sequence == seq + 1
    assert ca.bundle.jwks()["spiffe_sequence"] == seq + 1

    # activation changes who signs, not what is trusted
    clock.now = first.activate_at
    events = ca.rotate(clock())
    assert any("activated" in e for e in events)
    assert ca.active is not None
    assert ca.active.id != first.id
    assert ca.bundle.sequence == seq + 1

    # the old root leaves the bundle
    clock.now = first.not_after + ca.settings.bundle_grace
    ca.rotate(clock())
    assert first.certificate not in ca.bundle.x509_authorities
    assert ca.bundle.sequence == seq + 2

    # and again nothing
    clock.advance(timedelta(minutes=1))
    assert ca.rotate(clock()) == []
    assert ca.bundle.sequence == seq + 2


def test_bundle_survives_a_restart(make_ca, clock, tmp_path):
    key_dir = tmp_path / "ca-keys"
    ca = make_ca(clock, key_dir=key_dir)
    clock.advance(timedelta(hours=1))
    restarted = make_ca(clock, key_dir=key_dir)
    assert restarted.bundle.jwks() == ca.bundle.jwks()
    assert restarted.bundle.pem() == ca.bundle.pem()

    # with two CAs in the bundle
    clock.now = ca.active.prepare_at + timedelta(minutes=1)
    ca.rotate(clock())
    clock.advance(timedelta(minutes=5))
    restarted = make_ca(clock, key_dir=key_dir)
    assert len(restarted.bundle.x509_authorities) == 2
    assert restarted.bundle.jwks() == ca.bundle.jwks()
    assert restarted.bundle.jwt_bundle_json() == ca.bundle.jwt_bundle_json()
    assert restarted.bundle.sequence == ca.bundle.sequence
