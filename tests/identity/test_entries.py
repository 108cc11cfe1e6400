"""Validation of registration entries (EntrySpec.validate) and selectors (Selector.parse)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from spiffe import SpiffeId, TrustDomain

from identity.entries import EntrySpec
from identity.errors import (
    InvalidInputError,
    InvalidSelectorError,
    InvalidSpiffeIdError,
    InvalidTTLError,
)
from identity.selectors import Selector

TD = TrustDomain("example.org")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400

GOOD = EntrySpec(
    spiffe_id="spiffe://example.org/ns/default/sa/web",
    parent_id="spiffe://example.org/meshward/server",
    selectors=("unix:uid:1000",),
)


def test_a_good_spec_validates_to_parsed_values() -> None:
    spec = replace(
        GOOD,
        selectors=("unix:uid:1000", "k8s:ns:default"),
        x509_svid_ttl=1800,
        jwt_svid_ttl=300,
        dns_names=("Web.Default.SVC.", "*.example.com"),
        hint="internal",
        admin=True,
        expires_at=NOW + timedelta(days=1),
    )

    valid = spec.validate(TD, now=NOW)

    assert valid.spiffe_id == SpiffeId("spiffe://example.org/ns/default/sa/web")
    assert valid.parent_id == SpiffeId("spiffe://example.org/meshward/server")
    # Sorted, so two specs that list the same selectors in another order are equal.
    assert valid.selectors == (Selector("k8s", "ns", "default"), Selector("unix", "uid", "1000"))
    assert valid.x509_svid_ttl == 1800
    assert valid.jwt_svid_ttl == 300
    assert valid.dns_names == ("web.default.svc", "*.example.com")
    assert valid.hint == "internal"
    assert valid.admin is True
    assert valid.expires_at == NOW + timedelta(days=1)


def test_selector_order_does_not_matter() -> None:
    one = replace(GOOD, selectors=("unix:uid:1000", "k8s:sa:web")).validate(TD, now=NOW)
    other = replace(GOOD, selectors=("k8s:sa:web", "unix:uid:1000")).validate(TD, now=NOW)
    assert one.selectors == other.selectors


def test_duplicated_selectors_collapse() -> None:
    valid = replace(GOOD, selectors=("unix:uid:1000", "unix:uid:1000", "k8s:sa:web")).validate(
        TD, now=NOW
    )
    assert valid.selectors == (Selector("k8s", "sa", "web"), Selector("unix", "uid", "1000"))


@pytest.mark.parametrize(
    ("ttl_field", "ttl"),
    [
        ("x509_svid_ttl", 1),
        ("x509_svid_ttl", 30 * DAY),
        ("jwt_svid_ttl", 1),
        ("jwt_svid_ttl", DAY),
    ],
)
def test_ttl_bounds_are_inclusive(ttl_field: str, ttl: int) -> None:
    valid = replace(GOOD, **{ttl_field: ttl}).validate(TD, now=NOW)
    assert getattr(valid, ttl_field) == ttl


BAD_SPECS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    # (case, changes to GOOD, error class, field)
    ("spiffe_id empty", {"spiffe_id": ""}, InvalidSpiffeIdError, "spiffe_id"),
    (
        "spiffe_id scheme",
        {"spiffe_id": "https://example.org/web"},
        InvalidSpiffeIdError,
        "spiffe_id",
    ),
    ("spiffe_id no scheme", {"spiffe_id": "example.org/web"}, InvalidSpiffeIdError, "spiffe_id"),
    (
        "spiffe_id uppercase trust domain",
        {"spiffe_id": "spiffe://Example.org/web"},
        InvalidSpiffeIdError,
        "spiffe_id",
    ),
    (
        "spiffe_id trailing slash",
        {"spiffe_id": "spiffe://example.org/web/"},
        InvalidSpiffeIdError,
        "spiffe_id",
    ),
    (
        "spiffe_id dot segment",
        {"spiffe_id": "spiffe://example.org/a/../b"},
        InvalidSpiffeIdError,
        "spiffe_id",
    ),
    (
        "spiffe_id query",
        {"spiffe_id": "spiffe://example.org/web?x=1"},
        InvalidSpiffeIdError,
        "spiffe_id",
    ),
    (
        "spiffe_id port",
        {"spiffe_id": "spiffe://example.org:443/web"},
        InvalidSpiffeIdError,
        "spiffe_id",
    ),
    (
        "spiffe_id other trust domain",
        {"spiffe_id": "spiffe://other.org/web"},
        InvalidSpiffeIdError,
        "spiffe_id",
    ),
    ("spiffe_id no path", {"spiffe_id": "spiffe://example.org"}, InvalidSpiffeIdError, "spiffe_id"),
    ("parent_id malformed", {"parent_id": "not-an-id"}, InvalidSpiffeIdError, "parent_id"),
    ("parent_id empty", {"parent_id": ""}, InvalidSpiffeIdError, "parent_id"),
    (
        "parent_id other trust domain",
        {"parent_id": "spiffe://other.org/agent"},
        InvalidInputError,
        "parent_id",
    ),
    ("no selectors", {"selectors": ()}, InvalidInputError, "selectors"),
    ("selector without value", {"selectors": ("unix:uid",)}, InvalidSelectorError, "selectors[0]"),
    ("selector without key", {"selectors": ("unix",)}, InvalidSelectorError, "selectors[0]"),
    ("selector empty key", {"selectors": ("unix::1000",)}, InvalidSelectorError, "selectors[0]"),
    ("selector empty value", {"selectors": ("unix:uid:",)}, InvalidSelectorError, "selectors[0]"),
    ("selector empty type", {"selectors": (":uid:1000",)}, InvalidSelectorError, "selectors[0]"),
    (
        "selector uppercase type",
        {"selectors": ("UNIX:uid:1000",)},
        InvalidSelectorError,
        "selectors[0]",
    ),
    (
        "second selector bad",
        {"selectors": ("unix:uid:1000", "k8s:sa")},
        InvalidSelectorError,
        "selectors[1]",
    ),
    ("x509_svid_ttl zero", {"x509_svid_ttl": 0}, InvalidTTLError, "x509_svid_ttl"),
    ("x509_svid_ttl negative", {"x509_svid_ttl": -60}, InvalidTTLError, "x509_svid_ttl"),
    (
        "x509_svid_ttl over 30 days",
        {"x509_svid_ttl": 30 * DAY + 1},
        InvalidTTLError,
        "x509_svid_ttl",
    ),
    ("jwt_svid_ttl zero", {"jwt_svid_ttl": 0}, InvalidTTLError, "jwt_svid_ttl"),
    ("jwt_svid_ttl over 1 day", {"jwt_svid_ttl": DAY + 1}, InvalidTTLError, "jwt_svid_ttl"),
    (
        "dns name with underscore",
        {"dns_names": ("bad_name.example.org",)},
        InvalidInputError,
        "dns_names[0]",
    ),
    ("dns name empty label", {"dns_names": ("a..example.org",)}, InvalidInputError, "dns_names[0]"),
    (
        "dns name leading hyphen",
        {"dns_names": ("-a.example.org",)},
        InvalidInputError,
        "dns_names[0]",
    ),
    ("dns name empty", {"dns_names": ("ok.example.org", "")}, InvalidInputError, "dns_names[1]"),
    ("dns name bare wildcard", {"dns_names": ("*",)}, InvalidInputError, "dns_names[0]"),
    ("dns label too long", {"dns_names": ("a" * 64 + ".org",)}, InvalidInputError, "dns_names[0]"),
    ("hint too long", {"hint": "h" * 257}, InvalidInputError, "hint"),
    ("hint control character", {"hint": "two\nlines"}, InvalidInputError, "hint"),
    ("expires_at naive", {"expires_at": datetime(2027, 1, 1)}, InvalidInputError, "expires_at"),
    (
        "expires_at past",
        {"expires_at": NOW - timedelta(seconds=1)},
        InvalidInputError,
        "expires_at",
    ),
    ("expires_at now", {"expires_at": NOW}, InvalidInputError, "expires_at"),
]


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [pytest.param(c, e, f, id=case) for case, c, e, f in BAD_SPECS],
)
def test_bad_spec_is_refused_naming_the_field(
    changes: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as raised:
        replace(GOOD, **changes).validate(TD, now=NOW)
    assert isinstance(raised.value, InvalidInputError)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert raised.value.message


def test_hint_at_the_limit_is_accepted() -> None:
    assert replace(GOOD, hint="h" * 256).validate(TD, now=NOW).hint == "h" * 256


@pytest.mark.parametrize("ttl_field", ["x509_svid_ttl", "jwt_svid_ttl"])
def test_huge_ttl_is_an_invalid_ttl_not_an_overflow(ttl_field: str) -> None:
    with pytest.raises(InvalidTTLError) as raised:
        replace(GOOD, **{ttl_field: 10**15}).validate(TD, now=NOW)
    assert raised.value.field == ttl_field


# -- selectors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:uid:1000", Selector("unix", "uid", "1000")),
        ("k8s:sa:web", Selector("k8s", "sa", "web")),
        ("k8s:pod-label:app:web", Selector("k8s", "pod-label", "app:web")),
        ("unix:path:/usr/bin/envoy", Selector("unix", "path", "/usr/bin/envoy")),
        ("docker:label:a:b:c", Selector("docker", "label", "a:b:c")),
        ("k8s_psat:cluster:prod", Selector("k8s_psat", "cluster", "prod")),
    ],
)
def test_selector_parse(text: str, expected: Selector) -> None:
    parsed = Selector.parse(text)
    assert parsed == expected
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix",
        "unix:uid",
        "unix:uid:",
        "unix::1000",
        ":uid:1000",
        "::",
        "UNIX:uid:1000",
        "Unix:uid:1000",
        "1unix:uid:1000",
        "unix:u id:1000",
        "unix:uid: 1000",
        "unix:uid:1000 ",
    ],
)
def test_selector_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidSelectorError) as raised:
        Selector.parse(text, field="selector")
    assert raised.value.field == "selector"
    assert repr(text) in raised.value.message
    assert raised.value.code == "invalid_selector"


def test_selector_default_field_is_selectors() -> None:
    with pytest.raises(InvalidSelectorError) as raised:
        Selector.parse("unix:uid")
    assert raised.value.field == "selectors"
    assert "type:key:value" in raised.value.message


def test_selector_constructor_validates() -> None:
    with pytest.raises(InvalidSelectorError, match="lowercase"):
        Selector("K8S", "sa", "web")


def test_selectors_are_values() -> None:
    assert Selector.parse("unix:uid:1") == Selector("unix", "uid", "1")
    assert len({Selector.parse("unix:uid:1"), Selector("unix", "uid", "1")}) == 1
    assert Selector("unix", "uid", "1") != ("unix", "uid", "1")
    with pytest.raises(AttributeError):
        Selector("unix", "uid", "1").value = "2"  # type: ignore[misc]
