"""Tables of the audit store (the migrations are the source of the schema).

Times are integers, microseconds since the epoch (UTC): the same arithmetic on both
backends for per-minute buckets, and on PostgreSQL the range-partitioning key of
``decisions`` and ``dry_run_flips`` (one partition per UTC day).

A decision's columns are what queries filter, sort and group on; ``detail`` (JSON)
holds the rest of the record, and ``request`` the redacted request snapshot (an Envoy
``CheckRequest`` in protobuf binary form) that ``replay`` and ``explain`` re-evaluate.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ROLLUP_DIMENSIONS",
    "AuditBase",
    "DecisionHourRow",
    "DecisionMinuteRow",
    "DecisionRow",
    "DryRunFlipRow",
    "PolicySetRow",
    "SpoolPositionRow",
]

PARTITIONED = {"postgresql_partition_by": "RANGE (ts)"}


class AuditBase(DeclarativeBase):
    pass


class DecisionRow(AuditBase):
    __tablename__ = "decisions"
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    allowed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(64))
    engine: Mapped[str] = mapped_column(String(16))
    status: Mapped[int | None] = mapped_column(Integer)
    policy: Mapped[str | None] = mapped_column(String(512))
    rule: Mapped[int | None] = mapped_column(Integer)
    policy_id: Mapped[str | None] = mapped_column(String(600))
    policy_set_version: Mapped[str | None] = mapped_column(String(64))
    latency_us: Mapped[int | None] = mapped_column(Integer)
    source_principal: Mapped[str | None] = mapped_column(String(2048))
    source_namespace: Mapped[str | None] = mapped_column(String(253))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    request_principal: Mapped[str | None] = mapped_column(String(2048))
    destination_namespace: Mapped[str | None] = mapped_column(String(253))
    destination_workload: Mapped[str | None] = mapped_column(String(253))
    destination_service: Mapped[str | None] = mapped_column(String(253))
    destination_port: Mapped[int | None] = mapped_column(Integer)
    sni: Mapped[str | None] = mapped_column(String(253))
    method: Mapped[str | None] = mapped_column(String(32))
    host: Mapped[str | None] = mapped_column(String(1024))
    path: Mapped[str | None] = mapped_column(Text)
    dry_run_flip: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text)
    request: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (
        Index("ix_decisions_decision_id", "decision_id"),
        Index("ix_decisions_allowed_ts", "allowed", "ts", "decision_id"),
        Index("ix_decisions_principal_ts", "source_principal", "ts", "decision_id"),
        Index("ix_decisions_policy_ts", "policy", "ts", "decision_id"),
        Index(
            "ix_decisions_destination_ts",
            "destination_namespace",
            "destination_workload",
            "ts",
            "decision_id",
        ),
        PARTITIONED,
    )


class DryRunFlipRow(AuditBase):
    """A dry-run policy that would have changed a decision's outcome (``to``)."""

    __tablename__ = "dry_run_flips"
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    engine: Mapped[str] = mapped_column(String(16), primary_key=True)
    policy: Mapped[str] = mapped_column(String(512), primary_key=True)
    to: Mapped[str] = mapped_column(String(8))  # deny | allow

    __table_args__ = (Index("ix_dry_run_flips_policy_ts", "policy", "ts"), PARTITIONED)


class DecisionMinuteRow(AuditBase):
    """Decisions per minute and outcome: the series of the dashboard without a scan."""

    __tablename__ = "decision_minutes"
    minute_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    allowed: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


# The columns of decisions that decision_hours counts by ("" stands for NULL: a primary
# key column cannot be NULL on PostgreSQL).
ROLLUP_DIMENSIONS = (
    "engine",
    "reason",
    "policy",
    "policy_id",
    "source_principal",
    "source_namespace",
    "destination_namespace",
    "destination_workload",
)


class DecisionHourRow(AuditBase):
    """Decisions per hour by outcome, engine, reason, policy, rule, source and
    destination: top-N tables and edges over long spans without a scan. A mesh has far
    fewer such combinations in an hour than decisions."""

    __tablename__ = "decision_hours"
    hour_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    allowed: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    engine: Mapped[str] = mapped_column(String(16), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    policy: Mapped[str] = mapped_column(String(512), primary_key=True)
    policy_id: Mapped[str] = mapped_column(String(600), primary_key=True)
    source_principal: Mapped[str] = mapped_column(String(2048), primary_key=True)
    source_namespace: Mapped[str] = mapped_column(String(253), primary_key=True)
    destination_namespace: Mapped[str] = mapped_column(String(253), primary_key=True)
    destination_workload: Mapped[str] = mapped_column(String(253), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class PolicySetRow(AuditBase):
    """The files of a served policy set and the authz settings that read them (trust
    domain, root namespace, Rego decision…), so that ``explain`` evaluates as it was."""

    __tablename__ = "policy_sets"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_served_us: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[str] = mapped_column(Text)  # JSON: [[relative path, base64 contents], ...]
    settings: Mapped[str] = mapped_column(Text)  # JSON: the authz settings it was served with


class SpoolPositionRow(AuditBase):
    """How far each spool has been shipped, committed with the rows it shipped."""

    __tablename__ = "spool_positions"
    spool_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    segment: Mapped[int] = mapped_column(BigInteger)
    offset: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)
