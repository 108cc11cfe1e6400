"""Test-side X509-SVIDs for the authz TLS tests: a root CA, leaves, and py-spiffe contexts.

Independent of meshward's CA on purpose: these tests are about serving and checking
certificates, so they make exactly the certificates they need (a leaf with no SPIFFE ID,
one from a foreign root, …).
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509BundleSet, X509Svid
from spiffe.workloadapi.x509_context import X509Context

from tests.identity.certs import key_pem, pem

SERVER_NAME = "authz.meshward.test"  # DNS SAN of the server SVID; clients pin it


@dataclass(slots=True, frozen=True)
class Leaf:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def chain_pem(self) -> bytes:
        return pem(self.certificate)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


class Authority:
    """A self-signed root for one trust domain, issuing SVID-shaped leaves."""

    def __init__(self, trust_domain: str = "example.org") -> None:
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def roots_pem(self) -> bytes:
        return pem(self.certificate)

    def leaf(self, spiffe_id: str | None, *, dns: str | None = None) -> Leaf:
        """An X509-SVID for ``spiffe_id`` (None: a certificate with no URI SAN at all)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        sans: list[x509.GeneralName] = []
        if spiffe_id is not None:
            sans.append(x509.UniformResourceIdentifier(spiffe_id))
        if dns is not None:
            sans.append(x509.DNSName(dns))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Leaf(builder.sign(self.key, hashes.SHA256()), key)

    def context(self, spiffe_id: str, *, dns: str | None = SERVER_NAME) -> X509Context:
        """What py-spiffe's Workload API client hands over for one SVID and this bundle."""
        leaf = self.leaf(spiffe_id, dns=dns)
        svid = X509Svid(SpiffeId(spiffe_id), [leaf.certificate], leaf.key)
        td = TrustDomain(self.trust_domain)
        bundle = X509Bundle(td, {self.certificate})
        return X509Context([svid], X509BundleSet.of([bundle]))


def served_certificate(port: int, client: Leaf, roots_pem: bytes) -> x509.Certificate:
    """The certificate a TLS server on loopback presents to a new connection from ``client``."""
    context = ssl.create_default_context(cadata=roots_pem.decode())
    context.check_hostname = False  # SVIDs are checked by SPIFFE ID, not host name
    context.set_alpn_protocols(["h2"])
    # ssl loads a client certificate only from files.
    with tempfile.TemporaryDirectory() as directory:
        chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
        chain.write_bytes(client.chain_pem)
        key.write_bytes(client.key_pem)
        context.load_cert_chain(chain, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
