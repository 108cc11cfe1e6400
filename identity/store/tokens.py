"""Join tokens: single-use secrets an agent presents once to attest. Only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from identity.store.models import JoinTokenRow

__all__ = ["JoinToken", "consume_token", "create_token", "token_digest"]


@dataclass(slots=True, frozen=True)
class JoinToken:
    id: str
    expires_at: datetime


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session, *, token_id: str, token: str, expires_at: datetime, now: datetime
) -> JoinToken:
    session.add(
        JoinTokenRow(
            id=token_id, token_sha256=token_digest(token), expires_at=expires_at, created_at=now
        )
    )
    session.flush()
    return JoinToken(id=token_id, expires_at=expires_at)


def consume_token(session: Session, *, token: str, now: datetime) -> JoinToken | None:
    """Delete and return the token if it exists and has not expired; expired tokens are purged."""
    row = session.scalar(
        select(JoinTokenRow)
        .where(JoinTokenRow.token_sha256 == token_digest(token))
        .with_for_update()
    )
    session.execute(delete(JoinTokenRow).where(JoinTokenRow.expires_at <= now))
    if row is None or row.expires_at <= now:
        return None
    found = JoinToken(id=row.id, expires_at=row.expires_at)
    session.delete(row)
    session.flush()
    return found
