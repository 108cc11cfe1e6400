"""CA key-slot rotation driven by a fake clock: PREPARED → ACTIVE → OLD → pruned."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import String, Text, column, inspect, select
from sqlalchemy.sql import table

from identity.authority import CertificateAuthority, SlotState
from identity.errors import CAUnavailableError
from identity.store.journal import list_slots, load_bundle
from identity.x509certs import BACKDATE
from tests.identity.certs import issue_svid, validate_jwt, verify_x509

DEFAULT = pytest.param({}, id="ttl24h")
SHORT = pytest.param(
    {
        "ttl": timedelta(hours=6),
        "x509_svid_ttl": timedelta(hours=1),
        "bundle_grace": timedelta(minutes=10),
    },
    id="ttl6h",
)
AUDIENCE = "spiffe://example.org/ns/db"


def _states(ca: CertificateAuthority) -> dict[str, SlotState]:
    return {s.id: s.state for s in ca.slots}


def _journal(db) -> dict[str, str]:
    with db.transaction() as session:
        return {r.id: r.state for r in list_slots(session)}


def _key_files(key_dir: Path, slot_id: str) -> list[Path]:
    return [key_dir / f"{slot_id}.x509.key.pem", key_dir / f"{slot_id}.jwt.key.pem"]


def _jwt_key_ids(ca: CertificateAuthority) -> set[str]:
    return {a.key_id for a in ca.bundle.jwt_authorities}


def test_bootstrap_creates_one_active_ca(make_ca, clock, db, tmp_path):
    ca = make_ca(clock)
    (slot,) = ca.slots
    assert slot.state is SlotState.ACTIVE
    assert ca.active == slot
    assert slot.not_before == clock() - BACKDATE
    assert slot.not_after == clock() + timedelta(hours=24)
    assert slot.activated_at == clock()
    assert _journal(db) == {slot.id: "active"}
    assert ca.bundle.x509_authorities == (slot.certificate,)
    assert _jwt_key_ids(ca) == {slot.jwt.key_id}
    assert all(p.is_file() for p in _key_files(tmp_path / "keys", slot.id))
    with db.transaction() as session:
        stored = load_bundle(session, trust_domain="example.org")
    assert stored is not None
    assert stored.sequence == ca.bundle.sequence


@pytest.mark.parametrize("settings", [DEFAULT, SHORT])
def test_slot_lifecycle(make_ca, clock, db, tmp_path, settings):
    key_dir = tmp_path / "keys"
    ca = make_ca(clock, **settings)
    grace = ca.settings.bundle_grace
    first = ca.active
    assert first.prepare_at == first.not_before + (first.not_after - first.not_before) / 2
    assert first.activate_at == first.not_before + (first.not_after - first.not_before) * 5 / 6

    # before half-life: nothing changes
    for now in (clock() + timedelta(minutes=1), first.prepare_at - timedelta(seconds=1)):
        assert ca.rotate(now) == []
        assert _states(ca) == {first.id: SlotState.ACTIVE}

    # at half-life: a prepared CA, published at once, signing nothing yet
    now = first.prepare_at
    events = ca.rotate(now)
    assert len(events) == 1
    assert events[0].startswith("prepared CA ")
    (second,) = [s for s in ca.slots if s.id != first.id]
    assert _states(ca) == {first.id: SlotState.ACTIVE, second.id: SlotState.PREPARED}
    assert _journal(db) == {first.id: "active", second.id: "prepared"}
    assert ca.bundle.x509_authorities == (first.certificate, second.certificate)
    assert _jwt_key_ids(ca) == {first.jwt.key_id, second.jwt.key_id}
    assert second.not_after == now + ca.settings.ttl
    issue, _ = issue_svid(ca, now)
    assert issue.chain[1] == first.certificate
    jwt_issue = ca.sign_jwt_svid(spiffe_id=issue.spiffe_id, audience=(AUDIENCE,), ttl=None, now=now)
    assert jwt_issue.key_id == first.jwt.key_id

    # until 5/6 the first CA keeps signing
    assert ca.rotate(first.activate_at - timedelta(seconds=1)) == []
    issue, _ = issue_svid(ca, first.activate_at - timedelta(seconds=1))
    assert issue.chain[1] == first.certificate

    # at 5/6 the prepared CA becomes active, the first one old but still trusted
    now = first.activate_at
    assert ca.rotate(now) == [f"activated CA {second.id}"]
    assert _states(ca) == {first.id: SlotState.OLD, second.id: SlotState.ACTIVE}
    assert _journal(db) == {first.id: "old", second.id: "active"}
    assert ca.active.id == second.id
    assert ca.active.activated_at == now
    old = next(s for s in ca.slots if s.id == first.id)
    assert old.retired_at == now
    assert ca.bundle.x509_authorities == (first.certificate, second.certificate)
    assert _jwt_key_ids(ca) == {first.jwt.key_id, second.jwt.key_id}
    after, _ = issue_svid(ca, now)
    assert after.chain[1] == second.certificate
    verify_x509(ca.bundle.x509_authorities, issue.chain, at=now)

    # the old CA stays in the bundle until its NotAfter plus the grace (meanwhile the
    # second CA has reached its own half-life and prepared a third)
    assert second.prepare_at < first.not_after + grace
    events = ca.rotate(first.not_after + grace - timedelta(seconds=1))
    assert len(events) == 1
    assert events[0].startswith("prepared CA ")
    (third,) = [s for s in ca.slots if s.id not in {first.id, second.id}]
    assert _states(ca) == {
        first.id: SlotState.OLD,
        second.id: SlotState.ACTIVE,
        third.id: SlotState.PREPARED,
    }
    assert first.certificate in ca.bundle.x509_authorities
    assert all(p.is_file() for p in _key_files(key_dir, first.id))

    now = first.not_after + grace
    events = ca.rotate(now)
    assert events == [f"pruned CA {first.id} (expired; removed from the bundle)"]
    assert _states(ca) == {second.id: SlotState.ACTIVE, third.id: SlotState.PREPARED}
    assert _journal(db) == {second.id: "active", third.id: "prepared"}
    assert ca.bundle.x509_authorities == (second.certificate, third.certificate)
    assert _jwt_key_ids(ca) == {second.jwt.key_id, third.jwt.key_id}
    assert not any(p.exists() for p in _key_files(key_dir, first.id))
    assert all(p.is_file() for p in _key_files(key_dir, second.id))
    with db.transaction() as session:
        stored = load_bundle(session, trust_domain="example.org")
    assert stored is not None
    assert first.jwt.key_id not in stored.jwt_authorities_json
    assert stored.x509_authorities_pem == ca.bundle.pem().decode()


@pytest.mark.parametrize("settings", [DEFAULT, SHORT])
def test_every_valid_svid_verifies_at_every_moment(make_ca, clock, settings):
    """The rotation invariant: nothing issued and unexpired ever stops verifying."""
    ca = make_ca(clock, **settings)
    step = timedelta(minutes=7)
    end = clock() + 3 * ca.settings.ttl
    x509_issued = []
    jwt_issued = []
    active_ids: list[str] = []
    checked_x509 = checked_jwt = 0
    max_roots = 0
    while clock() < end:
        now = clock.advance(step)
        ca.rotate(now)
        if not active_ids or active_ids[-1] != ca.active.id:
            active_ids.append(ca.active.id)
        x509_issued.append(issue_svid(ca, now)[0])
        jwt_issued.append(
            ca.sign_jwt_svid(
                spiffe_id=x509_issued[-1].spiffe_id, audience=(AUDIENCE,), ttl=None, now=now
            )
        )
        bundle = ca.bundle
        max_roots = max(max_roots, len(bundle.x509_authorities))
        for issue in x509_issued:
            leaf = issue.certificate
            if leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
                verify_x509(bundle.x509_authorities, issue.chain, at=now)
                checked_x509 += 1
        for token in jwt_issued:
            if now < token.expires_at:
                validate_jwt(token.token, bundle, {AUDIENCE}, at=now)
                checked_jwt += 1
    # the loop really crossed rotations and really checked old SVIDs
    assert len(active_ids) >= 4
    assert len(set(active_ids)) == len(active_ids)
    # at most: the old CA in its grace, the active one and the next one prepared
    assert max_roots == 3
    ttl = ca.settings.x509_svid_ttl
    assert checked_x509 >= len(x509_issued) * (ttl // step)
    assert checked_jwt >= len(jwt_issued)


def _issue_checked(ca, now):
    issue, _ = issue_svid(ca, now)
    verify_x509(ca.bundle.x509_authorities, issue.chain, at=now)
    return issue


def test_force_rotation_prepares_and_activates_at_once(make_ca, clock):
    ca = make_ca(clock)
    first = ca.active
    before = _issue_checked(ca, clock())
    sequence = ca.bundle.sequence
    now = clock.advance(timedelta(hours=1))

    events = ca.rotate(now, force=True)
    assert len(events) == 2
    assert events[0].startswith("prepared CA ")
    new = ca.active
    assert new.id != first.id
    assert events[1] == f"activated CA {new.id}"
    assert _states(ca) == {first.id: SlotState.OLD, new.id: SlotState.ACTIVE}
    assert new.not_after == now + timedelta(hours=24)
    assert ca.bundle.x509_authorities == (first.certificate, new.certificate)
    assert ca.bundle.sequence == sequence + 1
    verify_x509(ca.bundle.x509_authorities, before.chain, at=now)
    assert _issue_checked(ca, now).chain[1] == new.certificate

    # the old CA is still pruned on its own schedule
    ca.rotate(first.not_after + ca.settings.bundle_grace - timedelta(seconds=1))
    assert first.certificate in ca.bundle.x509_authorities
    ca.rotate(first.not_after + ca.settings.bundle_grace)
    assert first.certificate not in ca.bundle.x509_authorities
    assert new.certificate in ca.bundle.x509_authorities


def test_force_rotation_activates_an_already_prepared_ca(make_ca, clock):
    ca = make_ca(clock)
    first = ca.active
    ca.rotate(first.prepare_at)
    (prepared,) = [s for s in ca.slots if s.state is SlotState.PREPARED]
    events = ca.rotate(first.prepare_at + timedelta(minutes=1), force=True)
    assert events == [f"activated CA {prepared.id}"]
    assert _states(ca) == {first.id: SlotState.OLD, prepared.id: SlotState.ACTIVE}


def test_restart_resumes_the_same_slots(make_ca, clock, tmp_path):
    key_dir = tmp_path / "keys"
    ca = make_ca(clock, key_dir=key_dir)
    clock.now = ca.active.prepare_at + timedelta(minutes=10)
    ca.rotate(clock())
    before = _issue_checked(ca, clock())
    clock.advance(timedelta(minutes=10))

    restarted = make_ca(clock, key_dir=key_dir)
    assert [(s.id, s.state, s.certificate) for s in restarted.slots] == [
        (s.id, s.state, s.certificate) for s in ca.slots
    ]
    assert restarted.active.id == ca.active.id
    assert restarted.active.jwt.key_id == ca.active.jwt.key_id
    assert restarted.rotate(clock()) == []
    after = _issue_checked(restarted, clock())
    assert after.chain[1] == ca.active.certificate
    verify_x509(ca.bundle.x509_authorities, after.chain, at=clock())
    verify_x509(restarted.bundle.x509_authorities, before.chain, at=clock())
    token = restarted.sign_jwt_svid(
        spiffe_id=after.spiffe_id, audience=(AUDIENCE,), ttl=None, now=clock()
    )
    validate_jwt(token.token, ca.bundle, {AUDIENCE}, at=clock())

    # and it goes on rotating on the original schedule
    assert restarted.rotate(ca.active.activate_at - timedelta(seconds=1)) == []


@pytest.mark.parametrize("lost", [("x509",), ("jwt",), ("x509", "jwt")])
def test_lost_active_key_is_replaced_and_its_root_kept(make_ca, clock, db, tmp_path, lost):
    key_dir = tmp_path / "keys"
    ca = make_ca(clock, key_dir=key_dir)
    lost_slot = ca.active
    before = _issue_checked(ca, clock())
    token = ca.sign_jwt_svid(
        spiffe_id=before.spiffe_id, audience=(AUDIENCE,), ttl=None, now=clock()
    )
    for kind in lost:
        (key_dir / f"{lost_slot.id}.{kind}.key.pem").unlink()
    now = clock.advance(timedelta(minutes=1))

    restarted = make_ca(clock, key_dir=key_dir)
    new = restarted.active
    assert new is not None
    assert new.id != lost_slot.id
    assert _states(restarted) == {lost_slot.id: SlotState.OLD, new.id: SlotState.ACTIVE}
    assert _journal(db) == {lost_slot.id: "old", new.id: "active"}
    assert new.activated_at == now
    assert restarted.bundle.x509_authorities == (lost_slot.certificate, new.certificate)
    assert _jwt_key_ids(restarted) == {lost_slot.jwt.key_id, new.jwt.key_id}
    verify_x509(restarted.bundle.x509_authorities, before.chain, at=now)
    validate_jwt(token.token, restarted.bundle, {AUDIENCE}, at=now)
    assert _issue_checked(restarted, now).chain[1] == new.certificate

    restarted.rotate(lost_slot.not_after + restarted.settings.bundle_grace)
    assert lost_slot.certificate not in restarted.bundle.x509_authorities
    assert lost_slot.jwt.key_id not in _jwt_key_ids(restarted)
    assert lost_slot.id not in _journal(db)
    assert new.certificate in restarted.bundle.x509_authorities


def test_lost_prepared_key_is_replaced_when_activation_is_due(make_ca, clock, tmp_path):
    key_dir = tmp_path / "keys"
    ca = make_ca(clock, key_dir=key_dir)
    first = ca.active
    ca.rotate(first.prepare_at)
    (prepared,) = [s for s in ca.slots if s.state is SlotState.PREPARED]
    (key_dir / f"{prepared.id}.x509.key.pem").unlink()

    restarted = make_ca(clock, key_dir=key_dir)
    assert restarted.active.id == first.id
    restarted.rotate(first.activate_at)
    new = restarted.active
    assert new.id not in {first.id, prepared.id}
    assert {s.id: s.state for s in restarted.slots} == {
        first.id: SlotState.OLD,
        prepared.id: SlotState.OLD,
        new.id: SlotState.ACTIVE,
    }
    assert prepared.certificate in restarted.bundle.x509_authorities


def test_prepared_ca_that_expired_while_down_is_dropped(make_ca, clock, db, tmp_path):
    key_dir = tmp_path / "keys"
    ca = make_ca(clock, key_dir=key_dir)
    first = ca.active
    ca.rotate(first.prepare_at)
    (prepared,) = [s for s in ca.slots if s.state is SlotState.PREPARED]
    # the server is down from here until after the prepared CA's NotAfter
    clock.now = prepared.not_after + timedelta(minutes=1)

    restarted = make_ca(clock, key_dir=key_dir)
    new = restarted.active
    assert new.id not in {first.id, prepared.id}
    assert _states(restarted) == {new.id: SlotState.ACTIVE}
    assert _journal(db) == {new.id: "active"}
    assert restarted.bundle.x509_authorities == (new.certificate,)
    assert _jwt_key_ids(restarted) == {new.jwt.key_id}
    assert not any(p.exists() for p in _key_files(key_dir, prepared.id))
    assert not any(p.exists() for p in _key_files(key_dir, first.id))
    _issue_checked(restarted, clock())


def test_prepared_ca_is_activated_when_the_active_expired_while_down(make_ca, clock, tmp_path):
    key_dir = tmp_path / "keys"
    ca = make_ca(clock, key_dir=key_dir)
    first = ca.active
    ca.rotate(first.prepare_at)
    (prepared,) = [s for s in ca.slots if s.state is SlotState.PREPARED]
    clock.now = first.not_after + timedelta(minutes=1)  # within the grace

    restarted = make_ca(clock, key_dir=key_dir)
    assert _states(restarted) == {first.id: SlotState.OLD, prepared.id: SlotState.ACTIVE}
    assert _issue_checked(restarted, clock()).chain[1] == prepared.certificate


def test_signing_without_an_active_ca_is_refused(make_ca, clock):
    ca = make_ca(clock)
    expired = ca.active.not_after
    with pytest.raises(CAUnavailableError):
        issue_svid(ca, expired)
    with pytest.raises(CAUnavailableError):
        ca.sign_jwt_svid(
            spiffe_id=issue_svid(ca, clock())[0].spiffe_id, audience=("a",), ttl=None, now=expired
        )


def test_key_files_are_private(make_ca, clock, tmp_path):
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o755)
    key_dir.chmod(0o755)
    ca = make_ca(clock, key_dir=key_dir)
    ca.rotate(ca.active.prepare_at)
    files = sorted(key_dir.iterdir())
    assert len(files) == 4
    assert {p.name for p in files} == {p.name for s in ca.slots for p in _key_files(key_dir, s.id)}
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert b"PRIVATE KEY" in path.read_bytes()


def test_no_private_key_material_in_the_database(make_ca, clock, db):
    ca = make_ca(clock)
    issue_svid(ca, clock())
    ca.sign_jwt_svid(
        spiffe_id=issue_svid(ca, clock())[0].spiffe_id, audience=("a",), ttl=None, now=clock()
    )
    ca.rotate(ca.active.prepare_at)
    ca.rotate(ca.active.activate_at, force=True)
    assert ca.flush(10)

    inspector = inspect(db.engine)
    scanned = 0
    certificates = 0
    with db.engine.connect() as conn:
        for table_name in inspector.get_table_names():
            text_columns = [
                c["name"]
                for c in inspector.get_columns(table_name)
                if isinstance(c["type"], String | Text)
            ]
            if not text_columns:
                continue
            query = select(*(column(c) for c in text_columns)).select_from(table(table_name))
            for row in conn.execute(query):
                for value in row:
                    if value is None:
                        continue
                    scanned += 1
                    assert "PRIVATE KEY" not in value, table_name
                    assert "PRIVATE" not in value.upper() or "BEGIN" not in value, table_name
                    certificates += "BEGIN CERTIFICATE" in value
    # the scan saw real data: slot certificates, the bundle, issued serials
    assert scanned > 10
    assert certificates >= 3


def test_metrics_count_signatures(make_ca, clock):
    registry = CollectorRegistry()
    ca = make_ca(clock, registry=registry)

    def sample(name: str, kind: str) -> float | None:
        return registry.get_sample_value(name, {"type": kind})

    assert sample("meshward_svids_signed_total", "ca") == 1
    assert sample("meshward_svids_signed_total", "x509_svid") in (None, 0)
    for _ in range(3):
        issue_svid(ca, clock())
    for _ in range(2):
        ca.sign_jwt_svid(
            spiffe_id=issue_svid(ca, clock())[0].spiffe_id, audience=("a",), ttl=None, now=clock()
        )
    assert sample("meshward_svids_signed_total", "x509_svid") == 5
    assert sample("meshward_svids_signed_total", "jwt_svid") == 2
    assert sample("meshward_svid_signing_seconds_count", "x509_svid") == 5
    assert sample("meshward_svid_signing_seconds_count", "jwt_svid") == 2
    assert sample("meshward_svid_signing_seconds_sum", "x509_svid") > 0

    ca.rotate(ca.active.prepare_at)
    assert sample("meshward_svids_signed_total", "ca") == 2

    # refused signatures are not counted
    with pytest.raises(CAUnavailableError):
        issue_svid(ca, ca.active.not_after + timedelta(days=365))
    assert sample("meshward_svids_signed_total", "x509_svid") == 5
