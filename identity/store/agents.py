"""Attested agents: which node identities the server has attested, and whether they are banned."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from identity.store.models import AttestedAgentRow

__all__ = ["AttestedAgent", "get_agent", "list_agents", "save_agent"]


@dataclass(slots=True, frozen=True)
class AttestedAgent:
    spiffe_id: str
    attestation_type: str
    certificate_serial: str
    expires_at: datetime
    banned: bool


def save_agent(session: Session, *, agent: AttestedAgent, now: datetime) -> None:
    row = session.get(AttestedAgentRow, agent.spiffe_id)
    if row is None:
        row = AttestedAgentRow(spiffe_id=agent.spiffe_id, created_at=now)
        session.add(row)
    row.attestation_type = agent.attestation_type
    row.certificate_serial = agent.certificate_serial
    row.expires_at = agent.expires_at
    row.banned = agent.banned
    row.updated_at = now
    session.flush()


def get_agent(session: Session, *, spiffe_id: str) -> AttestedAgent | None:
    row = session.get(AttestedAgentRow, spiffe_id)
    return None if row is None else _to_agent(row)


def list_agents(session: Session) -> list[AttestedAgent]:
    return [
        _to_agent(r)
        for r in session.scalars(select(AttestedAgentRow).order_by(AttestedAgentRow.spiffe_id))
    ]


def _to_agent(row: AttestedAgentRow) -> AttestedAgent:
    return AttestedAgent(
        spiffe_id=row.spiffe_id,
        attestation_type=row.attestation_type,
        certificate_serial=row.certificate_serial,
        expires_at=row.expires_at,
        banned=row.banned,
    )
