"""SPIFFE IDs, trust domains, selectors and CSRs from hostile hands: parsed, or refused
with the error that names the field; never another exception."""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import example, given
from hypothesis import strategies as st

from identity.errors import InvalidInputError
from identity.selectors import Selector
from identity.spiffeid import parse_spiffe_id, parse_trust_domain
from identity.x509certs import public_key_from_csr

IDS = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda td, path: f"spiffe://{td}{path}",
        st.text(max_size=20),
        st.text(max_size=40),
    ),
)


def refusal(call: Callable[[], object]) -> InvalidInputError | None:
    """The error ``call`` refuses its input with, or None when it accepts it."""
    try:
        call()
    except InvalidInputError as exc:
        return exc
    return None


@given(IDS)
@example("spiffe://example.org/ns/a/sa/b")
@example("SPIFFE://Example.org/x")
@example("spiffe://example.org/a/../b")
@example("spiffe://example.org/%2F")
def test_spiffe_ids(value: str) -> None:
    error = refusal(lambda: parse_spiffe_id(value))
    if error is None:
        assert str(parse_spiffe_id(value)) == value
    else:
        assert error.field == "spiffe_id"


@given(st.text(max_size=60))
@example("example.org")
@example("spiffe://example.org")
def test_trust_domains(value: str) -> None:
    error = refusal(lambda: parse_trust_domain(value))
    assert error is None or error.field == "trust_domain"


@given(st.text(max_size=60))
@example("unix:uid:1000")
@example("k8s:ns:")
@example(":")
def test_selectors(text: str) -> None:
    error = refusal(lambda: Selector.parse(text))
    if error is None:
        selector = Selector.parse(text)
        assert Selector.parse(str(selector)) == selector
    else:
        assert error.field == "selectors"


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


CSR = _csr()


@given(st.lists(st.tuples(st.integers(min_value=0), st.binary(max_size=4)), min_size=1, max_size=4))
def test_csrs_with_bytes_replaced(edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(CSR)
    for offset, replacement in edits:
        at = offset % len(data)
        data[at : at + len(replacement)] = replacement
    error = refusal(lambda: public_key_from_csr(bytes(data)))
    assert error is None or error.field == "csr"


def test_a_csr_of_another_version_is_refused_as_a_csr_problem() -> None:
    # Found by test_csrs_with_bytes_replaced: cryptography raises InvalidVersion, which
    # is not a ValueError, and it escaped as an internal error.
    at = CSR.index(b"\x02\x01\x00")  # the version, INTEGER 0
    error = refusal(lambda: public_key_from_csr(CSR[:at] + b"\x02\x01\x01" + CSR[at + 3 :]))
    assert error is not None
    assert error.field == "csr"
    assert "not a valid CSR version" in str(error)


@given(st.binary(max_size=200))
@example(b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n")
def test_csr_bytes(data: bytes) -> None:
    error = refusal(lambda: public_key_from_csr(data))
    assert error is None or error.field == "csr"


def test_an_x509pop_certificate_of_another_version_is_an_input_error() -> None:
    # The same cryptography exception as for CSRs, on a chain an attesting agent sends
    # before it is authenticated.
    import base64

    from identity.node_api import _certs
    from tests.authz.svids import Authority

    der = Authority().certificate.public_bytes(serialization.Encoding.DER)
    at = der.index(b"\xa0\x03\x02\x01\x02")  # [0] EXPLICIT version v3
    der = der[:at] + b"\xa0\x03\x02\x01\x05" + der[at + 5 :]
    pem = (
        "-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(der).decode()
        + "-----END CERTIFICATE-----\n"
    )
    error = refusal(lambda: _certs(pem, "x509pop"))
    assert error is not None
    assert error.field == "x509pop"
