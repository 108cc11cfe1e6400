"""What the audit trail may not keep: header values, query values, bodies; the key."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from audit.errors import AuditError
from audit.redaction import REDACTED_PREFIX, Redaction, load_key

KEY = b"k" * 32
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"
redaction = Redaction.build(KEY, headers=["X-Api-Key"])


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("authorization", "Bearer abc", True),
        ("cookie", "a=b", True),
        ("set-cookie", "a=b", True),
        ("proxy-authorization", "Basic eA==", True),
        ("x-api-key", "k", True),  # configured, compared in lowercase
        ("x-forwarded-access-token", JWT, True),  # any header that carries a JWT
        ("x-thing", f"prefix {JWT} suffix", True),
        ("user-agent", "curl/8.5", False),
        ("x-thing", "eyJ but not a token", False),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ],
)
def test_which_headers_are_secret(name: str, value: str, secret: bool) -> None:
    assert redaction.header_is_secret(name, value) is secret
    assert (name in redaction.secret_headers({name: value, "accept": "*/*"})) is secret


def test_a_mark_groups_equal_values_and_hides_them() -> None:
    mark = redaction.mark("Bearer abc")
    assert mark.startswith(REDACTED_PREFIX)
    assert "abc" not in mark
    assert mark == redaction.mark("Bearer abc")
    assert mark != redaction.mark("Bearer abd")
    assert mark != Redaction.build(b"j" * 32).mark("Bearer abc")  # keyed: not a plain hash


def test_a_mark_is_the_keyed_blake2b_of_the_value() -> None:
    # Marks made by an earlier meshward must keep matching new ones ("the same token").
    value = "Bearer " + JWT
    expected = hashlib.blake2b(value.encode(), key=KEY, digest_size=12).hexdigest()
    assert redaction.mark(value) == REDACTED_PREFIX + expected
    assert redaction.mark(value.encode()) == REDACTED_PREFIX + expected
    assert redaction.mark(value) == redaction.mark(value)  # the keyed state is not used up


def test_secret_header_names_are_those_secret_by_name() -> None:
    headers = {"authorization": "a", "x-api-key": "k", "x-jwt": JWT, "accept": "*/*"}
    assert redaction.named_secret_headers(headers) == {"authorization", "x-api-key"}
    assert redaction.secret_headers(headers) == {"authorization", "x-api-key", "x-jwt"}


@pytest.mark.parametrize(
    ("path", "kept", "redacted"),
    [
        ("/a", "/a", ()),
        ("/a?page=2", "/a?page=2", ()),
        ("/a?access_token=s3cret&page=2", None, ("query:access_token",)),
        ("/a?Access_Token=s3cret", None, ("query:access_token",)),
        ("/a?access%5Ftoken=s3cret", None, ("query:access_token",)),  # encoded name
        (f"/a?t={JWT}", None, ("query:t",)),  # a JWT under any name
        (f"/a?{JWT}", None, ("query:",)),
        ("/a?code=1&state=x#frag", None, ("query:code",)),
        ("/a?token=", "/a?token=", ()),  # nothing to hide
    ],
)
def test_query_values_are_replaced(path: str, kept: str | None, redacted: tuple[str, ...]) -> None:
    out, marks = redaction.path(path)
    assert marks == redacted
    if kept is not None:
        assert out == kept
    else:
        assert "s3cret" not in out
        assert JWT not in out
        assert REDACTED_PREFIX.rstrip(":") in out
        assert "page=2" in out or "page" not in path
        assert out.endswith("#frag") == path.endswith("#frag")


def test_bodies_are_dropped_unless_configured() -> None:
    assert redaction.body(b"secret") is None
    kept = Redaction.build(KEY, store_body=True, max_body_bytes=4)
    assert kept.body(b"secret") == b"secr"


def test_the_key_is_made_once_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "redaction.key"
    first = load_key(path)
    assert len(first) == 32
    assert load_key(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.write_bytes(b"short")
    with pytest.raises(AuditError, match="not a redaction key"):
        load_key(path)
    os.chmod(path, 0o000)
    if os.getuid() != 0:
        with pytest.raises(AuditError, match="cannot read"):
            load_key(path)
