"""The "disk" upstream authority: meshward's CA is an intermediate under a root kept in files."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from identity.errors import InvalidCSRError, UpstreamAuthorityError
from identity.keys import PrivateKey, check_public_key, load_private_key
from identity.x509certs import Issuer

__all__ = ["UpstreamAuthority", "load_upstream"]


@dataclass(slots=True, frozen=True)
class UpstreamAuthority:
    issuer: Issuer
    roots: tuple[x509.Certificate, ...]

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """Upstream certificates an SVID chain must carry (none when the upstream is a root)."""
        return tuple(c for c in self.issuer.chain if c not in self.roots)


def load_upstream(
    cert_file: Path, key_file: Path, bundle_file: Path | None, *, now: datetime
) -> UpstreamAuthority:
    """Load and cross-check the upstream files; every mismatch is named with the file to fix."""
    certs = _read_certs(cert_file, "ca.upstream.cert_file")
    cert = certs[0]
    key = _read_key(key_file)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise UpstreamAuthorityError(
            f"the key in {key_file} does not match the certificate in {cert_file}",
            field="ca.upstream.key_file",
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        ok = constraints.ca and usage.key_cert_sign
    except x509.ExtensionNotFound:
        ok = False
    if not ok:
        raise UpstreamAuthorityError(
            f"the certificate in {cert_file} is not a CA (needs basicConstraints cA=true and "
            "keyUsage keyCertSign)",
            field="ca.upstream.cert_file",
        )
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise UpstreamAuthorityError(
            f"the certificate in {cert_file} is not valid now (valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)",
            field="ca.upstream.cert_file",
        )
    if bundle_file is not None:
        roots_file, roots_field = bundle_file, "ca.upstream.bundle_file"
        roots = tuple(_read_certs(bundle_file, roots_field))
    elif _issued_by(certs[-1], certs[-1]):
        roots_file, roots_field = cert_file, "ca.upstream.cert_file"
        roots = (certs[-1],)
    else:
        raise UpstreamAuthorityError(
            f"{cert_file} does not end in a self-signed root; give the root(s) in bundle_file",
            field="ca.upstream.bundle_file",
        )
    try:
        issuer = Issuer.of(cert, key, tuple(certs[1:]))
    except x509.ExtensionNotFound as exc:
        raise UpstreamAuthorityError(
            f"the certificate in {cert_file} has no subjectKeyIdentifier extension",
            field="ca.upstream.cert_file",
        ) from exc
    _check_root_keys(roots, roots_file, roots_field)
    _check_chains_to_roots(certs, roots, cert_file)
    return UpstreamAuthority(issuer=issuer, roots=roots)


def _check_chains_to_roots(
    certs: list[x509.Certificate], roots: tuple[x509.Certificate, ...], cert_file: Path
) -> None:
    for i, (child, parent) in enumerate(itertools.pairwise(certs)):
        if not _issued_by(child, parent):
            raise UpstreamAuthorityError(
                f"certificate {i + 1} in {cert_file} is not issued by the certificate after it; "
                "list the chain from the issuing CA up to the root, in order",
                field="ca.upstream.cert_file",
            )
    top = certs[-1]
    if not any(_issued_by(top, root) for root in roots):
        raise UpstreamAuthorityError(
            f"the certificate chain in {cert_file} is not issued by any root in the upstream bundle",
            field="ca.upstream.bundle_file",
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_root_keys(roots: tuple[x509.Certificate, ...], path: Path, field: str) -> None:
    """Roots go into the JWKS bundle, which carries EC and RSA keys only."""
    for root in roots:
        try:
            check_public_key(root.public_key(), field=field)
        except InvalidCSRError as exc:
            raise UpstreamAuthorityError(
                f"root {root.subject.rfc4514_string()} in {path}: {exc.message}", field=field
            ) from exc


def _read_certs(path: Path, field: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise UpstreamAuthorityError(f"cannot read {path}: {exc.strerror}", field=field) from exc
    except ValueError as exc:
        raise UpstreamAuthorityError(f"{path} holds no PEM certificate", field=field) from exc
    return certs


def _read_key(path: Path) -> PrivateKey:
    try:
        return load_private_key(path.read_bytes())
    except OSError as exc:
        raise UpstreamAuthorityError(
            f"cannot read {path}: {exc.strerror}", field="ca.upstream.key_file"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise UpstreamAuthorityError(
            f"{path} holds no unencrypted EC or RSA private key in PEM ({exc})",
            field="ca.upstream.key_file",
        ) from exc
