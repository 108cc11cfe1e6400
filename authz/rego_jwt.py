"""OPA's ``io.jwt`` built-ins, which regorus lacks, on PyJWT's algorithms and ``cryptography``.

Each function here raises ``BuiltinError`` where OPA's built-in returns an error; the
Rego wrapper (``authz.rego_builtins``) turns that into an undefined call, as OPA does
when it evaluates without ``--strict-builtin-errors``. What OPA answers with a value
(``false``, or ``[false, {}, {}]``) is answered with that value.

Keys, as OPA takes them: for HMAC the secret as a string; otherwise a PEM certificate,
a PEM public key, a JWK or a JWK set (JSON text). With a set, a token verifies when
any key of it does.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import get_default_algorithms

__all__ = ["BuiltinError", "decode", "decode_verify", "encode_sign", "encode_sign_raw", "verify"]


class BuiltinError(Exception):
    """The built-in fails: OPA reports an error, which leaves the call undefined."""


_ALGORITHMS = get_default_algorithms()
VERIFY_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)


def _b64(segment: str, what: str) -> bytes:
    # An empty header or payload then fails as JSON; an empty signature is alg none's.
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BuiltinError(f"{what} is not base64url: {exc}") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BuiltinError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BuiltinError(f"{what} is not a JSON object")
    return value


class _Token:
    __slots__ = ("header", "payload", "signature", "signed")

    def __init__(self, text: Any) -> None:
        if not isinstance(text, str):
            raise BuiltinError("the token is not a string")
        parts = text.split(".")
        if len(parts) == 5:
            raise BuiltinError("JWE tokens are not supported")
        if len(parts) != 3:
            raise BuiltinError("a JWT has three segments")
        self.header = _json_object(_b64(parts[0], "the JWT header"), "the JWT header")
        if "enc" in self.header:
            raise BuiltinError("JWE tokens are not supported")
        self.payload = _b64(parts[1], "the JWT payload")
        self.signature = _b64(parts[2], "the JWT signature")
        self.signed = f"{parts[0]}.{parts[1]}".encode()

    def claims(self) -> dict[str, Any]:
        # A nested token (cty: JWT) carries another JWT as its payload; OPA decodes it.
        if str(self.header.get("cty", "")).upper() == "JWT":
            return _Token(self.payload.decode("utf-8", "replace")).claims()
        return _json_object(self.payload, "the JWT payload")


def decode(token: Any) -> list[Any]:
    """``io.jwt.decode(jwt)``: ``[header, payload, signature as hex]``, unverified."""
    parsed = _Token(token)
    return [parsed.header, parsed.claims(), parsed.signature.hex()]


def verify(algorithm: str) -> Callable[[Any, Any], bool]:
    """``io.jwt.verify_<alg>(jwt, key)``: whether the signature is valid under ``key``."""

    def builtin(token: Any, key: Any) -> bool:
        return _signature_valid(_Token(token), algorithm, key)

    builtin.__name__ = f"verify_{algorithm.lower()}"
    return builtin


def _signature_valid(token: _Token, algorithm: str, key: Any) -> bool:
    if not isinstance(key, str):
        raise BuiltinError("the key is not a string")
    if algorithm.startswith("HS"):
        # Plain HMAC: PyJWT's would warn on every short secret, which OPA accepts.
        expected = hmac.new(key.encode(), token.signed, f"sha{algorithm[2:]}").digest()
        return hmac.compare_digest(expected, token.signature)
    implementation = _ALGORITHMS[algorithm]
    for prepared in _keys(algorithm, key, token.header):
        try:
            if implementation.verify(token.signed, prepared, token.signature):
                return True
        except (ValueError, TypeError):
            continue
    return False


def _keys(algorithm: str, key: str, header: Mapping[str, Any]) -> Iterator[Any]:
    text = key.strip()
    if text.startswith("-----BEGIN CERTIFICATE"):
        try:
            certificates = x509.load_pem_x509_certificates(text.encode())
        except (ValueError, x509.InvalidVersion) as exc:
            raise BuiltinError(f"the certificate does not parse: {exc}") from None
        for certificate in certificates:
            yield certificate.public_key()
        return
    if text.startswith("-----BEGIN"):
        try:
            yield load_pem_public_key(text.encode())
        except (ValueError, TypeError) as exc:
            raise BuiltinError(f"the public key does not parse: {exc}") from None
        return
    try:
        document = json.loads(text)
    except ValueError:
        raise BuiltinError("the key is neither PEM nor a JWK or JWK set") from None
    jwks = document.get("keys") if isinstance(document, dict) else None
    members = jwks if isinstance(jwks, list) else [document]
    if not all(isinstance(member, dict) for member in members):
        raise BuiltinError("a JWK is not a JSON object")
    # As OPA: the key the token's kid names decides alone; otherwise every key whose
    # alg is unset or the token's is tried.
    named = [m for m in members if "kid" in header and m.get("kid") == header["kid"]]
    candidates = named or [m for m in members if m.get("alg") in (None, header.get("alg"))]
    for member in candidates:
        try:
            yield jwt.PyJWK(member, algorithm).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError, TypeError):
            continue  # a key of another type cannot verify: false, as in OPA


_INVALID: list[Any] = [False, {}, {}]
_CONSTRAINTS = frozenset({"alg", "cert", "secret", "iss", "aud", "time"})


def decode_verify(
    token: Any, constraints: Any, *, now_ns: Callable[[], int] = time.time_ns
) -> list[Any]:
    """``io.jwt.decode_verify(jwt, constraints)``: ``[valid, header, payload]``.

    ``constraints`` as OPA reads them: ``cert`` (PEM or JWK set) or ``secret``, exactly
    one; ``alg``, ``iss`` and ``aud`` to match; ``time`` (ns since the epoch, default
    now) against ``exp`` and ``nbf``. A token carrying ``aud`` needs an ``aud``
    constraint it names. Invalid is ``[false, {}, {}]``; a malformed token or
    constraint object is an error.
    """
    if not isinstance(constraints, Mapping):
        raise BuiltinError("the constraints are not an object")
    unknown = set(constraints) - _CONSTRAINTS
    if unknown:
        raise BuiltinError(f"unknown constraint {sorted(unknown)[0]!r}")
    has_cert = "cert" in constraints
    has_secret = constraints.get("secret") not in (None, "")
    if has_cert == has_secret:
        raise BuiltinError("give exactly one of cert and secret")
    parsed = _Token(token)
    header_alg = parsed.header.get("alg")
    if "alg" in constraints and constraints["alg"] != header_alg:
        return _INVALID
    if header_alg not in VERIFY_ALGORITHMS:
        return _INVALID
    if has_secret != str(header_alg).startswith("HS"):
        return _INVALID
    key = constraints["secret"] if has_secret else constraints["cert"]
    if not _signature_valid(parsed, str(header_alg), key):
        return _INVALID
    payload = parsed.claims()
    instant = constraints.get("time")
    if instant is None:
        instant = now_ns()
    if not _number(instant) or instant < 0:
        raise BuiltinError("the time constraint is not a number of nanoseconds")
    seconds = instant / 1e9
    exp, nbf = payload.get("exp"), payload.get("nbf")
    if (exp is not None and not _number(exp)) or (nbf is not None and not _number(nbf)):
        raise BuiltinError("exp and nbf must be numbers")
    if (exp is not None and seconds >= exp) or (nbf is not None and seconds < nbf):
        return _INVALID
    if "iss" in constraints and payload.get("iss") != constraints["iss"]:
        return _INVALID
    audience = payload.get("aud")
    if "aud" in constraints:
        names = audience if isinstance(audience, list) else [audience]
        if constraints["aud"] not in names:
            return _INVALID
    elif audience not in (None, "", []):
        return _INVALID
    return [True, parsed.header, payload]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def encode_sign_raw(headers: Any, payload: Any, key: Any) -> str:
    """``io.jwt.encode_sign_raw(headers, payload, key)``: JSON texts in, a signed JWT out.

    ``key`` is a JWK as JSON text; the algorithm is the header's ``alg``.
    """
    if not all(isinstance(v, str) for v in (headers, payload, key)):
        raise BuiltinError("headers, payload and key must be strings")
    header = _json_object(headers.encode(), "the header")
    algorithm = header.get("alg")
    if algorithm not in VERIFY_ALGORITHMS:
        raise BuiltinError(f"unsupported alg {algorithm!r}")
    try:
        jwk = json.loads(key)
        prepared = jwt.PyJWK(jwk, algorithm).key
    except (ValueError, jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError) as exc:
        raise BuiltinError(f"the key is not a JWK: {exc}") from None
    signing_input = f"{_b64encode(headers.encode())}.{_b64encode(payload.encode())}"
    signature = _ALGORITHMS[algorithm].sign(signing_input.encode(), prepared)
    return f"{signing_input}.{_b64encode(signature)}"


def encode_sign(headers: Any, payload: Any, key: Any) -> str:
    """``io.jwt.encode_sign(headers, payload, key)``: objects in (``key`` a JWK), a JWT out."""
    if not all(isinstance(v, Mapping) for v in (headers, payload, key)):
        raise BuiltinError("headers, payload and key must be objects")
    return encode_sign_raw(_compact(headers), _compact(payload), json.dumps(key))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
