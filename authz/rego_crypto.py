"""OPA's ``crypto`` built-ins, which regorus lacks, on hashlib, hmac and ``cryptography``.

Digests and MACs are lower-case hex of the string's UTF-8 bytes, as in OPA.
``crypto.x509.parse_certificates`` returns, for each certificate, the fields of Go's
``x509.Certificate`` that policies read, under Go's names: ``Version``,
``SerialNumber``, ``Subject`` and ``Issuer`` (``CommonName``, ``Organization``,
``OrganizationalUnit``, ``Country``, ``Province``, ``Locality``, ``SerialNumber``),
``NotBefore``/``NotAfter`` (RFC 3339), ``DNSNames``, ``EmailAddresses``,
``IPAddresses``, ``URIStrings`` (Go gives URL objects under ``URIs``; the string form
is what SPIFFE IDs are compared with), ``IsCA`` and ``Raw`` (base64 DER). OPA gives
every field Go has; one missing here is undefined.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable
from datetime import UTC
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from authz.rego_jwt import BuiltinError

__all__ = ["digest", "hmac_digest", "hmac_equal", "parse_certificates"]


def _text(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BuiltinError(f"{what} is not a string")
    return value.encode()


def digest(name: str) -> Callable[[Any], str]:
    """``crypto.<name>(x)``: the hex digest of ``x``."""

    def builtin(value: Any) -> str:
        return hashlib.new(name, _text(value, "the input")).hexdigest()

    builtin.__name__ = name
    return builtin


def hmac_digest(name: str) -> Callable[[Any, Any], str]:
    """``crypto.hmac.<name>(x, key)``: the hex HMAC of ``x`` under ``key``."""

    def builtin(value: Any, key: Any) -> str:
        return hmac.new(_text(key, "the key"), _text(value, "the input"), name).hexdigest()

    builtin.__name__ = f"hmac_{name}"
    return builtin


def hmac_equal(mac1: Any, mac2: Any) -> bool:
    """``crypto.hmac.equal(mac1, mac2)``: equal, compared in constant time."""
    return hmac.compare_digest(_text(mac1, "the first MAC"), _text(mac2, "the second MAC"))


_NAME_FIELDS = {
    "CommonName": NameOID.COMMON_NAME,
    "SerialNumber": NameOID.SERIAL_NUMBER,
}
_NAME_LISTS = {
    "Organization": NameOID.ORGANIZATION_NAME,
    "OrganizationalUnit": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "Country": NameOID.COUNTRY_NAME,
    "Province": NameOID.STATE_OR_PROVINCE_NAME,
    "Locality": NameOID.LOCALITY_NAME,
}


def parse_certificates(certs: Any) -> list[dict[str, Any]]:
    """``crypto.x509.parse_certificates(certs)``: PEM (one or more), or base64 DER or PEM."""
    raw = _text(certs, "the certificates")
    try:
        if not raw.startswith(b"-----BEGIN"):
            raw = base64.b64decode(raw, validate=True)  # DER, or PEM, in base64
        if raw.startswith(b"-----BEGIN"):
            found = x509.load_pem_x509_certificates(raw)
        else:
            found = [x509.load_der_x509_certificate(raw)]
    except (ValueError, binascii.Error, x509.InvalidVersion) as exc:
        raise BuiltinError(f"the certificates do not parse: {exc}") from None
    return [_certificate(certificate) for certificate in found]


def _name(name: x509.Name) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, oid in _NAME_FIELDS.items():
        values = name.get_attributes_for_oid(oid)
        out[field] = str(values[0].value) if values else ""
    for field, oid in _NAME_LISTS.items():
        values = name.get_attributes_for_oid(oid)
        out[field] = [str(v.value) for v in values] if values else None
    return out


def _certificate(certificate: x509.Certificate) -> dict[str, Any]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {
        "Version": certificate.version.value + 1,
        "SerialNumber": certificate.serial_number,
        "Subject": _name(certificate.subject),
        "Issuer": _name(certificate.issuer),
        "NotBefore": certificate.not_valid_before_utc.astimezone(UTC)
        .isoformat()
        .replace("+00:00", "Z"),
        "NotAfter": certificate.not_valid_after_utc.astimezone(UTC)
        .isoformat()
        .replace("+00:00", "Z"),
        "DNSNames": names.get_values_for_type(x509.DNSName) or None,
        "EmailAddresses": names.get_values_for_type(x509.RFC822Name) or None,
        "IPAddresses": [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] or None,
        "URIStrings": names.get_values_for_type(x509.UniformResourceIdentifier) or None,
        "IsCA": is_ca,
        "Raw": base64.b64encode(certificate.public_bytes(Encoding.DER)).decode(),
    }
