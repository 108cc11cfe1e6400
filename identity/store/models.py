"""Table definitions of the identity datastore (the migrations are the source of the schema)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "AttestedAgentRow",
    "Base",
    "CASlotRow",
    "Counter",
    "EntryRow",
    "EntrySelectorRow",
    "IssuedCertificateRow",
    "JoinTokenRow",
    "TrustBundleRow",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class EntryRow(Base):
    __tablename__ = "entries"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(String(2048), index=True)
    parent_id: Mapped[str] = mapped_column(String(2048), index=True)
    x509_svid_ttl: Mapped[int | None] = mapped_column(Integer)
    jwt_svid_ttl: Mapped[int | None] = mapped_column(Integer)
    dns_names: Mapped[str] = mapped_column(Text)  # JSON list
    hint: Mapped[str] = mapped_column(String(256))
    admin: Mapped[bool] = mapped_column(Boolean)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revision: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    selectors: Mapped[list[EntrySelectorRow]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="EntrySelectorRow.position"
    )


class EntrySelectorRow(Base):
    __tablename__ = "entry_selectors"
    entry_id: Mapped[str] = mapped_column(
        ForeignKey("entries.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(128))
    value: Mapped[str] = mapped_column(String(1024))
    __table_args__ = (Index("ix_entry_selectors_selector", "type", "key", "value"),)


class JoinTokenRow(Base):
    __tablename__ = "join_tokens"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AttestedAgentRow(Base):
    __tablename__ = "attested_agents"
    spiffe_id: Mapped[str] = mapped_column(String(2048), primary_key=True)
    attestation_type: Mapped[str] = mapped_column(String(64))
    certificate_serial: Mapped[str] = mapped_column(String(40))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    banned: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class IssuedCertificateRow(Base):
    __tablename__ = "issued_certificates"
    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # hex
    kind: Mapped[str] = mapped_column(String(16))  # x509-svid | ca
    spiffe_id: Mapped[str] = mapped_column(String(2048), index=True)
    issued_to: Mapped[str] = mapped_column(String(2048))
    ca_slot_id: Mapped[str | None] = mapped_column(String(36))
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class CASlotRow(Base):
    """The CA journal: one row per signing authority, PREPARED → ACTIVE → OLD, then pruned."""

    __tablename__ = "ca_slots"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    key_type: Mapped[str] = mapped_column(String(16))
    certificate_pem: Mapped[str] = mapped_column(Text)
    upstream_chain_pem: Mapped[str] = mapped_column(Text)  # issuers of certificate, below the root
    jwt_key_id: Mapped[str] = mapped_column(String(64), unique=True)
    jwt_public_key_pem: Mapped[str] = mapped_column(Text)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TrustBundleRow(Base):
    __tablename__ = "trust_bundles"
    trust_domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    x509_authorities_pem: Mapped[str] = mapped_column(Text)
    jwt_authorities_json: Mapped[str] = mapped_column(Text)  # JWKS "keys" list
    sequence: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
