"""Registration entry rows. Functions take a session and never commit: the caller owns the transaction."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from identity.entries import Entry, ValidEntry
from identity.errors import ConflictError, NotFoundError
from identity.selectors import Selector
from identity.store.models import Counter, EntryRow, EntrySelectorRow

__all__ = [
    "count_entries",
    "create_entry",
    "current_revision",
    "delete_entry",
    "get_entry",
    "list_entries",
    "next_revision",
    "update_entry",
]


def next_revision(session: Session, *, name: str = "entries") -> int:
    """Take the next value of a monotonic counter; the row lock orders concurrent writers."""
    value = session.execute(
        update(Counter)
        .where(Counter.name == name)
        .values(value=Counter.value + 1)
        .returning(Counter.value)
    ).scalar_one()
    return int(value)


def current_revision(session: Session, *, name: str = "entries") -> int:
    """The revision of the newest change (create, update or delete) to entries."""
    return int(session.execute(select(Counter.value).where(Counter.name == name)).scalar_one())


def create_entry(session: Session, *, entry: ValidEntry, now: datetime) -> Entry:
    _refuse_duplicate(session, entry=entry, except_id=None)
    row = EntryRow(id=str(uuid.uuid4()), created_at=now)
    _fill(row, entry, revision=next_revision(session), now=now)
    session.add(row)
    session.flush()
    return _to_entry(row)


def update_entry(session: Session, *, entry_id: str, entry: ValidEntry, now: datetime) -> Entry:
    row = _row(session, entry_id)
    _refuse_duplicate(session, entry=entry, except_id=entry_id)
    _fill(row, entry, revision=next_revision(session), now=now)
    session.flush()
    return _to_entry(row)


def delete_entry(session: Session, *, entry_id: str) -> Entry:
    row = _row(session, entry_id)
    entry = _to_entry(row)
    session.delete(row)
    # A deletion moves the counter too, so "has anything changed since revision N" is one read.
    next_revision(session)
    session.flush()
    return entry


def get_entry(session: Session, *, entry_id: str) -> Entry:
    return _to_entry(_row(session, entry_id))


def list_entries(
    session: Session,
    *,
    spiffe_id: str | None = None,
    parent_id: str | None = None,
    selector: Selector | None = None,
) -> list[Entry]:
    query = select(EntryRow).order_by(EntryRow.spiffe_id, EntryRow.created_at)
    if spiffe_id is not None:
        query = query.where(EntryRow.spiffe_id == spiffe_id)
    if parent_id is not None:
        query = query.where(EntryRow.parent_id == parent_id)
    if selector is not None:
        query = query.where(
            EntryRow.selectors.any(
                (EntrySelectorRow.type == selector.type)
                & (EntrySelectorRow.key == selector.key)
                & (EntrySelectorRow.value == selector.value)
            )
        )
    return [_to_entry(row) for row in session.scalars(query)]


def count_entries(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(EntryRow)) or 0)


def _row(session: Session, entry_id: str) -> EntryRow:
    row = session.get(EntryRow, entry_id)
    if row is None:
        raise NotFoundError(f"no registration entry with id {entry_id!r}", field="id")
    return row


def _refuse_duplicate(session: Session, *, entry: ValidEntry, except_id: str | None) -> None:
    # Same SPIFFE ID, parent and selector set would make two entries for one workload.
    for other in list_entries(
        session, spiffe_id=str(entry.spiffe_id), parent_id=str(entry.parent_id)
    ):
        if other.id != except_id and other.selectors == entry.selectors:
            raise ConflictError(
                f"entry {other.id} already gives {entry.spiffe_id} to these selectors "
                f"under parent {entry.parent_id}; update it instead"
            )


def _fill(row: EntryRow, entry: ValidEntry, *, revision: int, now: datetime) -> None:
    row.spiffe_id = str(entry.spiffe_id)
    row.parent_id = str(entry.parent_id)
    row.x509_svid_ttl = entry.x509_svid_ttl
    row.jwt_svid_ttl = entry.jwt_svid_ttl
    row.dns_names = json.dumps(list(entry.dns_names))
    row.hint = entry.hint
    row.admin = entry.admin
    row.expires_at = entry.expires_at
    row.revision = revision
    row.updated_at = now
    row.selectors = [
        EntrySelectorRow(position=i, type=s.type, key=s.key, value=s.value)
        for i, s in enumerate(entry.selectors)
    ]


def _to_entry(row: EntryRow) -> Entry:
    return Entry(
        id=row.id,
        spiffe_id=row.spiffe_id,
        parent_id=row.parent_id,
        selectors=tuple(Selector(s.type, s.key, s.value) for s in row.selectors),
        x509_svid_ttl=row.x509_svid_ttl,
        jwt_svid_ttl=row.jwt_svid_ttl,
        dns_names=tuple(json.loads(row.dns_names)),
        hint=row.hint,
        admin=row.admin,
        expires_at=row.expires_at,
        revision=row.revision,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
