"""Test-side X.509 and JWT tooling: keys, CSRs, test roots, and independent verifiers.

Verification never goes through meshward code: X.509 chains are checked with
cryptography's RFC 5280 verifier and parsed with py-spiffe, JWT-SVIDs are validated
with py-spiffe, so a test fails when meshward's output would fail a real peer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import jwt.api_jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerifiedClient
from prometheus_client import CollectorRegistry
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, X509Svid

from identity.authority import CASettings, CertificateAuthority, X509SvidIssue
from identity.bundle import TrustBundle
from identity.metrics import IdentityMetrics
from identity.store.database import Database, sqlite_url

TRUST_DOMAIN = TrustDomain("example.org")
WORKLOAD_ID = SpiffeId("spiffe://example.org/ns/default/sa/web")

AnyKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def new_key(kind: str) -> AnyKey:
    """A private key by short name: p256, p384, p521, secp256k1, rsa1024, rsa2048, ed25519."""
    match kind:
        case "p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "p521":
            return ec.generate_private_key(ec.SECP521R1())
        case "secp256k1":
            return ec.generate_private_key(ec.SECP256K1())
        case "rsa1024":
            # weak on purpose: the CA must refuse it
            return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
        case "rsa2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
    raise AssertionError(f"unknown key kind {kind}")


def spki(key: object) -> bytes:
    """The DER SubjectPublicKeyInfo of a public or private key, for comparing keys."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_csr(
    key: AnyKey,
    *,
    encoding: serialization.Encoding = serialization.Encoding.DER,
    spiffe_id: str = str(WORKLOAD_ID),
) -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, algorithm)
    )
    return csr.public_bytes(encoding)


def pkcs8_der(key: AnyKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def der_chain(chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: AnyKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def parse_svid(issue: X509SvidIssue, key: AnyKey) -> X509Svid:
    """Parse the SVID the way a workload does (py-spiffe, DER chain + PKCS#8 key)."""
    return X509Svid.parse_raw(der_chain(issue.chain), pkcs8_der(key))


def verify_x509(
    roots: Sequence[x509.Certificate], chain: Sequence[x509.Certificate], *, at: datetime
) -> VerifiedClient:
    """Verify ``chain`` (leaf first) as a client certificate against ``roots`` at ``at``."""
    verifier = PolicyBuilder().store(Store(list(roots))).time(at).build_client_verifier()
    return verifier.verify(chain[0], list(chain[1:]))


@contextmanager
def jwt_clock(at: datetime) -> Iterator[None]:
    """Make PyJWT (under py-spiffe) check exp against ``at`` instead of the wall clock."""

    class _Frozen(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return at

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jwt.api_jwt, "datetime", _Frozen)
        yield


def validate_jwt(token: str, bundle: TrustBundle, audience: set[str], *, at: datetime) -> JwtSvid:
    """Validate a JWT-SVID with py-spiffe against the JWT part of ``bundle`` at time ``at``."""
    jwt_bundle = JwtBundle.parse(TRUST_DOMAIN, bundle.jwt_bundle_json())
    with jwt_clock(at):
        return JwtSvid.parse_and_validate(token, jwt_bundle, audience)


def issue_svid(
    ca: CertificateAuthority,
    now: datetime,
    *,
    key_kind: str = "p256",
    spiffe_id: SpiffeId = WORKLOAD_ID,
    dns_names: tuple[str, ...] = (),
    ttl: timedelta | None = None,
) -> tuple[X509SvidIssue, AnyKey]:
    key = new_key(key_kind)
    public_key = key.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    issue = ca.sign_x509_svid(
        public_key=public_key,
        spiffe_id=spiffe_id,
        dns_names=dns_names,
        ttl=ttl,
        issued_to="spiffe://example.org/agent/test",
        now=now,
    )
    return issue, key


@contextmanager
def standalone_ca(
    directory: Path, now: datetime, **settings: object
) -> Iterator[CertificateAuthority]:
    """Another CA for the same trust domain, on its own SQLite database and key dir."""
    directory.mkdir(parents=True, exist_ok=True)
    db = Database(sqlite_url(directory))
    db.migrate()
    ca = CertificateAuthority(
        db=db,
        trust_domain=TRUST_DOMAIN,
        key_dir=directory / "keys",
        settings=CASettings(**settings),  # type: ignore[arg-type]
        metrics=IdentityMetrics(CollectorRegistry()),
    )
    ca.load(now)
    try:
        yield ca
    finally:
        ca.close()
        db.dispose()


# -- test authorities (upstream CAs) ---------------------------------------------------


@dataclass(slots=True, frozen=True)
class FakeUpstreamCA:
    certificate: x509.Certificate
    key: AnyKey


def make_upstream_ca(
    name: str,
    *,
    not_before: datetime,
    not_after: datetime,
    issuer: FakeUpstreamCA | None = None,
    key_kind: str = "p256",
    ca: bool = True,
    key_cert_sign: bool = True,
    ski: bool = True,
) -> FakeUpstreamCA:
    """A root (``issuer`` None) or intermediate CA as an operator would make one."""
    key = new_key(key_kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not key_cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    if issuer is not None:
        issuer_ski = issuer.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    signer = issuer.key if issuer else key
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return FakeUpstreamCA(certificate=builder.sign(signer, algorithm), key=key)
