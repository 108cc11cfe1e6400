"""The local trust bundle: X.509 roots and JWT keys, as PEM and as a SPIFFE bundle (JWKS)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from spiffe import TrustDomain

from identity.keys import PublicKey

__all__ = ["JwtAuthority", "TrustBundle", "jwk"]


@dataclass(slots=True, frozen=True)
class JwtAuthority:
    key_id: str
    public_key: PublicKey


@dataclass(slots=True, frozen=True)
class TrustBundle:
    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: tuple[JwtAuthority, ...]
    sequence: int
    refresh_hint_seconds: int

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    def jwt_keys(self) -> list[dict[str, Any]]:
        return [jwk(a.public_key, use="jwt-svid", kid=a.key_id) for a in self.jwt_authorities]

    def jwks(self) -> dict[str, Any]:
        """The SPIFFE bundle format (SPIFFE Trust Domain and Bundle, section 4)."""
        keys = [
            {
                **jwk(_public_key(cert), use="x509-svid"),
                "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
            }
            for cert in self.x509_authorities
        ]
        return {
            "keys": keys + self.jwt_keys(),
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_seconds,
        }

    def jwt_bundle_json(self) -> bytes:
        """The JWT part alone, as py-spiffe's ``JwtBundle.parse`` and the Workload API expect."""
        return json.dumps({"keys": self.jwt_keys()}).encode()


def jwk(key: PublicKey, *, use: str, kid: str | None = None) -> dict[str, Any]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        fields: dict[str, Any] = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        fields = RSAAlgorithm.to_jwk(key, as_dict=True)
    fields.pop("key_ops", None)
    fields["use"] = use
    if kid is not None:
        fields["kid"] = kid
    return fields


def _public_key(cert: x509.Certificate) -> PublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise TypeError(f"root certificate key type {type(key).__name__} cannot go in a JWKS")
    return key
