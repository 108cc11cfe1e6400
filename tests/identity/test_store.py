"""Repository functions of identity/store on SQLite and PostgreSQL, migrations, and URL errors."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from spiffe import TrustDomain
from sqlalchemy import column, func, inspect, select, table, text

from identity.entries import Entry, EntrySpec, ValidEntry
from identity.errors import ConflictError, NotFoundError, StoreError
from identity.selectors import Selector
from identity.store import agents, issued, journal, tokens
from identity.store import entries as entry_rows
from identity.store.database import VERSION_TABLE, Database
from identity.store.models import Counter, EntrySelectorRow, JoinTokenRow

TRUST_DOMAIN = TrustDomain("example.org")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SERVER = "spiffe://example.org/meshward/server"
NODE = "spiffe://example.org/agent/node-1"


def valid(
    spiffe_id: str = "spiffe://example.org/ns/default/sa/web",
    *selectors: str,
    parent_id: str = SERVER,
    **fields: Any,
) -> ValidEntry:
    spec = EntrySpec(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=selectors or ("unix:uid:1000",),
        **fields,
    )
    return spec.validate(TRUST_DOMAIN, now=T0)


def create(db: Database, entry: ValidEntry, now: datetime = T0) -> Entry:
    with db.transaction() as s:
        return entry_rows.create_entry(s, entry=entry, now=now)


def all_entries(db: Database) -> list[Entry]:
    with db.transaction() as s:
        return entry_rows.list_entries(s)


def counter(db: Database) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(Counter.value).where(Counter.name == "entries")) or 0)


# -- entries --------------------------------------------------------------------------


def test_create_then_get_round_trips_every_field(db: Database) -> None:
    expires = T0 + timedelta(days=3)
    entry = valid(
        "spiffe://example.org/ns/prod/sa/api",
        "unix:uid:1000",
        "k8s:pod-label:app:api",
        parent_id=NODE,
        x509_svid_ttl=1800,
        jwt_svid_ttl=120,
        dns_names=("api.prod.svc", "*.api.example.org"),
        hint="external",
        admin=True,
        expires_at=expires,
    )

    created = create(db, entry)
    with db.transaction() as s:
        fetched = entry_rows.get_entry(s, entry_id=created.id)

    assert fetched == created
    assert len(created.id) == 36
    assert created.spiffe_id == "spiffe://example.org/ns/prod/sa/api"
    assert created.parent_id == NODE
    assert created.selectors == (
        Selector("k8s", "pod-label", "app:api"),
        Selector("unix", "uid", "1000"),
    )
    assert created.x509_svid_ttl == 1800
    assert created.jwt_svid_ttl == 120
    assert created.dns_names == ("api.prod.svc", "*.api.example.org")
    assert created.hint == "external"
    assert created.admin is True
    assert fetched.expires_at == expires
    assert fetched.expires_at is not None
    assert fetched.expires_at.tzinfo is not None
    assert fetched.created_at == T0 == fetched.updated_at
    assert fetched.revision == 1


def test_optional_fields_default(db: Database) -> None:
    created = create(db, valid())
    with db.transaction() as s:
        fetched = entry_rows.get_entry(s, entry_id=created.id)
    assert fetched.x509_svid_ttl is None
    assert fetched.jwt_svid_ttl is None
    assert fetched.dns_names == ()
    assert fetched.hint == ""
    assert fetched.admin is False
    assert fetched.expires_at is None


def test_list_filters(db: Database) -> None:
    web = create(db, valid("spiffe://example.org/web", "unix:uid:1000", "k8s:ns:default"))
    api = create(db, valid("spiffe://example.org/api", "unix:uid:1001", parent_id=NODE))
    web_on_node = create(
        db, valid("spiffe://example.org/web", "k8s:ns:default", "k8s:sa:web", parent_id=NODE)
    )

    with db.transaction() as s:
        everything = entry_rows.list_entries(s)
        by_spiffe = entry_rows.list_entries(s, spiffe_id="spiffe://example.org/web")
        by_parent = entry_rows.list_entries(s, parent_id=NODE)
        by_both = entry_rows.list_entries(s, spiffe_id="spiffe://example.org/web", parent_id=NODE)
        by_selector = entry_rows.list_entries(s, selector=Selector("k8s", "ns", "default"))
        by_uid = entry_rows.list_entries(s, selector=Selector("unix", "uid", "1001"))
        nothing = entry_rows.list_entries(s, selector=Selector("unix", "uid", "1"))
        nothing_by_id = entry_rows.list_entries(s, spiffe_id="spiffe://example.org/none")
        count = entry_rows.count_entries(s)

    # Ordered by SPIFFE ID, then creation.
    assert [e.id for e in everything] == [api.id, web.id, web_on_node.id]
    assert {e.id for e in by_spiffe} == {web.id, web_on_node.id}
    assert {e.id for e in by_parent} == {api.id, web_on_node.id}
    assert [e.id for e in by_both] == [web_on_node.id]
    assert {e.id for e in by_selector} == {web.id, web_on_node.id}
    assert [e.id for e in by_uid] == [api.id]
    assert nothing == []
    assert nothing_by_id == []
    assert count == 3


def test_revisions_strictly_increase_across_create_and_update(db: Database) -> None:
    seen = []
    first = create(db, valid("spiffe://example.org/a"))
    seen.append(first.revision)
    second = create(db, valid("spiffe://example.org/b"))
    seen.append(second.revision)
    for i in range(3):
        with db.transaction() as s:
            updated = entry_rows.update_entry(
                s,
                entry_id=first.id,
                entry=valid("spiffe://example.org/a", hint=f"v{i}"),
                now=T0 + timedelta(minutes=i + 1),
            )
        seen.append(updated.revision)
    third = create(db, valid("spiffe://example.org/c"))
    seen.append(third.revision)

    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)
    assert seen[0] >= 1
    assert counter(db) == seen[-1]


def test_update_replaces_fields_and_keeps_identity(db: Database) -> None:
    created = create(db, valid("spiffe://example.org/a", "unix:uid:1", "unix:gid:2"))
    later = T0 + timedelta(hours=1)

    with db.transaction() as s:
        updated = entry_rows.update_entry(
            s,
            entry_id=created.id,
            entry=valid(
                "spiffe://example.org/b",
                "k8s:ns:a",
                "k8s:sa:b",
                "unix:uid:3",
                parent_id=NODE,
                x509_svid_ttl=60,
                dns_names=("b.example.org",),
            ),
            now=later,
        )
    with db.transaction() as s:
        fetched = entry_rows.get_entry(s, entry_id=created.id)
        selector_rows = s.scalars(
            select(EntrySelectorRow).where(EntrySelectorRow.entry_id == created.id)
        ).all()

    assert fetched == updated
    assert fetched.id == created.id
    assert fetched.spiffe_id == "spiffe://example.org/b"
    assert fetched.parent_id == NODE
    assert [str(x) for x in fetched.selectors] == ["k8s:ns:a", "k8s:sa:b", "unix:uid:3"]
    assert fetched.x509_svid_ttl == 60
    assert fetched.dns_names == ("b.example.org",)
    assert fetched.created_at == T0
    assert fetched.updated_at == later
    assert fetched.revision > created.revision
    assert len(selector_rows) == 3


def test_update_to_fewer_selectors(db: Database) -> None:
    created = create(db, valid("spiffe://example.org/a", "unix:uid:1", "unix:gid:2", "k8s:sa:x"))
    with db.transaction() as s:
        entry_rows.update_entry(
            s, entry_id=created.id, entry=valid("spiffe://example.org/a", "unix:uid:9"), now=T0
        )
    with db.transaction() as s:
        assert [str(x) for x in entry_rows.get_entry(s, entry_id=created.id).selectors] == [
            "unix:uid:9"
        ]
        assert s.scalar(select(func.count()).select_from(EntrySelectorRow)) == 1


def test_update_to_itself_is_not_a_conflict(db: Database) -> None:
    entry = valid("spiffe://example.org/a", "unix:uid:1")
    created = create(db, entry)
    with db.transaction() as s:
        updated = entry_rows.update_entry(s, entry_id=created.id, entry=entry, now=T0)
    assert updated.selectors == created.selectors
    assert updated.revision > created.revision


def test_delete_removes_entry_and_selectors(db: Database) -> None:
    keep = create(db, valid("spiffe://example.org/keep", "unix:uid:1"))
    gone = create(db, valid("spiffe://example.org/gone", "unix:uid:2", "unix:gid:2"))

    with db.transaction() as s:
        deleted = entry_rows.delete_entry(s, entry_id=gone.id)

    assert deleted == gone
    assert [e.id for e in all_entries(db)] == [keep.id]
    with db.transaction() as s:
        ids = set(s.scalars(select(EntrySelectorRow.entry_id)))
        with pytest.raises(NotFoundError):
            entry_rows.get_entry(s, entry_id=gone.id)
    assert ids == {keep.id}


@pytest.mark.parametrize("operation", ["get", "update", "delete"])
def test_unknown_id_is_not_found(db: Database, operation: str) -> None:
    existing = create(db, valid())
    before = all_entries(db)
    missing = "00000000-0000-0000-0000-000000000000"

    def attempt() -> None:
        with db.transaction() as s:
            if operation == "get":
                entry_rows.get_entry(s, entry_id=missing)
            elif operation == "update":
                entry_rows.update_entry(s, entry_id=missing, entry=valid(), now=T0)
            else:
                entry_rows.delete_entry(s, entry_id=missing)

    with pytest.raises(NotFoundError) as raised:
        attempt()

    assert raised.value.field == "id"
    assert missing in raised.value.message
    assert all_entries(db) == before
    assert before[0].id == existing.id


@pytest.mark.parametrize(
    "selectors",
    [
        ("unix:uid:1", "k8s:sa:web"),
        ("k8s:sa:web", "unix:uid:1"),
        ("k8s:sa:web", "unix:uid:1", "unix:uid:1"),
    ],
)
def test_duplicate_entry_is_a_conflict_and_changes_nothing(
    db: Database, selectors: tuple[str, ...]
) -> None:
    original = create(db, valid("spiffe://example.org/web", "unix:uid:1", "k8s:sa:web"))
    before, revision = all_entries(db), counter(db)

    with pytest.raises(ConflictError) as raised:
        create(db, valid("spiffe://example.org/web", *selectors), now=T0 + timedelta(hours=1))

    assert original.id in raised.value.message
    assert raised.value.code == "conflict"
    assert all_entries(db) == before
    assert counter(db) == revision


def test_same_selectors_under_another_id_or_parent_are_not_duplicates(db: Database) -> None:
    create(db, valid("spiffe://example.org/web", "unix:uid:1"))
    create(db, valid("spiffe://example.org/api", "unix:uid:1"))
    create(db, valid("spiffe://example.org/web", "unix:uid:1", parent_id=NODE))
    create(db, valid("spiffe://example.org/web", "unix:uid:1", "unix:gid:1"))
    assert len(all_entries(db)) == 4


def test_update_into_a_duplicate_is_a_conflict_and_changes_nothing(db: Database) -> None:
    create(db, valid("spiffe://example.org/web", "unix:uid:1"))
    other = create(db, valid("spiffe://example.org/web", "unix:uid:2"))
    before, revision = all_entries(db), counter(db)

    with pytest.raises(ConflictError), db.transaction() as s:
        entry_rows.update_entry(
            s, entry_id=other.id, entry=valid("spiffe://example.org/web", "unix:uid:1"), now=T0
        )

    assert all_entries(db) == before
    assert counter(db) == revision


def test_a_transaction_that_raises_stores_nothing(db: Database) -> None:
    class Boom(Exception):
        pass

    def failing_unit_of_work() -> None:
        with db.transaction() as s:
            entry_rows.create_entry(s, entry=valid("spiffe://example.org/a"), now=T0)
            tokens.create_token(s, token_id="t1", token="secret-1", expires_at=T0, now=T0)
            agents.save_agent(
                s,
                agent=agents.AttestedAgent(NODE, "join_token", "ab", T0, banned=False),
                now=T0,
            )
            raise Boom

    with pytest.raises(Boom):
        failing_unit_of_work()

    assert all_entries(db) == []
    assert counter(db) == 0
    with db.transaction() as s:
        assert s.scalars(select(JoinTokenRow)).all() == []
        assert agents.list_agents(s) == []


def test_database_errors_become_store_errors_and_roll_back(db: Database) -> None:
    with db.transaction() as s:
        tokens.create_token(s, token_id="same", token="one", expires_at=T0, now=T0)

    def reuse_id() -> None:
        with db.transaction() as s:
            tokens.create_token(s, token_id="fresh", token="two", expires_at=T0, now=T0)
            tokens.create_token(s, token_id="same", token="three", expires_at=T0, now=T0)

    with pytest.raises(StoreError) as raised:
        reuse_id()

    assert db.display_url in str(raised.value)
    with db.transaction() as s:
        assert list(s.scalars(select(JoinTokenRow.id))) == ["same"]


# -- join tokens ----------------------------------------------------------------------


def test_join_tokens_are_stored_only_as_sha256(db: Database) -> None:
    plaintext = "jt-Zq8v2-very-secret-token-value"
    with db.transaction() as s:
        stored = tokens.create_token(
            s, token_id="tok-1", token=plaintext, expires_at=T0 + timedelta(minutes=10), now=T0
        )
    assert stored == tokens.JoinToken(id="tok-1", expires_at=T0 + timedelta(minutes=10))

    with db.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text("SELECT * FROM join_tokens"))]
    assert len(rows) == 1
    assert all(plaintext not in str(value) for value in rows[0])
    assert hashlib.sha256(plaintext.encode()).hexdigest() in rows[0]
    assert tokens.token_digest(plaintext) == hashlib.sha256(plaintext.encode()).hexdigest()


def test_join_token_is_consumed_once(db: Database) -> None:
    expires = T0 + timedelta(minutes=10)
    with db.transaction() as s:
        tokens.create_token(s, token_id="tok-1", token="s3cret", expires_at=expires, now=T0)

    with db.transaction() as s:
        wrong = tokens.consume_token(s, token="not-it", now=T0)
        first = tokens.consume_token(s, token="s3cret", now=T0 + timedelta(minutes=1))
    with db.transaction() as s:
        second = tokens.consume_token(s, token="s3cret", now=T0 + timedelta(minutes=2))
        left = s.scalars(select(JoinTokenRow)).all()

    assert wrong is None
    assert first == tokens.JoinToken(id="tok-1", expires_at=expires)
    assert second is None
    assert left == []


@pytest.mark.parametrize("late", [timedelta(0), timedelta(seconds=1), timedelta(days=1)])
def test_expired_join_token_is_refused_and_purged(db: Database, late: timedelta) -> None:
    expires = T0 + timedelta(minutes=10)
    with db.transaction() as s:
        tokens.create_token(s, token_id="old", token="old-secret", expires_at=expires, now=T0)
        tokens.create_token(
            s, token_id="new", token="new-secret", expires_at=expires + timedelta(days=7), now=T0
        )

    with db.transaction() as s:
        refused = tokens.consume_token(s, token="old-secret", now=expires + late)
    with db.transaction() as s:
        remaining = list(s.scalars(select(JoinTokenRow.id)))

    assert refused is None
    assert remaining == ["new"]


# -- issued certificates --------------------------------------------------------------


def cert(serial: str, spiffe_id: str, not_after: datetime, kind: str = "x509-svid") -> Any:
    return issued.IssuedCertificate(
        serial=serial,
        kind=kind,
        spiffe_id=spiffe_id,
        issued_to="admin-api",
        ca_slot_id="slot-1" if kind == "x509-svid" else None,
        not_before=not_after - timedelta(hours=1),
        not_after=not_after,
    )


def test_issued_certificates_are_recorded_listed_and_pruned(db: Database) -> None:
    a = cert("0a", "spiffe://example.org/a", T0 + timedelta(hours=1))
    b = cert("0b", "spiffe://example.org/b", T0 + timedelta(hours=2))
    c = cert("0c", "spiffe://example.org/a", T0 + timedelta(hours=3), kind="ca")

    with db.transaction() as s:
        issued.record_issued(s, issued=[a, b])
    with db.connection() as conn:
        issued.record_issued(conn, issued=[c])

    with db.transaction() as s:
        assert issued.list_issued(s) == [a, b, c]
        assert issued.list_issued(s, spiffe_id="spiffe://example.org/a") == [a, c]
        pruned = issued.prune_issued(s, expired_before=T0 + timedelta(hours=2, minutes=30))
    with db.transaction() as s:
        left = issued.list_issued(s)

    assert pruned == 2
    assert left == [c]
    assert left[0].not_after.tzinfo is not None


def test_prune_keeps_certificates_expiring_at_the_cutoff(db: Database) -> None:
    a = cert("01", "spiffe://example.org/a", T0)
    with db.transaction() as s:
        issued.record_issued(s, issued=[a])
        assert issued.prune_issued(s, expired_before=T0) == 0
        assert issued.list_issued(s) == [a]


# -- attested agents ------------------------------------------------------------------


def test_attested_agents_are_saved_and_updated(db: Database) -> None:
    node1 = agents.AttestedAgent(NODE, "join_token", "aa01", T0 + timedelta(hours=1), False)
    node2 = agents.AttestedAgent(
        "spiffe://example.org/agent/node-0", "join_token", "bb02", T0 + timedelta(hours=2), False
    )
    with db.transaction() as s:
        agents.save_agent(s, agent=node1, now=T0)
        agents.save_agent(s, agent=node2, now=T0)

    renewed = replace(node1, certificate_serial="aa02", expires_at=T0 + timedelta(hours=5))
    banned = replace(renewed, banned=True)
    with db.transaction() as s:
        agents.save_agent(s, agent=renewed, now=T0 + timedelta(minutes=30))
    with db.transaction() as s:
        agents.save_agent(s, agent=banned, now=T0 + timedelta(minutes=40))

    with db.transaction() as s:
        fetched = agents.get_agent(s, spiffe_id=NODE)
        missing = agents.get_agent(s, spiffe_id="spiffe://example.org/agent/none")
        listed = agents.list_agents(s)
        times = s.execute(
            text("SELECT created_at, updated_at FROM attested_agents WHERE spiffe_id = :id"),
            {"id": NODE},
        ).one()

    assert fetched == banned
    assert fetched is not None
    assert fetched.expires_at == T0 + timedelta(hours=5)
    assert missing is None
    assert listed == [node2, banned]  # ordered by SPIFFE ID
    assert times[0] != times[1]  # created once, updated since


# -- CA journal and bundle ------------------------------------------------------------


def slot(slot_id: str, state: str, created: datetime) -> journal.SlotRecord:
    return journal.SlotRecord(
        id=slot_id,
        state=state,
        key_type="ec-p256",
        certificate_pem="-----BEGIN CERTIFICATE-----\n...\n",
        upstream_chain_pem="",
        jwt_key_id=f"kid-{slot_id}",
        jwt_public_key_pem="-----BEGIN PUBLIC KEY-----\n...\n",
        not_before=created,
        not_after=created + timedelta(days=1),
        created_at=created,
        activated_at=None,
        retired_at=None,
    )


def test_journal_slots_saved_updated_deleted(db: Database) -> None:
    first = slot("s1", "active", T0)
    second = slot("s2", "prepared", T0 + timedelta(hours=12))
    with db.transaction() as s:
        journal.save_slot(s, record=second)
        journal.save_slot(s, record=first)

    retired = replace(first, state="old", retired_at=T0 + timedelta(hours=20))
    with db.transaction() as s:
        journal.save_slot(s, record=retired)
    with db.transaction() as s:
        assert journal.list_slots(s) == [retired, second]  # ordered by creation
        journal.delete_slot(s, slot_id="s1")
    with db.transaction() as s:
        assert journal.list_slots(s) == [second]


def test_bundle_saved_and_replaced(db: Database) -> None:
    with db.transaction() as s:
        assert journal.load_bundle(s, trust_domain="example.org") is None
        journal.save_bundle(
            s,
            bundle=journal.StoredBundle("example.org", "PEM1", "[]", 1, T0),
        )
    newer = journal.StoredBundle("example.org", "PEM1PEM2", '[{"kid": "k"}]', 2, T0 + timedelta(1))
    with db.transaction() as s:
        journal.save_bundle(s, bundle=newer)
    with db.transaction() as s:
        assert journal.load_bundle(s, trust_domain="example.org") == newer
        assert journal.load_bundle(s, trust_domain="other.org") is None


# -- migrations -----------------------------------------------------------------------

EXPECTED_TABLES = {
    "attested_agents",
    "ca_slots",
    "counters",
    "entries",
    "entry_selectors",
    "issued_certificates",
    "join_tokens",
    "trust_bundles",
    VERSION_TABLE,
}


def test_migrate_is_idempotent_and_creates_the_schema(db: Database) -> None:
    create(db, valid())
    db.migrate()  # the fixture migrated once already
    db.migrate()

    assert set(inspect(db.engine).get_table_names()) == EXPECTED_TABLES
    with db.engine.connect() as conn:
        versions = conn.execute(
            select(column("version_num")).select_from(table(VERSION_TABLE))
        ).all()
        counters = conn.execute(text("SELECT name, value FROM counters")).all()
    assert [tuple(v) for v in versions] == [("0001",)]
    assert [tuple(c) for c in counters] == [("entries", 1)]
    assert len(all_entries(db)) == 1


def test_schema_columns(db: Database) -> None:
    inspector = inspect(db.engine)
    columns = {c["name"] for c in inspector.get_columns("join_tokens")}
    assert columns == {"id", "token_sha256", "expires_at", "created_at"}
    entry_columns = {c["name"] for c in inspector.get_columns("entries")}
    assert {"spiffe_id", "parent_id", "revision", "expires_at"} <= entry_columns
    indexes = {i["name"] for i in inspector.get_indexes("entry_selectors")}
    assert "ix_entry_selectors_selector" in indexes


# -- opening a database ---------------------------------------------------------------


def test_database_url_that_is_not_a_url() -> None:
    with pytest.raises(StoreError) as raised:
        Database("not a url")
    assert raised.value.field == "database_url"
    message = str(raised.value)
    assert message.startswith("database_url: not a database URL")
    assert "sqlite:///" in message
    assert "postgresql+psycopg://" in message


def test_database_url_with_unknown_driver() -> None:
    with pytest.raises(StoreError) as raised:
        Database("mysql://u:secret@127.0.0.1/x")
    assert raised.value.field == "database_url"
    assert "no driver for 'mysql'" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_unreachable_postgresql_names_the_url_without_the_password() -> None:
    db = Database("postgresql://u:secret@127.0.0.1:1/x")
    try:
        with pytest.raises(StoreError) as raised:
            db.migrate()
    finally:
        db.dispose()
    message = str(raised.value)
    assert raised.value.field == "database_url"
    assert message.startswith(
        "database_url: cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/x"
    )
    assert "check that the server is up" in message
    assert "host, port, user, database" in message
    assert "secret" not in message
    assert db.display_url == "postgresql+psycopg://u:***@127.0.0.1:1/x"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:secret@127.0.0.1:abc/x",  # port is not a number
        "postgresql//u:secret@127.0.0.1/x",  # missing ':' after the scheme
        "u:secret@127.0.0.1:5432/x",  # no scheme at all
    ],
)
def test_malformed_url_is_a_store_error_without_the_password(url: str) -> None:
    with pytest.raises(StoreError) as raised:
        Database(url)
    assert raised.value.field == "database_url"
    assert "secret" not in str(raised.value)


def test_sqlite_in_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    try:
        with pytest.raises(StoreError) as raised:
            db.migrate()
    finally:
        db.dispose()
    assert raised.value.field == "database_url"
    assert "cannot connect to sqlite:///" in str(raised.value)
