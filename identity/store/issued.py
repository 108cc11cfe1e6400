"""The record of every certificate the CA signed (serial, SPIFFE ID, to whom, until when)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, insert, select
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


# Built once: this runs for every signature, and building the statement per call (let
# alone the ORM unit of work) costs more than the insert itself.
_INSERT = insert(IssuedCertificateRow)
_FIELDS = tuple(IssuedCertificate.__dataclass_fields__)


def record_issued(conn: Connection | Session, *, issued: Sequence[IssuedCertificate]) -> None:
    conn.execute(_INSERT, [{f: getattr(i, f) for f in _FIELDS} for i in issued])


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
