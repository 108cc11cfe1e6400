"""Key generation and private-key files.

Private keys are written with mode 0600 inside directories of mode 0700, and only
through :func:`write_private_key`, so the rule lives in one place.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identity.errors import InvalidCSRError

__all__ = [
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "check_public_key",
    "generate_key",
    "jwt_algorithm",
    "key_type_of",
    "load_private_key",
    "load_public_key",
    "signature_hash",
    "write_private_key",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"


def generate_key(key_type: KeyType) -> PrivateKey:
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_type_of(key: PrivateKey) -> KeyType | None:
    """The KeyType a key was generated as; None for a shape generate_key never makes."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}.get(key.curve.name)
    return KeyType.RSA_2048 if key.key_size == 2048 else None


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def jwt_algorithm(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ES384" if key.curve.key_size > 256 else "ES256"
    return "RS256"


def check_public_key(key: object, *, field: str = "csr") -> PublicKey:
    """Accept only key types Envoy and every SPIFFE library handle: EC P-256/P-384, RSA ≥ 2048."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            return key
        raise InvalidCSRError(
            f"EC curve {key.curve.name} is not supported; use P-256 or P-384", field=field
        )
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= 2048:
            return key
        raise InvalidCSRError(
            f"RSA key of {key.key_size} bits is too small; use at least 2048", field=field
        )
    raise InvalidCSRError(
        f"{type(key).__name__.removeprefix('_')} keys are not supported; "
        "use EC P-256, EC P-384 or RSA (2048 bits or more)",
        field=field,
    )


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, never readable by anyone but the owner.

    A missing directory is made 0700; an existing one is left as its owner set it.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_private_key(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"{type(key).__name__} keys are not supported")
    return key


def load_public_key(data: bytes) -> PublicKey:
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise TypeError(f"{type(key).__name__} keys are not supported")
    return key
