"""The "disk" upstream authority: meshward's CA as an intermediate under an operator's root."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import VerificationError

from identity.errors import UpstreamAuthorityError
from identity.upstream import load_upstream
from identity.x509certs import BACKDATE
from tests.identity.certs import (
    FakeUpstreamCA,
    issue_svid,
    key_pem,
    make_upstream_ca,
    new_key,
    parse_svid,
    pem,
    validate_jwt,
    verify_x509,
)

START = datetime(2026, 1, 1, tzinfo=UTC)  # the FakeClock's start
YEAR_AGO = START - timedelta(days=365)
IN_A_YEAR = START + timedelta(days=365)


@dataclass(slots=True, frozen=True)
class UpstreamFiles:
    cert_file: Path
    key_file: Path
    bundle_file: Path | None


def _write(
    directory: Path,
    certs: tuple[x509.Certificate, ...],
    key: object,
    bundle: tuple[x509.Certificate, ...] | None = None,
) -> UpstreamFiles:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / "upstream.crt"
    key_file = directory / "upstream.key"
    cert_file.write_bytes(pem(*certs))
    key_file.write_bytes(key_pem(key))  # type: ignore[arg-type]
    bundle_file = None
    if bundle is not None:
        bundle_file = directory / "bundle.crt"
        bundle_file.write_bytes(pem(*bundle))
    return UpstreamFiles(cert_file, key_file, bundle_file)


def _load(files: UpstreamFiles, now: datetime = START):
    return load_upstream(files.cert_file, files.key_file, files.bundle_file, now=now)


@pytest.fixture
def root() -> FakeUpstreamCA:
    return make_upstream_ca("Example Root CA", not_before=YEAR_AGO, not_after=IN_A_YEAR)


# -- a root upstream -------------------------------------------------------------------


def test_meshward_ca_is_an_intermediate_under_the_root(make_ca, clock, root, tmp_path):
    upstream = _load(_write(tmp_path / "up", (root.certificate,), root.key))
    assert upstream.roots == (root.certificate,)
    assert upstream.intermediates == ()

    ca = make_ca(clock, upstream=upstream)
    cert = ca.active.certificate
    assert cert.issuer == root.certificate.subject
    assert cert.subject != root.certificate.subject
    cert.verify_directly_issued_by(root.certificate)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == root_ski.value.digest
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert cert.not_valid_after_utc == clock() + timedelta(hours=24)

    # the bundle is exactly the upstream root, the intermediate travels in the chain
    assert ca.bundle.x509_authorities == (root.certificate,)
    assert ca.bundle.pem() == pem(root.certificate)

    issue, key = issue_svid(ca, clock())
    assert issue.chain == (issue.certificate, cert)
    verified = verify_x509([root.certificate], issue.chain, at=clock())
    assert verified.chain == [issue.certificate, cert, root.certificate]
    svid = parse_svid(issue, key)
    assert svid.cert_chain == [issue.certificate, cert]


def test_rotation_keeps_the_root_as_the_bundle(make_ca, clock, root, tmp_path):
    ca = make_ca(clock, upstream=_load(_write(tmp_path / "up", (root.certificate,), root.key)))
    first = ca.active
    audience = {"spiffe://example.org/ns/db"}

    clock.now = first.activate_at - timedelta(minutes=30)
    ca.rotate(clock())
    assert len(ca.slots) == 2
    assert ca.bundle.x509_authorities == (root.certificate,)
    old_issue, _ = issue_svid(ca, clock())
    old_jwt = ca.sign_jwt_svid(
        spiffe_id=old_issue.spiffe_id, audience=tuple(audience), ttl=timedelta(hours=1), now=clock()
    )

    now = clock.advance(timedelta(minutes=30))
    ca.rotate(now)
    assert ca.active.id != first.id
    new_issue, _ = issue_svid(ca, now)
    assert old_issue.chain[1] == first.certificate
    assert new_issue.chain[1] == ca.active.certificate
    assert ca.bundle.x509_authorities == (root.certificate,)
    for issue in (old_issue, new_issue):
        verify_x509(ca.bundle.x509_authorities, issue.chain, at=now)
    validate_jwt(old_jwt.token, ca.bundle, audience, at=now)

    ca.rotate(first.not_after + ca.settings.bundle_grace)
    assert first.id not in {s.id for s in ca.slots}
    assert ca.bundle.x509_authorities == (root.certificate,)


def test_ca_lifetime_is_capped_at_the_upstream_not_after(make_ca, clock, tmp_path):
    root = make_upstream_ca(
        "Short Root", not_before=YEAR_AGO, not_after=START + timedelta(hours=10)
    )
    ca = make_ca(clock, upstream=_load(_write(tmp_path / "up", (root.certificate,), root.key)))
    assert ca.active.not_after == root.certificate.not_valid_after_utc
    assert ca.active.not_before == START - BACKDATE
    issue, _ = issue_svid(ca, clock.advance(timedelta(hours=9, minutes=30)))
    assert issue.capped is True
    assert issue.certificate.not_valid_after_utc == root.certificate.not_valid_after_utc
    verify_x509([root.certificate], issue.chain, at=clock())


# -- an intermediate upstream ----------------------------------------------------------


def test_upstream_intermediate_under_a_root_in_bundle_file(make_ca, clock, root, tmp_path):
    middle = make_upstream_ca(
        "Example Issuing CA", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root
    )
    upstream = _load(
        _write(tmp_path / "up", (middle.certificate,), middle.key, bundle=(root.certificate,))
    )
    assert upstream.roots == (root.certificate,)
    assert upstream.intermediates == (middle.certificate,)

    ca = make_ca(clock, upstream=upstream)
    cert = ca.active.certificate
    cert.verify_directly_issued_by(middle.certificate)
    assert ca.bundle.x509_authorities == (root.certificate,)

    issue, key = issue_svid(ca, clock())
    assert issue.chain == (issue.certificate, cert, middle.certificate)
    verified = verify_x509([root.certificate], issue.chain, at=clock())
    assert verified.chain == [issue.certificate, cert, middle.certificate, root.certificate]
    assert parse_svid(issue, key).cert_chain == list(issue.chain)

    # not without the upstream intermediate
    with pytest.raises(VerificationError):
        verify_x509([root.certificate], issue.chain[:2], at=clock())


def test_upstream_intermediate_with_its_root_in_cert_file(make_ca, clock, root, tmp_path):
    middle = make_upstream_ca("Issuing CA", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root)
    upstream = _load(_write(tmp_path / "up", (middle.certificate, root.certificate), middle.key))
    assert upstream.roots == (root.certificate,)
    assert upstream.intermediates == (middle.certificate,)
    ca = make_ca(clock, upstream=upstream)
    issue, _ = issue_svid(ca, clock())
    assert issue.chain == (issue.certificate, ca.active.certificate, middle.certificate)
    assert ca.bundle.x509_authorities == (root.certificate,)
    verify_x509([root.certificate], issue.chain, at=clock())


# -- refusals (pure) -------------------------------------------------------------------


def _case_key_mismatch(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    return _write(d, (root.certificate,), new_key("p256")), "does not match"


def _case_not_ca(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    leaf = make_upstream_ca("leaf", not_before=YEAR_AGO, not_after=IN_A_YEAR, ca=False)
    return _write(d, (leaf.certificate,), leaf.key), "is not a CA"


def _case_no_key_cert_sign(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    ca = make_upstream_ca("ca", not_before=YEAR_AGO, not_after=IN_A_YEAR, key_cert_sign=False)
    return _write(d, (ca.certificate,), ca.key), "keyCertSign"


def _case_expired(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    old = make_upstream_ca("old", not_before=YEAR_AGO, not_after=START - timedelta(seconds=1))
    return _write(d, (old.certificate,), old.key), "not valid now"


def _case_not_yet_valid(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    new = make_upstream_ca("new", not_before=START + timedelta(days=1), not_after=IN_A_YEAR)
    return _write(d, (new.certificate,), new.key), "not valid now"


def _case_no_ski(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    ca = make_upstream_ca("no-ski", not_before=YEAR_AGO, not_after=IN_A_YEAR, ski=False)
    return _write(d, (ca.certificate,), ca.key), "subjectKeyIdentifier"


def _case_missing_cert(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.cert_file.unlink()
    return files, "cannot read"


def _case_cert_is_a_directory(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.cert_file.unlink()
    files.cert_file.mkdir()
    return files, "cannot read"


def _case_cert_not_pem(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.cert_file.write_bytes(b"this is not a certificate\n")
    return files, "holds no PEM certificate"


def _case_cert_file_holds_a_key(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.cert_file.write_bytes(key_pem(root.key))
    return files, "holds no PEM certificate"


def _case_missing_key(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.key_file.unlink()
    return files, "cannot read"


def _case_key_not_pem(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.key_file.write_bytes(b"\x00\x01garbage")
    return files, "holds no unencrypted EC or RSA private key"


def _case_encrypted_key(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.key_file.write_bytes(key_pem(root.key, password=b"s3cret"))
    return files, "holds no unencrypted EC or RSA private key"


def _case_certificate_in_key_file(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    files = _write(d, (root.certificate,), root.key)
    files.key_file.write_bytes(pem(root.certificate))
    return files, "holds no unencrypted EC or RSA private key"


def _case_ed25519_key(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    ca = make_upstream_ca("ed", not_before=YEAR_AGO, not_after=IN_A_YEAR, key_kind="ed25519")
    return _write(d, (ca.certificate,), ca.key), "holds no unencrypted EC or RSA private key"


def _case_no_root_no_bundle(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    middle = make_upstream_ca("m", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root)
    return _write(d, (middle.certificate,), middle.key), "does not end in a self-signed root"


def _case_bundle_root_did_not_issue(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    middle = make_upstream_ca("m", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root)
    stranger = make_upstream_ca("Stranger Root", not_before=YEAR_AGO, not_after=IN_A_YEAR)
    return (
        _write(d, (middle.certificate,), middle.key, bundle=(stranger.certificate,)),
        "is not issued by any root in the upstream bundle",
    )


def _case_stranger_with_same_name(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    middle = make_upstream_ca("m", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root)
    impostor = make_upstream_ca(
        "Example Root CA", not_before=YEAR_AGO, not_after=IN_A_YEAR
    )  # same subject as the real root, other key
    return (
        _write(d, (middle.certificate,), middle.key, bundle=(impostor.certificate,)),
        "is not issued by any root in the upstream bundle",
    )


def _case_missing_bundle(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    middle = make_upstream_ca("m", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root)
    files = _write(d, (middle.certificate,), middle.key, bundle=(root.certificate,))
    assert files.bundle_file is not None
    files.bundle_file.unlink()
    return files, "cannot read"


def _case_bundle_not_pem(d: Path, root: FakeUpstreamCA) -> tuple[UpstreamFiles, str]:
    middle = make_upstream_ca("m", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root)
    files = _write(d, (middle.certificate,), middle.key, bundle=(root.certificate,))
    assert files.bundle_file is not None
    files.bundle_file.write_text("roots go here\n")
    return files, "holds no PEM certificate"


CERT, KEY, BUNDLE = "ca.upstream.cert_file", "ca.upstream.key_file", "ca.upstream.bundle_file"


@pytest.mark.parametrize(
    ("make_case", "field", "names"),
    [
        (_case_key_mismatch, KEY, ("key_file", "cert_file")),
        (_case_not_ca, CERT, ("cert_file",)),
        (_case_no_key_cert_sign, CERT, ("cert_file",)),
        (_case_expired, CERT, ("cert_file",)),
        (_case_not_yet_valid, CERT, ("cert_file",)),
        (_case_no_ski, CERT, ("cert_file",)),
        (_case_missing_cert, CERT, ("cert_file",)),
        (_case_cert_is_a_directory, CERT, ("cert_file",)),
        (_case_cert_not_pem, CERT, ("cert_file",)),
        (_case_cert_file_holds_a_key, CERT, ("cert_file",)),
        (_case_missing_key, KEY, ("key_file",)),
        (_case_key_not_pem, KEY, ("key_file",)),
        (_case_encrypted_key, KEY, ("key_file",)),
        (_case_certificate_in_key_file, KEY, ("key_file",)),
        (_case_ed25519_key, KEY, ("key_file",)),
        (_case_no_root_no_bundle, BUNDLE, ("cert_file",)),
        (_case_bundle_root_did_not_issue, BUNDLE, ("cert_file",)),
        (_case_stranger_with_same_name, BUNDLE, ("cert_file",)),
        (_case_missing_bundle, BUNDLE, ("bundle_file",)),
        (_case_bundle_not_pem, BUNDLE, ("bundle_file",)),
    ],
    ids=lambda v: v.__name__.removeprefix("_case_") if callable(v) else None,
)
def test_unusable_upstream_files_are_refused(root, tmp_path, make_case, field, names):
    files, message = make_case(tmp_path / "up", root)
    with pytest.raises(UpstreamAuthorityError) as info:
        _load(files)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert message in info.value.message
    for name in names:
        path = getattr(files, name)
        assert str(path) in info.value.message


# -- chain links and root key types in the upstream files --------------------


def test_cert_file_chain_must_link_to_the_root_it_ends_in(root, tmp_path):
    """cert_file = [issuing CA signed by root A, unrelated self-signed root B].

    load_upstream only checks that the last certificate is self-signed (subject ==
    issuer) and then compares it with itself, so B becomes the bundle although it did
    not issue anything in the chain; every SVID then fails to verify at every peer.
    """
    middle = make_upstream_ca("Issuing CA", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=root)
    stranger = make_upstream_ca("Stranger Root", not_before=YEAR_AGO, not_after=IN_A_YEAR)
    files = _write(tmp_path / "up", (middle.certificate, stranger.certificate), middle.key)
    with pytest.raises(UpstreamAuthorityError) as info:
        _load(files)
    assert info.value.field == CERT
    assert str(files.cert_file) in info.value.message


def test_upstream_root_the_bundle_cannot_publish_is_refused_at_load(tmp_path):
    """An Ed25519 root in bundle_file is accepted, then TrustBundle.jwks() raises TypeError.

    The CA loads and signs, but the SPIFFE bundle (bundle endpoint) fails at run time
    with "root certificate key type Ed25519PublicKey cannot go in a JWKS"; the loader
    must refuse such a root up front, naming ca.upstream.bundle_file.
    """
    ed_root = make_upstream_ca(
        "Ed25519 Root", not_before=YEAR_AGO, not_after=IN_A_YEAR, key_kind="ed25519"
    )
    middle = make_upstream_ca(
        "Issuing CA", not_before=YEAR_AGO, not_after=IN_A_YEAR, issuer=ed_root
    )
    files = _write(
        tmp_path / "up", (middle.certificate,), middle.key, bundle=(ed_root.certificate,)
    )
    with pytest.raises(UpstreamAuthorityError) as info:
        _load(files)
    assert info.value.field == BUNDLE
    assert str(files.bundle_file) in info.value.message
