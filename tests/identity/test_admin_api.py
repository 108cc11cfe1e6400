"""The admin REST API driven over HTTP (TestClient), wired the way `meshward server` wires it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, X509Bundle, X509Svid
from sqlalchemy import func, select

from identity.admin_api import create_admin_app
from identity.authority import CASettings, CertificateAuthority
from identity.metrics import IdentityMetrics
from identity.store.issued import list_issued
from identity.store.models import JoinTokenRow
from meshward.config import load_config
from meshward.runtime import IdentityServer, build_identity_server
from tests.asgi_client import TestClient
from tests.conftest import FakeClock

TD = TrustDomain("example.org")
WEB = "spiffe://example.org/ns/default/sa/web"
DEFAULT_PARENT = "spiffe://example.org/meshward/server"
NODE = "spiffe://example.org/agent/node-1"


@dataclass
class Api:
    client: TestClient
    server: IdentityServer
    clock: FakeClock

    def entries(self) -> list[dict[str, Any]]:
        response = self.client.get("/v1/entries")
        assert response.status_code == 200
        return list(response.json())

    def create(self, **body: Any) -> dict[str, Any]:
        body.setdefault("spiffe_id", WEB)
        body.setdefault("selectors", ["unix:uid:1000"])
        response = self.client.post("/v1/entries", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def issued_count(self) -> int:
        self.server.ca.flush(10)
        with self.server.db.transaction() as s:
            return len(list_issued(s))


def wall_clock() -> FakeClock:
    # py-spiffe checks JWT expiry against the real time, so the fake clock starts now.
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    clock = wall_clock()
    config = load_config(
        None,
        env={},
        flags={
            "trust_domain": "example.org",
            "data_dir": tmp_path / "data",
            "database_url": database_url,
        },
    )
    server = build_identity_server(config, clock=clock)
    app = create_admin_app(server.admin, registry=server.registry, ready=server.ready)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Api(client=client, server=server, clock=clock)
    finally:
        server.ca.close()
        server.db.dispose()


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["message"]
    return dict(body["error"])


# -- keys and CSRs --------------------------------------------------------------------


def csr_pem(key: Any, algorithm: hashes.HashAlgorithm | None = None) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def tampered_csr_pem() -> str:
    """A well-formed CSR whose self-signature does not verify."""
    key = p256()
    other = p256()
    good = x509.load_pem_x509_csr(csr_pem(key, hashes.SHA256()).encode())
    foreign = x509.load_pem_x509_csr(csr_pem(other, hashes.SHA256()).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    # Swap in the other key's SubjectPublicKeyInfo (same length for P-256): the
    # signature, made by `key`, no longer matches the key the CSR carries.
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    foreign_spki = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    at = bytes(der).index(spki)
    der[at : at + len(spki)] = foreign_spki
    tampered = x509.load_der_x509_csr(bytes(der))
    assert not tampered.is_signature_valid
    assert foreign.is_signature_valid
    return tampered.public_bytes(serialization.Encoding.PEM).decode()


def verify_chain(svid_pem: str, bundle_pem: str, at: datetime) -> x509.Certificate:
    chain = x509.load_pem_x509_certificates(svid_pem.encode())
    roots = x509.load_pem_x509_certificates(bundle_pem.encode())
    verifier = PolicyBuilder().store(Store(roots)).time(at).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert verified.chain[0] == chain[0]
    assert verified.chain[-1] in roots
    return chain[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


# -- entries --------------------------------------------------------------------------


def test_entry_crud(api: Api) -> None:
    created = api.create(spiffe_id=WEB, selectors=["unix:uid:1000", "k8s:ns:default"])

    assert created["spiffe_id"] == WEB
    assert created["parent_id"] == DEFAULT_PARENT
    assert created["selectors"] == ["k8s:ns:default", "unix:uid:1000"]
    assert created["x509_svid_ttl"] is None
    assert created["jwt_svid_ttl"] is None
    assert created["dns_names"] == []
    assert created["hint"] == ""
    assert created["admin"] is False
    assert created["expires_at"] is None
    assert created["revision"] >= 1

    shown = api.client.get(f"/v1/entries/{created['id']}")
    assert shown.status_code == 200
    assert shown.json() == created
    assert api.entries() == [created]

    deleted = api.client.delete(f"/v1/entries/{created['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == created
    assert api.entries() == []
    error = error_of(api.client.get(f"/v1/entries/{created['id']}"), 404)
    assert error["code"] == "not_found"
    assert error["field"] == "id"


def test_create_with_every_field(api: Api) -> None:
    expires = (api.clock.now + timedelta(days=30)).replace(microsecond=0)
    created = api.create(
        spiffe_id="spiffe://example.org/ns/prod/sa/api",
        parent_id=NODE,
        selectors=["k8s:pod-label:app:api"],
        x509_svid_ttl=1800,
        jwt_svid_ttl=60,
        dns_names=["api.prod.svc"],
        hint="external",
        admin=True,
        expires_at=expires.isoformat().replace("+00:00", "Z"),
    )
    assert created["parent_id"] == NODE
    assert created["selectors"] == ["k8s:pod-label:app:api"]
    assert created["x509_svid_ttl"] == 1800
    assert created["jwt_svid_ttl"] == 60
    assert created["dns_names"] == ["api.prod.svc"]
    assert created["hint"] == "external"
    assert created["admin"] is True
    assert datetime.fromisoformat(created["expires_at"]) == expires


def test_list_filters(api: Api) -> None:
    web = api.create(spiffe_id=WEB, selectors=["unix:uid:1000"])
    web_node = api.create(spiffe_id=WEB, parent_id=NODE, selectors=["k8s:sa:web"])
    other = api.create(spiffe_id="spiffe://example.org/db", selectors=["unix:uid:1000"])

    def ids(**params: str) -> set[str]:
        response = api.client.get("/v1/entries", params=params)
        assert response.status_code == 200
        return {e["id"] for e in response.json()}

    assert ids() == {web["id"], web_node["id"], other["id"]}
    assert ids(spiffe_id=WEB) == {web["id"], web_node["id"]}
    assert ids(parent_id=NODE) == {web_node["id"]}
    assert ids(selector="unix:uid:1000") == {web["id"], other["id"]}
    assert ids(selector="k8s:sa:web", spiffe_id=WEB) == {web_node["id"]}
    assert ids(selector="unix:uid:1") == set()

    error = error_of(api.client.get("/v1/entries", params={"selector": "unix:uid"}), 400)
    assert error["code"] == "invalid_selector"
    assert error["field"] == "selector"


def test_patch_changes_only_the_given_fields(api: Api) -> None:
    expires = (api.clock.now + timedelta(days=1)).isoformat()
    created = api.create(
        selectors=["unix:uid:1000", "unix:gid:1000"],
        x509_svid_ttl=600,
        dns_names=["web.svc"],
        hint="old",
        expires_at=expires,
    )
    api.clock.advance(timedelta(minutes=5))

    response = api.client.patch(f"/v1/entries/{created['id']}", json={"hint": "new"})
    assert response.status_code == 200, response.text
    patched = response.json()
    unchanged = {"id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "dns_names"}
    assert {k: patched[k] for k in unchanged} == {k: created[k] for k in unchanged}
    assert patched["hint"] == "new"
    assert patched["expires_at"] == created["expires_at"]
    assert patched["created_at"] == created["created_at"]
    assert patched["updated_at"] != created["updated_at"]
    assert patched["revision"] > created["revision"]

    # Lists replace; null resets an optional field to its default.
    response = api.client.patch(
        f"/v1/entries/{created['id']}",
        json={"selectors": ["k8s:sa:web"], "x509_svid_ttl": None, "expires_at": None},
    )
    assert response.status_code == 200, response.text
    again = response.json()
    assert again["selectors"] == ["k8s:sa:web"]
    assert again["x509_svid_ttl"] is None
    assert again["expires_at"] is None
    assert again["dns_names"] == ["web.svc"]
    assert again["hint"] == "new"
    assert again["revision"] > patched["revision"]
    assert api.entries() == [again]


def test_patch_with_nothing_to_change(api: Api) -> None:
    created = api.create()
    error = error_of(api.client.patch(f"/v1/entries/{created['id']}", json={}), 400)
    assert error["field"] == "body"
    assert api.entries() == [created]


VALID_ENTRY = {"spiffe_id": WEB, "selectors": ["unix:uid:1000"]}

BAD_ENTRIES: list[tuple[str, dict[str, Any], str, str | None]] = [
    # (case, body, error code, field)
    (
        "malformed spiffe id",
        {"spiffe_id": "spiffe:/example.org/web"},
        "invalid_spiffe_id",
        "spiffe_id",
    ),
    (
        "spiffe id other domain",
        {"spiffe_id": "spiffe://other.org/web"},
        "invalid_spiffe_id",
        "spiffe_id",
    ),
    ("spiffe id no path", {"spiffe_id": "spiffe://example.org"}, "invalid_spiffe_id", "spiffe_id"),
    ("malformed parent id", {"parent_id": "node-1"}, "invalid_spiffe_id", "parent_id"),
    ("bad selector", {"selectors": ["unix:uid"]}, "invalid_selector", "selectors[0]"),
    (
        "uppercase selector",
        {"selectors": ["unix:uid:1", "K8S:sa:x"]},
        "invalid_selector",
        "selectors[1]",
    ),
    ("no selectors", {"selectors": []}, "invalid_argument", "selectors"),
    ("x509 ttl zero", {"x509_svid_ttl": 0}, "invalid_ttl", "x509_svid_ttl"),
    ("x509 ttl too long", {"x509_svid_ttl": 31 * 86400}, "invalid_ttl", "x509_svid_ttl"),
    ("jwt ttl too long", {"jwt_svid_ttl": 86401}, "invalid_ttl", "jwt_svid_ttl"),
    ("bad dns name", {"dns_names": ["ok.svc", "bad_name"]}, "invalid_argument", "dns_names[1]"),
    ("hint too long", {"hint": "h" * 300}, "invalid_argument", "hint"),
    ("expires_at naive", {"expires_at": "2030-01-01T00:00:00"}, "invalid_argument", "expires_at"),
    ("expires_at past", {"expires_at": "2001-01-01T00:00:00Z"}, "invalid_argument", "expires_at"),
    ("unknown field", {"selector": ["unix:uid:1"]}, "invalid_argument", "selector"),
    ("wrong type selectors", {"selectors": "unix:uid:1000"}, "invalid_argument", "selectors"),
    ("wrong type ttl", {"x509_svid_ttl": "ten minutes"}, "invalid_argument", "x509_svid_ttl"),
    ("fractional ttl", {"x509_svid_ttl": 1.5}, "invalid_argument", "x509_svid_ttl"),
    ("wrong type dns", {"dns_names": "web.svc"}, "invalid_argument", "dns_names"),
    ("wrong type admin", {"admin": "maybe"}, "invalid_argument", "admin"),
    ("wrong type expires_at", {"expires_at": "tomorrow"}, "invalid_argument", "expires_at"),
    ("selector not a string", {"selectors": [1000]}, "invalid_argument", "selectors.0"),
]


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [pytest.param(b, c, f, id=case) for case, b, c, f in BAD_ENTRIES],
)
def test_bad_entry_is_refused_naming_the_field(
    api: Api, changes: dict[str, Any], code: str, field: str
) -> None:
    existing = api.create(spiffe_id="spiffe://example.org/existing")
    before = api.entries()

    error = error_of(api.client.post("/v1/entries", json={**VALID_ENTRY, **changes}), 400)

    assert error["code"] == code
    assert error["field"] == field
    assert api.entries() == before == [existing]


@pytest.mark.parametrize("missing", ["spiffe_id", "selectors"])
def test_missing_required_field(api: Api, missing: str) -> None:
    body = {k: v for k, v in VALID_ENTRY.items() if k != missing}
    error = error_of(api.client.post("/v1/entries", json=body), 400)
    assert error["field"] == missing
    assert "required" in error["message"].lower()
    assert api.entries() == []


@pytest.mark.parametrize("body", [[VALID_ENTRY], "entry", None])
def test_body_that_is_not_an_object(api: Api, body: Any) -> None:
    error = error_of(api.client.post("/v1/entries", json=body), 400)
    assert error["code"] == "invalid_argument"
    assert api.entries() == []


def test_duplicate_entry_is_a_conflict(api: Api) -> None:
    first = api.create(selectors=["unix:uid:1", "k8s:sa:web"])
    error = error_of(
        api.client.post(
            "/v1/entries", json={"spiffe_id": WEB, "selectors": ["k8s:sa:web", "unix:uid:1"]}
        ),
        409,
    )
    assert error["code"] == "conflict"
    assert first["id"] in error["message"]
    assert api.entries() == [first]


def test_boolean_ttl_is_a_wrong_type(api: Api) -> None:
    response = api.client.post("/v1/entries", json={**VALID_ENTRY, "x509_svid_ttl": True})
    error = error_of(response, 400)
    assert error["field"] == "x509_svid_ttl"
    assert api.entries() == []


def test_huge_ttl_is_out_of_range_not_a_server_error(api: Api) -> None:
    response = api.client.post("/v1/entries", json={**VALID_ENTRY, "x509_svid_ttl": 10**15})
    error = error_of(response, 400)
    assert error["code"] == "invalid_ttl"
    assert error["field"] == "x509_svid_ttl"
    assert api.entries() == []


BAD_PATCHES: list[tuple[str, dict[str, Any], str]] = [
    ("malformed spiffe id", {"spiffe_id": "web"}, "spiffe_id"),
    ("bad selector", {"selectors": ["unix"]}, "selectors[0]"),
    ("empty selectors", {"selectors": []}, "selectors"),
    ("ttl out of range", {"jwt_svid_ttl": 0}, "jwt_svid_ttl"),
    ("unknown field", {"id": "other"}, "id"),
    ("wrong type", {"hint": 5}, "hint"),
]


@pytest.mark.parametrize(
    ("body", "field"), [pytest.param(b, f, id=case) for case, b, f in BAD_PATCHES]
)
def test_bad_patch_is_refused_naming_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    created = api.create()
    error = error_of(api.client.patch(f"/v1/entries/{created['id']}", json=body), 400)
    assert error["field"] == field
    assert api.entries() == [created]


@pytest.mark.parametrize("field", ["hint", "dns_names", "admin", "spiffe_id", "selectors"])
def test_patch_null_for_a_required_field_is_a_bad_request(api: Api, field: str) -> None:
    created = api.create()
    error = error_of(api.client.patch(f"/v1/entries/{created['id']}", json={field: None}), 400)
    assert error["field"] == field
    assert api.entries() == [created]


def test_patch_into_a_duplicate_is_a_conflict(api: Api) -> None:
    api.create(selectors=["unix:uid:1"])
    second = api.create(selectors=["unix:uid:2"])
    before = api.entries()
    error = error_of(
        api.client.patch(f"/v1/entries/{second['id']}", json={"selectors": ["unix:uid:1"]}), 409
    )
    assert error["code"] == "conflict"
    assert api.entries() == before


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_unknown_entry_is_not_found(api: Api, method: str) -> None:
    existing = api.create()
    kwargs: dict[str, Any] = {"json": {"hint": "x"}} if method == "PATCH" else {}
    response = api.client.request(method, "/v1/entries/no-such-entry", **kwargs)
    error = error_of(response, 404)
    assert error["code"] == "not_found"
    assert error["field"] == "id"
    assert "no-such-entry" in error["message"]
    assert api.entries() == [existing]


# -- X509-SVIDs -----------------------------------------------------------------------


def test_mint_x509_svid(api: Api) -> None:
    key = p256()
    before = api.issued_count()
    response = api.client.post(
        "/v1/svids/x509",
        json={"spiffe_id": WEB, "csr": csr_pem(key, hashes.SHA256()), "ttl": 600},
    )

    assert response.status_code == 201, response.text
    assert "PRIVATE KEY" not in response.text
    body = response.json()
    assert set(body) == {"spiffe_id", "serial", "expires_at", "capped", "svid_pem", "bundle_pem"}
    leaf = verify_chain(body["svid_pem"], body["bundle_pem"], api.clock.now)
    assert uri_sans(leaf) == [WEB]
    assert body["spiffe_id"] == WEB
    assert body["serial"] == f"{leaf.serial_number:x}"
    assert body["capped"] is False
    assert leaf.not_valid_after_utc == api.clock.now + timedelta(seconds=600)
    assert datetime.fromisoformat(body["expires_at"]) == leaf.not_valid_after_utc
    assert leaf.public_key() == key.public_key()
    assert body["bundle_pem"] == api.client.get("/v1/bundle", params={"format": "pem"}).text
    assert api.issued_count() == before + 1


def test_minted_svid_is_accepted_by_py_spiffe(api: Api) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    body = api.client.post(
        "/v1/svids/x509",
        json={
            "spiffe_id": WEB,
            "csr": csr_pem(key, hashes.SHA384()),
            "dns_names": ["web.default.svc"],
        },
    ).json()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    svid = X509Svid.parse(body["svid_pem"].encode(), key_pem)
    bundle = X509Bundle.parse(TD, body["bundle_pem"].encode())

    assert svid.spiffe_id == SpiffeId(WEB)
    assert svid.leaf.issuer in {a.subject for a in bundle.x509_authorities}
    dns = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert dns.get_values_for_type(x509.DNSName) == ["web.default.svc"]
    # Default lifetime: svid.x509_ttl, 1h.
    assert svid.leaf.not_valid_after_utc == api.clock.now + timedelta(hours=1)


def test_mint_with_rsa_2048_csr_and_server_auth(api: Api) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = api.client.post(
        "/v1/svids/x509",
        json={"spiffe_id": WEB, "csr": csr_pem(key, hashes.SHA256()), "dns_names": ["web.svc"]},
    ).json()
    chain = x509.load_pem_x509_certificates(body["svid_pem"].encode())
    roots = x509.load_pem_x509_certificates(body["bundle_pem"].encode())
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(api.clock.now)
        .build_server_verifier(x509.DNSName("web.svc"))
    )
    assert verifier.verify(chain[0], chain[1:])[0] == chain[0]
    with pytest.raises(VerificationError):
        (
            PolicyBuilder()
            .store(Store(roots))
            .time(api.clock.now)
            .build_server_verifier(x509.DNSName("other.svc"))
            .verify(chain[0], chain[1:])
        )


def test_svid_longer_than_the_ca_is_capped(api: Api) -> None:
    body = api.client.post(
        "/v1/svids/x509",
        json={"spiffe_id": WEB, "csr": csr_pem(p256(), hashes.SHA256()), "ttl": 30 * 86400},
    ).json()
    active = api.server.ca.active
    assert active is not None
    leaf = x509.load_pem_x509_certificates(body["svid_pem"].encode())[0]
    assert body["capped"] is True
    assert leaf.not_valid_after_utc == active.not_after


def bad_mints() -> list[Any]:
    good = {"spiffe_id": WEB, "csr": csr_pem(p256(), hashes.SHA256())}
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused on purpose
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("malformed csr", {"csr": "not a csr"}, "invalid_csr", "csr"),
        (
            "certificate instead of csr",
            {"csr": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
            "invalid_csr",
            "csr",
        ),
        ("csr with bad signature", {"csr": tampered_csr_pem()}, "invalid_csr", "csr"),
        ("rsa-1024 csr", {"csr": csr_pem(small_rsa, hashes.SHA256())}, "invalid_csr", "csr"),
        (
            "ed25519 csr",
            {"csr": csr_pem(ed25519.Ed25519PrivateKey.generate())},
            "invalid_csr",
            "csr",
        ),
        (
            "p-521 csr",
            {"csr": csr_pem(ec.generate_private_key(ec.SECP521R1()), hashes.SHA512())},
            "invalid_csr",
            "csr",
        ),
        (
            "malformed spiffe id",
            {"spiffe_id": "spiffe://example.org/a//b"},
            "invalid_spiffe_id",
            "spiffe_id",
        ),
        (
            "spiffe id other domain",
            {"spiffe_id": "spiffe://evil.org/web"},
            "invalid_spiffe_id",
            "spiffe_id",
        ),
        (
            "trust domain itself",
            {"spiffe_id": "spiffe://example.org"},
            "invalid_spiffe_id",
            "spiffe_id",
        ),
        ("ttl zero", {"ttl": 0}, "invalid_ttl", "ttl"),
        ("ttl over 30 days", {"ttl": 31 * 86400}, "invalid_ttl", "ttl"),
        ("bad dns name", {"dns_names": ["bad name"]}, "invalid_argument", "dns_names[0]"),
        ("unknown field", {"key": "pem"}, "invalid_argument", "key"),
        ("missing csr", {"csr": None}, "invalid_argument", "csr"),
    ]
    return [
        pytest.param(
            {k: v for k, v in {**good, **c}.items() if v is not None}, code, field, id=case
        )
        for case, c, code, field in cases
    ]


@pytest.mark.parametrize(("body", "code", "field"), bad_mints())
def test_bad_x509_mint_is_refused(api: Api, body: dict[str, Any], code: str, field: str) -> None:
    existing = api.create()
    before = api.issued_count()

    error = error_of(api.client.post("/v1/svids/x509", json=body), 400)

    assert error["code"] == code
    assert error["field"] == field
    assert api.issued_count() == before
    assert api.entries() == [existing]


def test_bad_csr_messages_say_what_is_wrong(api: Api) -> None:
    def message(csr: str) -> str:
        response = api.client.post("/v1/svids/x509", json={"spiffe_id": WEB, "csr": csr})
        return str(error_of(response, 400)["message"])

    assert "not a PKCS#10" in message("garbage")
    assert "signature does not verify" in message(tampered_csr_pem())
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused on purpose
    assert "1024 bits is too small" in message(csr_pem(small, hashes.SHA256()))


# -- JWT-SVIDs ------------------------------------------------------------------------


def jwt_bundle(api: Api) -> JwtBundle:
    jwks = api.client.get("/v1/bundle", params={"format": "jwks"}).json()
    keys = [k for k in jwks["keys"] if k["use"] == "jwt-svid"]
    return JwtBundle.parse(TD, json.dumps({"keys": keys}).encode())


def test_mint_jwt_svid_validates_against_the_bundle(api: Api) -> None:
    response = api.client.post(
        "/v1/svids/jwt", json={"spiffe_id": WEB, "audience": ["reviews", "ratings"], "ttl": 120}
    )
    assert response.status_code == 201, response.text
    assert "PRIVATE KEY" not in response.text
    body = response.json()

    svid = JwtSvid.parse_and_validate(body["token"], jwt_bundle(api), {"reviews"})

    assert svid.spiffe_id == SpiffeId(WEB)
    assert set(svid.audience) == {"reviews", "ratings"}
    assert svid.expiry == int((api.clock.now + timedelta(seconds=120)).timestamp())
    assert body["spiffe_id"] == WEB
    assert body["audience"] == ["reviews", "ratings"]
    assert body["capped"] is False
    assert datetime.fromisoformat(body["expires_at"]).timestamp() == svid.expiry
    active = api.server.ca.active
    assert active is not None
    assert body["key_id"] == active.jwt.key_id


def test_jwt_default_ttl(api: Api) -> None:
    body = api.client.post("/v1/svids/jwt", json={"spiffe_id": WEB, "audience": ["a"]}).json()
    svid = JwtSvid.parse_and_validate(body["token"], jwt_bundle(api), {"a"})
    assert svid.expiry == int((api.clock.now + timedelta(minutes=5)).timestamp())


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        pytest.param({"audience": []}, "invalid_argument", "audience", id="no audience"),
        pytest.param({"audience": [" "]}, "invalid_argument", "audience", id="blank audience"),
        pytest.param({"audience": None}, "invalid_argument", "audience", id="missing audience"),
        pytest.param({"audience": "a"}, "invalid_argument", "audience", id="audience not a list"),
        pytest.param({"spiffe_id": "web"}, "invalid_spiffe_id", "spiffe_id", id="bad spiffe id"),
        pytest.param({"ttl": 86401}, "invalid_ttl", "ttl", id="ttl over a day"),
        pytest.param({"ttl": 0}, "invalid_ttl", "ttl", id="ttl zero"),
    ],
)
def test_bad_jwt_mint_is_refused(api: Api, body: dict[str, Any], code: str, field: str) -> None:
    request = {
        k: v for k, v in {"spiffe_id": WEB, "audience": ["a"], **body}.items() if v is not None
    }
    error = error_of(api.client.post("/v1/svids/jwt", json=request), 400)
    assert error["code"] == code
    assert error["field"] == field


# -- bundle and CA --------------------------------------------------------------------


def test_bundle_pem_and_jwks(api: Api) -> None:
    active = api.server.ca.active
    assert active is not None
    pem = api.client.get("/v1/bundle", params={"format": "pem"})
    assert pem.status_code == 200
    assert pem.headers["content-type"].startswith("application/x-pem-file")
    assert x509.load_pem_x509_certificates(pem.text.encode()) == [active.certificate]

    jwks = api.client.get("/v1/bundle").json()  # jwks is the default
    assert jwks == api.client.get("/v1/bundle", params={"format": "jwks"}).json()
    x509_keys = [k for k in jwks["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in jwks["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) == 1
    assert len(x509_keys[0]["x5c"]) == 1
    assert [k["kid"] for k in jwt_keys] == [active.jwt.key_id]
    assert jwks["spiffe_sequence"] >= 1
    assert jwks["spiffe_refresh_hint"] == 300

    error = error_of(api.client.get("/v1/bundle", params={"format": "der"}), 400)
    assert error["field"] == "format"


def test_show_ca(api: Api) -> None:
    ca = api.client.get("/v1/ca").json()
    active = api.server.ca.active
    assert active is not None
    assert ca["trust_domain"] == "example.org"
    assert ca["upstream"] is False
    assert len(ca["slots"]) == 1
    slot = ca["slots"][0]
    assert slot["id"] == active.id
    assert slot["state"] == "active"
    assert slot["key_type"] == "ec-p256"
    assert slot["can_sign"] is True
    assert slot["serial"] == f"{active.certificate.serial_number:x}"
    assert datetime.fromisoformat(slot["not_after"]) == active.not_after
    assert "meshward CA" in slot["subject"]


def test_rotate_ca(api: Api) -> None:
    before_ca = api.client.get("/v1/ca").json()
    old_id = before_ca["slots"][0]["id"]
    old_svid = api.client.post(
        "/v1/svids/x509", json={"spiffe_id": WEB, "csr": csr_pem(p256(), hashes.SHA256())}
    ).json()
    api.clock.advance(timedelta(minutes=1))

    response = api.client.post("/v1/ca/rotate")

    assert response.status_code == 200, response.text
    result = response.json()
    assert any(e.startswith("prepared CA ") for e in result["events"])
    assert any(e.startswith("activated CA ") for e in result["events"])
    slots = {s["id"]: s for s in result["ca"]["slots"]}
    assert len(slots) == 2
    assert slots[old_id]["state"] == "old"
    (new_id,) = set(slots) - {old_id}
    assert slots[new_id]["state"] == "active"
    assert result["ca"]["bundle_sequence"] > before_ca["bundle_sequence"]
    assert api.client.get("/v1/ca").json() == result["ca"]

    bundle_pem = api.client.get("/v1/bundle", params={"format": "pem"}).text
    assert len(x509.load_pem_x509_certificates(bundle_pem.encode())) == 2
    # An SVID from the old CA still verifies against the new bundle ...
    verify_chain(old_svid["svid_pem"], bundle_pem, api.clock.now)
    # ... and new SVIDs chain to the new CA.
    new_svid = api.client.post(
        "/v1/svids/x509", json={"spiffe_id": WEB, "csr": csr_pem(p256(), hashes.SHA256())}
    ).json()
    leaf = verify_chain(new_svid["svid_pem"], bundle_pem, api.clock.now)
    assert leaf.issuer.rfc4514_string() == slots[new_id]["subject"]
    jwt = api.client.post("/v1/svids/jwt", json={"spiffe_id": WEB, "audience": ["a"]}).json()
    assert jwt["key_id"] == slots[new_id]["jwt_key_id"]
    JwtSvid.parse_and_validate(jwt["token"], jwt_bundle(api), {"a"})
    assert {k["kid"] for k in api.client.get("/v1/bundle").json()["keys"] if "kid" in k} == {
        slots[old_id]["jwt_key_id"],
        slots[new_id]["jwt_key_id"],
    }


# -- join tokens ----------------------------------------------------------------------


def test_generate_join_token(api: Api) -> None:
    response = api.client.post("/v1/join-tokens", json={"ttl": 900})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"token", "id", "expires_at"}
    assert len(body["token"]) >= 32
    assert datetime.fromisoformat(body["expires_at"]) == api.clock.now + timedelta(seconds=900)
    with api.server.db.transaction() as s:
        rows = s.scalars(select(JoinTokenRow)).all()
    assert [r.id for r in rows] == [body["id"]]
    assert body["token"] not in {rows[0].token_sha256, rows[0].id}

    default = api.client.post("/v1/join-tokens", json={}).json()
    assert datetime.fromisoformat(default["expires_at"]) == api.clock.now + timedelta(minutes=10)
    assert default["token"] != body["token"]


@pytest.mark.parametrize(
    ("ttl", "code"),
    [
        (0, "invalid_ttl"),
        (-5, "invalid_ttl"),
        (8 * 86400, "invalid_ttl"),
        ("soon", "invalid_argument"),
    ],
)
def test_bad_join_token_ttl(api: Api, ttl: Any, code: str) -> None:
    error = error_of(api.client.post("/v1/join-tokens", json={"ttl": ttl}), 400)
    assert error["code"] == code
    assert error["field"] == "ttl"
    with api.server.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(JoinTokenRow)) == 0


@pytest.mark.parametrize("path", ["/v1/join-tokens", "/v1/svids/x509", "/v1/svids/jwt"])
def test_huge_ttl_in_requests_is_a_bad_request(api: Api, path: str) -> None:
    body: dict[str, Any] = {"ttl": 10**15}
    if path != "/v1/join-tokens":
        body |= {"spiffe_id": WEB, "audience": ["a"]} if "jwt" in path else {"spiffe_id": WEB}
        if "x509" in path:
            body["csr"] = csr_pem(p256(), hashes.SHA256())
    error = error_of(api.client.post(path, json=body), 400)
    assert error["field"] == "ttl"


# -- health and metrics ---------------------------------------------------------------


def test_live_and_ready(api: Api) -> None:
    live = api.client.get("/live")
    assert live.status_code == 200
    assert live.json() == {"status": "live"}
    ready = api.client.get("/ready")
    assert ready.status_code == 200
    active = api.server.ca.active
    assert active is not None
    assert ready.json() == {
        "status": "ready",
        "ca": active.id,
        "ca_not_after": active.not_after.isoformat(),
    }


def test_not_ready_without_an_active_ca(api: Api, tmp_path: Path) -> None:
    unloaded = CertificateAuthority(
        db=api.server.db,
        trust_domain=TD,
        key_dir=tmp_path / "other-keys",
        settings=CASettings(),
        metrics=IdentityMetrics(CollectorRegistry()),
    )
    try:
        starting = IdentityServer(
            config=api.server.config,
            db=api.server.db,
            ca=unloaded,
            admin=api.server.admin,
            registry=api.server.registry,
        )
        app = create_admin_app(api.server.admin, registry=api.server.registry, ready=starting.ready)
        with TestClient(app) as client:
            response = client.get("/ready")
            live = client.get("/live")
    finally:
        unloaded.close()
    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "ca": "no active CA"}
    assert live.status_code == 200


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics(api: Api) -> None:
    active = api.server.ca.active
    assert active is not None
    first = api.create(spiffe_id="spiffe://example.org/a")
    api.create(spiffe_id="spiffe://example.org/b")
    for _ in range(2):
        api.client.post(
            "/v1/svids/x509", json={"spiffe_id": WEB, "csr": csr_pem(p256(), hashes.SHA256())}
        )
    api.client.post("/v1/svids/jwt", json={"spiffe_id": WEB, "audience": ["a"]})
    api.client.post("/v1/svids/x509", json={"spiffe_id": WEB, "csr": "bad"})

    samples = scrape(api)

    assert samples[("meshward_svids_signed_total", (("type", "x509_svid"),))] == 2
    assert samples[("meshward_svids_signed_total", (("type", "jwt_svid"),))] == 1
    assert samples[("meshward_svids_signed_total", (("type", "ca"),))] == 1
    assert samples[("meshward_svid_signing_seconds_count", (("type", "x509_svid"),))] == 2
    assert samples[("meshward_svid_signing_seconds_count", (("type", "jwt_svid"),))] == 1
    assert samples[("meshward_svid_signing_seconds_sum", (("type", "x509_svid"),))] > 0
    assert samples[("meshward_ca_expiry_timestamp_seconds", ())] == active.not_after.timestamp()
    assert samples[("meshward_registration_entries", ())] == 2

    api.client.delete(f"/v1/entries/{first['id']}")
    assert scrape(api)[("meshward_registration_entries", ())] == 1


def test_metrics_follow_rotation(api: Api) -> None:
    api.clock.advance(timedelta(hours=1))
    api.client.post("/v1/ca/rotate")
    active = api.server.ca.active
    assert active is not None
    samples = scrape(api)
    assert samples[("meshward_ca_expiry_timestamp_seconds", ())] == active.not_after.timestamp()
    assert samples[("meshward_svids_signed_total", (("type", "ca"),))] == 2
