"""The CA journal and the stored local bundle. Functions never commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from identity.store.models import CASlotRow, TrustBundleRow

__all__ = [
    "SlotRecord",
    "StoredBundle",
    "delete_slot",
    "list_slots",
    "load_bundle",
    "save_bundle",
    "save_slot",
]


@dataclass(slots=True, frozen=True)
class SlotRecord:
    id: str
    state: str
    key_type: str
    certificate_pem: str
    upstream_chain_pem: str
    jwt_key_id: str
    jwt_public_key_pem: str
    not_before: datetime
    not_after: datetime
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None


@dataclass(slots=True, frozen=True)
class StoredBundle:
    trust_domain: str
    x509_authorities_pem: str
    jwt_authorities_json: str
    sequence: int
    updated_at: datetime


def list_slots(session: Session) -> list[SlotRecord]:
    rows = session.scalars(select(CASlotRow).order_by(CASlotRow.created_at))
    return [SlotRecord(**{c: getattr(r, c) for c in SlotRecord.__dataclass_fields__}) for r in rows]


def save_slot(session: Session, *, record: SlotRecord) -> None:
    session.merge(CASlotRow(**{c: getattr(record, c) for c in SlotRecord.__dataclass_fields__}))
    session.flush()


def delete_slot(session: Session, *, slot_id: str) -> None:
    session.execute(delete(CASlotRow).where(CASlotRow.id == slot_id))


def load_bundle(session: Session, *, trust_domain: str) -> StoredBundle | None:
    row = session.get(TrustBundleRow, trust_domain)
    if row is None:
        return None
    return StoredBundle(
        trust_domain=row.trust_domain,
        x509_authorities_pem=row.x509_authorities_pem,
        jwt_authorities_json=row.jwt_authorities_json,
        sequence=row.sequence,
        updated_at=row.updated_at,
    )


def save_bundle(session: Session, *, bundle: StoredBundle) -> None:
    session.merge(
        TrustBundleRow(
            trust_domain=bundle.trust_domain,
            x509_authorities_pem=bundle.x509_authorities_pem,
            jwt_authorities_json=bundle.jwt_authorities_json,
            sequence=bundle.sequence,
            updated_at=bundle.updated_at,
        )
    )
    session.flush()
