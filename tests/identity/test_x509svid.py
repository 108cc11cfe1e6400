"""X509-SVIDs and CA certificates against the SPIFFE X509-SVID spec; CSRs; SPIFFE IDs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import VerificationError
from spiffe import SpiffeId, TrustDomain

from identity.errors import InvalidCSRError, InvalidSpiffeIdError
from identity.keys import KeyType
from identity.spiffeid import parse_spiffe_id, require_member
from identity.x509certs import BACKDATE, public_key_from_csr
from tests.identity.certs import (
    WORKLOAD_ID,
    issue_svid,
    make_csr,
    new_key,
    parse_svid,
    spki,
    standalone_ca,
    verify_x509,
)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _dns(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


# -- the leaf --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_kind", "key_encipherment"),
    [("p256", False), ("p384", False), ("rsa2048", True)],
)
def test_svid_follows_the_x509_svid_spec(make_ca, clock, key_kind, key_encipherment):
    ca = make_ca(clock)
    issue, key = issue_svid(ca, clock(), key_kind=key_kind)
    leaf = issue.certificate

    assert issue.spiffe_id == WORKLOAD_ID
    assert _uris(leaf) == [str(WORKLOAD_ID)]
    assert _dns(leaf) == []
    assert spki(leaf.public_key()) == spki(key)

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical is True
    assert bc.value.ca is False

    ku_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    ku = ku_ext.value
    assert ku_ext.critical is True
    assert ku.digital_signature is True
    assert ku.key_encipherment is key_encipherment
    assert ku.key_cert_sign is False
    assert ku.crl_sign is False
    assert ku.key_agreement is False

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    assert issue.chain == (leaf, ca.active.certificate)
    assert leaf.issuer == ca.active.certificate.subject
    leaf.verify_directly_issued_by(ca.active.certificate)

    svid = parse_svid(issue, key)
    assert str(svid.spiffe_id) == str(WORKLOAD_ID)
    assert svid.leaf == leaf
    assert svid.cert_chain == [leaf, ca.active.certificate]

    verified = verify_x509(ca.bundle.x509_authorities, issue.chain, at=clock())
    assert verified.chain == [leaf, ca.active.certificate]
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WORKLOAD_ID))]


def test_dns_names_are_added_after_the_single_uri_san(make_ca, clock):
    ca = make_ca(clock)
    issue, key = issue_svid(ca, clock(), dns_names=("web.default.svc", "web"))
    assert _uris(issue.certificate) == [str(WORKLOAD_ID)]
    assert _dns(issue.certificate) == ["web.default.svc", "web"]
    assert str(parse_svid(issue, key).spiffe_id) == str(WORKLOAD_ID)
    verify_x509(ca.bundle.x509_authorities, issue.chain, at=clock())


def test_serials_are_positive_at_most_128_bits_and_unique(make_ca, clock):
    ca = make_ca(clock)
    key = new_key("p256").public_key()
    serials = [
        ca.sign_x509_svid(
            public_key=key, spiffe_id=WORKLOAD_ID, ttl=None, issued_to="t", now=clock()
        ).certificate.serial_number
        for _ in range(64)
    ]
    assert len(set(serials)) == 64
    assert all(0 < s < 2**128 for s in serials)
    assert ca.active.certificate.serial_number not in serials


@pytest.mark.parametrize(
    ("ttl", "lifetime"),
    [
        (None, timedelta(hours=1)),  # the default X509-SVID TTL
        (timedelta(minutes=10), timedelta(minutes=10)),
        (timedelta(hours=3), timedelta(hours=3)),
    ],
)
def test_validity_is_backdated_and_lasts_the_ttl(make_ca, clock, ttl, lifetime):
    ca = make_ca(clock)
    now = clock.advance(timedelta(minutes=3))
    issue, _ = issue_svid(ca, now, ttl=ttl)
    leaf = issue.certificate
    assert timedelta(seconds=1) <= BACKDATE <= timedelta(minutes=1)
    assert leaf.not_valid_before_utc == now - BACKDATE
    assert leaf.not_valid_after_utc == now + lifetime
    assert issue.capped is False


def test_configured_default_ttl_is_used(make_ca, clock):
    ca = make_ca(clock, x509_svid_ttl=timedelta(minutes=20))
    issue, _ = issue_svid(ca, clock())
    assert issue.certificate.not_valid_after_utc == clock() + timedelta(minutes=20)


def test_ttl_beyond_the_ca_is_capped_at_its_not_after(make_ca, clock):
    ca = make_ca(clock)
    now = clock.advance(timedelta(hours=2))
    issue, key = issue_svid(ca, now, ttl=timedelta(days=7))
    assert issue.capped is True
    assert issue.certificate.not_valid_after_utc == ca.active.not_after
    assert ca.active.not_after == ca.active.certificate.not_valid_after_utc
    parse_svid(issue, key)
    verify_x509(ca.bundle.x509_authorities, issue.chain, at=ca.active.not_after)


def test_verification_follows_the_validity_window(make_ca, clock):
    ca = make_ca(clock)
    now = clock()
    issue, _ = issue_svid(ca, now)
    roots = ca.bundle.x509_authorities
    not_after = issue.certificate.not_valid_after_utc
    verify_x509(roots, issue.chain, at=now - BACKDATE)
    verify_x509(roots, issue.chain, at=not_after)
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verify_x509(roots, issue.chain, at=not_after + timedelta(seconds=1))
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verify_x509(roots, issue.chain, at=now - BACKDATE - timedelta(seconds=1))


def test_svid_does_not_verify_against_another_cas_bundle(make_ca, clock, tmp_path: Path):
    ca = make_ca(clock)
    issue, _ = issue_svid(ca, clock())
    with standalone_ca(tmp_path / "other", clock()) as other:
        assert other.bundle.x509_authorities != ca.bundle.x509_authorities
        with pytest.raises(VerificationError):
            verify_x509(other.bundle.x509_authorities, issue.chain, at=clock())
        foreign, _ = issue_svid(other, clock())
        with pytest.raises(VerificationError):
            verify_x509(ca.bundle.x509_authorities, foreign.chain, at=clock())


# -- the CA certificate ----------------------------------------------------------------


def test_ca_certificate_is_a_spiffe_signing_certificate(make_ca, clock):
    ca = make_ca(clock)
    cert = ca.active.certificate

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical is True
    assert bc.value.ca is True

    ku_ext = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku_ext.critical is True
    assert ku_ext.value.key_cert_sign is True
    assert ku_ext.value.crl_sign is True

    assert _uris(cert) == ["spiffe://example.org"]
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    assert 0 < cert.serial_number < 2**128
    assert cert.not_valid_before_utc == clock() - BACKDATE
    assert cert.not_valid_after_utc == clock() + timedelta(hours=24)
    assert ca.bundle.x509_authorities == (cert,)


@pytest.mark.parametrize(
    ("key_type", "key_class", "key_size", "hash_name"),
    [
        (KeyType.EC_P256, ec.EllipticCurvePublicKey, 256, "sha256"),
        (KeyType.EC_P384, ec.EllipticCurvePublicKey, 384, "sha384"),
        (KeyType.RSA_2048, rsa.RSAPublicKey, 2048, "sha256"),
    ],
)
def test_every_ca_key_type_issues_verifiable_svids(
    make_ca, clock, key_type, key_class, key_size, hash_name
):
    ca = make_ca(clock, key_type=key_type)
    cert = ca.active.certificate
    public_key = cert.public_key()
    assert isinstance(public_key, key_class)
    assert public_key.key_size == key_size
    assert ca.active.key_type is key_type
    assert isinstance(cert.signature_hash_algorithm, hashes.HashAlgorithm)
    assert cert.signature_hash_algorithm.name == hash_name

    for key_kind in ("p256", "rsa2048"):
        issue, key = issue_svid(ca, clock(), key_kind=key_kind)
        assert issue.certificate.signature_hash_algorithm is not None
        assert issue.certificate.signature_hash_algorithm.name == hash_name
        assert str(parse_svid(issue, key).spiffe_id) == str(WORKLOAD_ID)
        verify_x509(ca.bundle.x509_authorities, issue.chain, at=clock())


# -- CSRs (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize("key_kind", ["p256", "p384", "rsa2048"])
@pytest.mark.parametrize("encoding", [serialization.Encoding.DER, serialization.Encoding.PEM])
def test_valid_csrs_are_accepted(key_kind, encoding):
    key = new_key(key_kind)
    public_key = public_key_from_csr(make_csr(key, encoding=encoding))
    assert spki(public_key) == spki(key)


def test_csr_with_leading_whitespace_pem_is_accepted():
    key = new_key("p256")
    data = b"\n  " + make_csr(key, encoding=serialization.Encoding.PEM)
    assert spki(public_key_from_csr(data)) == spki(key)


def _tampered_signature(key_kind: str) -> bytes:
    data = bytearray(make_csr(new_key(key_kind)))
    data[-1] ^= 0x01  # the signature BIT STRING ends the DER
    return bytes(data)


@pytest.mark.parametrize(
    ("make_data", "message"),
    [
        pytest.param(
            lambda: _tampered_signature("p256"), "signature does not verify", id="bad-sig-ec"
        ),
        pytest.param(
            lambda: _tampered_signature("rsa2048"), "signature does not verify", id="bad-sig-rsa"
        ),
        pytest.param(lambda: b"\x30\x82garbage", "not a PKCS#10", id="garbage-der"),
        pytest.param(lambda: b"", "not a PKCS#10", id="empty"),
        pytest.param(
            lambda: (
                b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
            ),
            "not a PKCS#10",
            id="garbage-pem",
        ),
        pytest.param(
            lambda: make_csr(new_key("ed25519")),
            "Ed25519PublicKey keys are not supported",
            id="ed25519",
        ),
        pytest.param(
            lambda: make_csr(new_key("rsa1024")), "RSA key of 1024 bits is too small", id="rsa1024"
        ),
        pytest.param(
            lambda: make_csr(new_key("p521")), "EC curve secp521r1 is not supported", id="p521"
        ),
        pytest.param(
            lambda: make_csr(new_key("secp256k1")),
            "EC curve secp256k1 is not supported",
            id="secp256k1",
        ),
    ],
)
def test_bad_csrs_are_rejected_naming_the_problem(make_data, message):
    with pytest.raises(InvalidCSRError) as info:
        public_key_from_csr(make_data())
    assert info.value.field == "csr"
    assert message in info.value.message
    assert str(info.value).startswith("csr: ")
    assert info.value.code == "invalid_csr"


# -- SPIFFE IDs (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("example.org/ns/web", "does not start with 'spiffe://'"),
        ("spiffe://Example.org/ns/web", "trust domain must be lowercase"),
        ("spiffe://example.org/ns//web", "empty segments"),
        ("spiffe://example.org/ns/web/", "empty segments"),
        ("spiffe://example.org/ns/../web", "'..'"),
        ("spiffe://example.org/ns/./web", "'.'"),
        ("spiffe://example.org/ns/web?x=1", "invalid character"),
        ("spiffe://example.org/ns/web#frag", "invalid character"),
        ("spiffe://example.org/ns/a b", "invalid character"),
        ("spiffe://example.org:8443/ns/web", "disallowed characters"),
        ("spiffe://user@example.org/ns/web", "disallowed characters"),
        ("spiffe:///ns/web", "cannot be empty"),
        ("", "cannot be empty"),
    ],
)
def test_malformed_spiffe_ids_are_rejected(value, reason):
    with pytest.raises(InvalidSpiffeIdError) as info:
        parse_spiffe_id(value, field="entries[0].spiffe_id")
    assert info.value.field == "entries[0].spiffe_id"
    assert str(info.value).startswith("entries[0].spiffe_id: ")
    assert repr(value) in info.value.message
    assert reason in info.value.message


def test_valid_spiffe_id_is_parsed_unchanged():
    parsed = parse_spiffe_id("spiffe://example.org/ns/Default/sa/web-1_x.y")
    assert str(parsed) == "spiffe://example.org/ns/Default/sa/web-1_x.y"
    assert parsed.trust_domain == TrustDomain("example.org")
    assert parsed.path == "/ns/Default/sa/web-1_x.y"


def test_spiffe_id_error_names_the_default_field():
    with pytest.raises(InvalidSpiffeIdError) as info:
        parse_spiffe_id("spiffe://example.org/a//b")
    assert info.value.field == "spiffe_id"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("spiffe://other.org/ns/web", "is not in trust domain example.org"),
        ("spiffe://example.org", "has no path"),
        ("spiffe://example.org.evil/ns/web", "is not in trust domain example.org"),
    ],
)
def test_ids_outside_the_trust_domain_or_without_path_are_refused(value, reason):
    with pytest.raises(InvalidSpiffeIdError) as info:
        require_member(SpiffeId(value), TrustDomain("example.org"), field="spiffe_id")
    assert info.value.field == "spiffe_id"
    assert reason in info.value.message
    assert value in info.value.message


def test_member_of_the_trust_domain_is_accepted():
    assert (
        require_member(
            parse_spiffe_id("spiffe://example.org/ns/web"), TrustDomain("example.org"), field="x"
        )
        is None
    )
