"""OPA's io.jwt and crypto built-ins as policies call them, with tokens signed here.

Keys come from ``cryptography``; tokens are signed with PyJWT, or assembled by hand
where PyJWT refuses (``alg: none``, broken segments). Expected values are OPA's
answers as its built-in reference describes them (undefined where OPA reports an
error, which it leaves undefined unless ``--strict-builtin-errors``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from authz.rego_engine import RegoModule, compile_rego

NOW_NS = 1_800_000_000 * 10**9  # the `time` constraint of decode_verify
SECRET = "s3cret-" * 11  # 66 bytes: PyJWT signs HS512 test tokens without a warning


def rego(expr: str, **inputs: Any) -> Any:
    """``expr``'s value in a policy (``"undefined"`` when it has none)."""
    module = RegoModule("t.rego", f"package t\n\nx := {expr}\n")
    result = compile_rego([module], decision_path="t/x").evaluate(inputs)
    if result.error == "undefined":
        return "undefined"
    assert result.error is None, result.detail
    return result.value


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pem_public(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def certificate(key: Any) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example.org")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("issuer.example.org"),
                    x509.UniformResourceIdentifier("spiffe://example.org/ns/a/sa/b"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "ES384": ec.generate_private_key(ec.SECP384R1()),
    "ES512": ec.generate_private_key(ec.SECP521R1()),
}


def private_key(alg: str) -> Any:
    if alg.startswith("HS"):
        return SECRET
    return EC[alg] if alg.startswith("ES") else RSA


def public_key(alg: str) -> str:
    return SECRET if alg.startswith("HS") else pem_public(private_key(alg))


def sign(alg: str, claims: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(claims, private_key(alg), algorithm=alg, headers=headers or None)


ALGORITHMS = [f"{f}{n}" for f in ("HS", "RS", "PS", "ES") for n in (256, 384, 512)]


# -- io.jwt.decode --------------------------------------------------------------------


def test_decode_returns_header_payload_and_hex_signature() -> None:
    token = sign("HS256", {"sub": "alice"})
    header, payload, signature = rego("io.jwt.decode(input.t)", t=token)
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert payload == {"sub": "alice"}
    assert signature == base64.urlsafe_b64decode(token.split(".")[2] + "==").hex()


@pytest.mark.parametrize(
    "token",
    [
        "a.b.c",
        "x",
        "a.b",
        f"{b64(b'[1]')}.{b64(b'{}')}.c2ln",  # a header that is not an object
        f"{b64(b'{}')}.{b64(b'not json')}.c2ln",
        "a.b.c.d.e",  # JWE
    ],
)
def test_decode_of_a_malformed_token_is_undefined(token: str) -> None:
    assert rego("io.jwt.decode(input.t)", t=token) == "undefined"


def test_an_undefined_decode_lets_the_policy_fall_back() -> None:
    module = RegoModule(
        "t.rego",
        "package t\n\ndefault x := 401\n\nx := 200 if {\n"
        "\t[_, payload, _] := io.jwt.decode(input.t)\n\tpayload.sub\n}\n",
    )
    engine = compile_rego([module], decision_path="t/x")
    assert engine.evaluate({"t": "a.b.c"}).value == 401
    assert engine.evaluate({"t": sign("HS256", {"sub": "a"})}).value == 200


# -- io.jwt.verify_<alg> --------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_verify_with_the_right_and_a_wrong_key(alg: str) -> None:
    token = sign(alg, {"sub": "alice"})
    call = f"io.jwt.verify_{alg.lower()}(input.t, input.k)"
    assert rego(call, t=token, k=public_key(alg)) is True
    wrong = "another-secret" * 5 if alg.startswith("HS") else None
    if wrong is None:
        other = OTHER_RSA if not alg.startswith("ES") else ec.generate_private_key(EC[alg].curve)
        wrong = pem_public(other)
    assert rego(call, t=token, k=wrong) is False


@pytest.mark.parametrize("alg", ["RS256", "PS384", "ES256"])
def test_verify_takes_a_certificate_a_jwk_and_a_jwk_set(alg: str) -> None:
    token = sign(alg, {"sub": "alice"})
    key = private_key(alg)
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    other = json.loads(
        jwt.algorithms.get_default_algorithms()["RS256"].to_jwk(OTHER_RSA.public_key())
    )
    call = f"io.jwt.verify_{alg.lower()}(input.t, input.k)"
    assert rego(call, t=token, k=certificate(key)) is True
    assert rego(call, t=token, k=json.dumps(jwk)) is True
    assert rego(call, t=token, k=json.dumps({"keys": [other, jwk]})) is True
    assert rego(call, t=token, k=json.dumps({"keys": [other]})) is False


def test_verify_of_a_tampered_payload_is_false() -> None:
    header, _, signature = sign("RS256", {"sub": "alice"}).split(".")
    forged = f"{header}.{b64(json.dumps({'sub': 'root'}).encode())}.{signature}"
    assert rego("io.jwt.verify_rs256(input.t, input.k)", t=forged, k=public_key("RS256")) is False


def test_verify_of_a_malformed_token_or_key_is_undefined() -> None:
    assert rego("io.jwt.verify_hs256(input.t, input.k)", t="a.b", k=SECRET) == "undefined"
    token = sign("RS256", {"sub": "a"})
    assert rego("io.jwt.verify_rs256(input.t, input.k)", t=token, k="not a key") == "undefined"


# -- io.jwt.decode_verify -------------------------------------------------------------

CLAIMS = {"iss": "https://issuer.example.org", "aud": "reviews", "sub": "alice"}
SECONDS = NOW_NS // 10**9


def decode_verify(token: str, **constraints: Any) -> Any:
    constraints.setdefault("time", NOW_NS)
    return rego("io.jwt.decode_verify(input.t, input.c)", t=token, c=constraints)


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_decode_verify_a_valid_token(alg: str) -> None:
    token = sign(alg, {**CLAIMS, "exp": SECONDS + 60, "nbf": SECONDS - 60}, kid="k1")
    key = {"secret": SECRET} if alg.startswith("HS") else {"cert": public_key(alg)}
    valid, header, payload = decode_verify(token, **key, alg=alg, iss=CLAIMS["iss"], aud="reviews")
    assert (valid, header["alg"], header["kid"], payload["sub"]) == (True, alg, "k1", "alice")


INVALID = [False, {}, {}]


@pytest.mark.parametrize(
    ("claims", "constraints"),
    [
        pytest.param({**CLAIMS, "exp": SECONDS - 1}, {}, id="expired"),
        pytest.param({**CLAIMS, "exp": SECONDS}, {}, id="expiring this instant"),
        pytest.param({**CLAIMS, "nbf": SECONDS + 1}, {}, id="not yet valid"),
        pytest.param(CLAIMS, {"aud": "ratings"}, id="wrong audience"),
        pytest.param({**CLAIMS, "aud": ["a", "b"]}, {"aud": "c"}, id="audience not in list"),
        pytest.param(CLAIMS, {"aud": None}, id="token audience without a constraint"),
        pytest.param(CLAIMS, {"iss": "https://evil.example.org"}, id="wrong issuer"),
        pytest.param(CLAIMS, {"alg": "RS512"}, id="another algorithm required"),
        pytest.param(CLAIMS, {"cert": pem_public(OTHER_RSA)}, id="wrong key"),
    ],
)
def test_decode_verify_refusals(claims: dict[str, Any], constraints: dict[str, Any]) -> None:
    given = {"cert": public_key("RS256"), "aud": "reviews", **constraints}
    given = {k: v for k, v in given.items() if v is not None}
    assert decode_verify(sign("RS256", claims), **given) == INVALID


def test_decode_verify_audience_in_a_list_and_nbf_this_instant() -> None:
    token = sign("RS256", {**CLAIMS, "aud": ["ratings", "reviews"], "nbf": SECONDS})
    valid, _, _ = decode_verify(token, cert=public_key("RS256"), aud="reviews")
    assert valid is True


def test_decode_verify_alg_none_is_invalid() -> None:
    header = b64(json.dumps({"alg": "none"}).encode())
    token = f"{header}.{b64(json.dumps(CLAIMS).encode())}."
    assert decode_verify(token, secret=SECRET, aud="reviews") == INVALID


def test_decode_verify_secret_for_an_rsa_token_is_invalid() -> None:
    assert decode_verify(sign("RS256", CLAIMS), secret=SECRET, aud="reviews") == INVALID


@pytest.mark.parametrize(
    "constraints",
    [
        pytest.param({}, id="neither cert nor secret"),
        pytest.param({"cert": "x", "secret": "y"}, id="both cert and secret"),
        pytest.param({"secret": SECRET, "audience": "x"}, id="unknown constraint"),
    ],
)
def test_decode_verify_bad_constraints_are_undefined(constraints: dict[str, Any]) -> None:
    token = sign("HS256", CLAIMS)
    assert rego("io.jwt.decode_verify(input.t, input.c)", t=token, c=constraints) == "undefined"


def test_decode_verify_malformed_token_is_undefined() -> None:
    assert decode_verify("a.b.c", secret=SECRET) == "undefined"


# -- io.jwt.encode_sign ---------------------------------------------------------------


def test_encode_sign_makes_a_token_verify_accepts() -> None:
    key = {"kty": "oct", "k": b64(SECRET.encode())}
    token = rego(
        'io.jwt.encode_sign({"alg": "HS256", "typ": "JWT"}, {"sub": "alice"}, input.k)', k=key
    )
    assert jwt.decode(token, SECRET, algorithms=["HS256"]) == {"sub": "alice"}
    raw = rego(
        'io.jwt.encode_sign_raw(`{"alg":"HS256"}`, `{"sub":"bob"}`, input.k)', k=json.dumps(key)
    )
    assert jwt.decode(raw, SECRET, algorithms=["HS256"]) == {"sub": "bob"}


# -- crypto ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["md5", "sha1", "sha256"])
def test_digests_are_hex_of_utf8(name: str) -> None:
    assert rego(f'crypto.{name}("héllo")') == hashlib.new(name, "héllo".encode()).hexdigest()


@pytest.mark.parametrize("name", ["md5", "sha1", "sha256", "sha512"])
def test_hmacs(name: str) -> None:
    expected = hmac.new(b"key", b"message", name).hexdigest()
    assert rego(f'crypto.hmac.{name}("message", "key")') == expected
    assert rego(f'crypto.hmac.equal(crypto.hmac.{name}("message", "key"), "{expected}")') is True
    assert rego('crypto.hmac.equal("a", "b")') is False


def test_parse_certificates_pem_and_base64_der() -> None:
    pem = certificate(RSA)
    [parsed] = rego("crypto.x509.parse_certificates(input.c)", c=pem)
    assert parsed["Subject"]["CommonName"] == "issuer.example.org"
    assert parsed["SerialNumber"] == 7
    assert parsed["DNSNames"] == ["issuer.example.org"]
    assert parsed["URIStrings"] == ["spiffe://example.org/ns/a/sa/b"]
    assert (parsed["IsCA"], parsed["NotAfter"]) == (True, "2027-01-01T00:00:00Z")
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    both = rego("crypto.x509.parse_certificates(input.c)", c=base64.b64encode(der).decode())
    assert both == [parsed]
    two = rego("count(crypto.x509.parse_certificates(input.c))", c=pem + certificate(EC["ES256"]))
    assert two == 2
    assert rego("crypto.x509.parse_certificates(input.c)", c="garbage") == "undefined"
