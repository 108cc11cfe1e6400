"""X.509 templates for the SPIFFE X509-SVID spec: CA (signing) certificates and leaf SVIDs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId, TrustDomain

from identity.errors import InvalidCSRError
from identity.keys import PrivateKey, PublicKey, check_public_key, signature_hash

__all__ = [
    "BACKDATE",
    "Issuer",
    "build_ca_certificate",
    "build_leaf",
    "new_serial",
    "public_key_from_csr",
]

# Clocks across a mesh disagree by a few seconds; a cert valid "from now" would be
# rejected by a peer whose clock is behind.
BACKDATE = timedelta(seconds=10)

_ORG = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshward")
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def new_serial() -> int:
    """A random, positive, non-zero 128-bit serial number."""
    return secrets.randbits(128) or 1


@dataclass(slots=True, frozen=True)
class Issuer:
    """A certificate and key that sign, with what every signature needs computed once."""

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[
        x509.Certificate, ...
    ]  # the issuer itself, then its issuers up to (not including) the root
    authority_key_id: x509.AuthorityKeyIdentifier

    @classmethod
    def of(
        cls,
        certificate: x509.Certificate,
        key: PrivateKey,
        intermediates: tuple[x509.Certificate, ...] = (),
    ) -> Issuer:
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return cls(
            certificate=certificate,
            key=key,
            chain=(certificate, *intermediates),
            authority_key_id=x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
        )

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


def public_key_from_csr(data: bytes) -> PublicKey:
    """Parse a PEM or DER CSR, check its signature and key type, and return its public key."""
    try:
        csr = (
            x509.load_pem_x509_csr(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_csr(data)
        )
    except (ValueError, x509.InvalidVersion) as exc:
        # InvalidVersion is not a ValueError: a CSR whose version is not 0 (found by
        # tests/fuzz/test_fuzz_identity.py) otherwise escaped as an internal error.
        raise InvalidCSRError(
            f"not a PKCS#10 certificate signing request ({exc})", field="csr"
        ) from exc
    try:
        key = csr.public_key()
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise InvalidCSRError(f"unsupported CSR key or signature ({exc})", field="csr") from exc
    checked = check_public_key(key)
    if not valid:
        raise InvalidCSRError(
            "signature does not verify; the CSR must be signed by the key it carries", field="csr"
        )
    return checked


def build_leaf(
    *,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    dns_names: tuple[str, ...],
    not_before: datetime,
    not_after: datetime,
    issuer: Issuer,
) -> x509.Certificate:
    """An X509-SVID: one URI SAN, cA=false, digitalSignature (+keyEncipherment for RSA)."""
    subject = [_ORG]
    if dns_names:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(name) for name in dns_names]
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(issuer.authority_key_id, critical=False)
    )
    return builder.sign(issuer.key, signature_hash(issuer.key))


def build_ca_certificate(
    *,
    key: PrivateKey,
    trust_domain: TrustDomain,
    common_name: str,
    not_before: datetime,
    not_after: datetime,
    issuer: Issuer | None,
) -> x509.Certificate:
    """A signing certificate: cA=true, keyCertSign+cRLSign, URI SAN of the bare trust domain.

    With ``issuer`` None the certificate is a self-signed root.
    """
    public_key = key.public_key()
    name = x509.Name([_ORG, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = (
        issuer.authority_key_id
        if issuer
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.certificate.subject if issuer else name)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
                [x509.UniformResourceIdentifier(trust_domain.as_spiffe_id())]
            ),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )
    signer = issuer.key if issuer else key
    return builder.sign(signer, signature_hash(signer))
