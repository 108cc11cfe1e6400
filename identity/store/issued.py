"""The record of every certificate the CA signed (serial, SPIFFE ID, to whom, until when)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from identity.store.models import IssuedCertificateRow

__all__ = ["IssuedCertificate", "list_issued", "prune_issued", "record_issued"]


@dataclass(slots=True, frozen=True)
class IssuedCertificate:
    serial: str
    kind: str
    spiffe_id: str
    issued_to: str
    ca_slot_id: str | None
    not_before: datetime
    not_after: datetime


def record_issued(session: Session, *, issued: IssuedCertificate) -> None:
    # Core insert: this runs once per signature and the ORM unit of work costs more than the insert.
    session.execute(
        insert(IssuedCertificateRow).values(
            serial=issued.serial,
            kind=issued.kind,
            spiffe_id=issued.spiffe_id,
            issued_to=issued.issued_to,
            ca_slot_id=issued.ca_slot_id,
            not_before=issued.not_before,
            not_after=issued.not_after,
        )
    )


def list_issued(session: Session, *, spiffe_id: str | None = None) -> list[IssuedCertificate]:
    query = select(IssuedCertificateRow).order_by(IssuedCertificateRow.not_before)
    if spiffe_id is not None:
        query = query.where(IssuedCertificateRow.spiffe_id == spiffe_id)
    return [
        IssuedCertificate(
            serial=r.serial,
            kind=r.kind,
            spiffe_id=r.spiffe_id,
            issued_to=r.issued_to,
            ca_slot_id=r.ca_slot_id,
            not_before=r.not_before,
            not_after=r.not_after,
        )
        for r in session.scalars(query)
    ]


def prune_issued(session: Session, *, expired_before: datetime) -> int:
    result = session.execute(
        delete(IssuedCertificateRow).where(IssuedCertificateRow.not_after < expired_before)
    )
    return int(getattr(result, "rowcount", 0) or 0)
