"""audit schema

Revision ID: a0001
Revises:
Times are microseconds since the epoch (UTC). On PostgreSQL, decisions and
dry_run_flips are partitioned by range of ts; the shipper creates one partition per
UTC day before it inserts into it, and retention drops whole partitions.

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = 'a0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('decisions',
    sa.Column('ts', sa.BigInteger(), nullable=False),
    sa.Column('decision_id', sa.String(length=64), nullable=False),
    sa.Column('allowed', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('engine', sa.String(length=16), nullable=False),
    sa.Column('status', sa.Integer(), nullable=True),
    sa.Column('policy', sa.String(length=512), nullable=True),
    sa.Column('rule', sa.Integer(), nullable=True),
    sa.Column('policy_id', sa.String(length=600), nullable=True),
    sa.Column('policy_set_version', sa.String(length=64), nullable=True),
    sa.Column('latency_us', sa.Integer(), nullable=True),
    sa.Column('source_principal', sa.String(length=2048), nullable=True),
    sa.Column('source_namespace', sa.String(length=253), nullable=True),
    sa.Column('source_ip', sa.String(length=64), nullable=True),
    sa.Column('request_principal', sa.String(length=2048), nullable=True),
    sa.Column('destination_namespace', sa.String(length=253), nullable=True),
    sa.Column('destination_workload', sa.String(length=253), nullable=True),
    sa.Column('destination_service', sa.String(length=253), nullable=True),
    sa.Column('destination_port', sa.Integer(), nullable=True),
    sa.Column('sni', sa.String(length=253), nullable=True),
    sa.Column('method', sa.String(length=32), nullable=True),
    sa.Column('host', sa.String(length=1024), nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('dry_run_flip', sa.Boolean(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('request', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('ts', 'decision_id'),
    postgresql_partition_by='RANGE (ts)',
    )
    op.create_index('ix_decisions_decision_id', 'decisions', ['decision_id'])
    op.create_index('ix_decisions_allowed_ts', 'decisions', ['allowed', 'ts', 'decision_id'])
    op.create_index('ix_decisions_principal_ts', 'decisions', ['source_principal', 'ts', 'decision_id'])
    op.create_index('ix_decisions_policy_ts', 'decisions', ['policy', 'ts', 'decision_id'])
    op.create_index(
        'ix_decisions_destination_ts',
        'decisions',
        ['destination_namespace', 'destination_workload', 'ts', 'decision_id'],
    )
    op.create_table('dry_run_flips',
    sa.Column('ts', sa.BigInteger(), nullable=False),
    sa.Column('decision_id', sa.String(length=64), nullable=False),
    sa.Column('engine', sa.String(length=16), nullable=False),
    sa.Column('policy', sa.String(length=512), nullable=False),
    sa.Column('to', sa.String(length=8), nullable=False),
    sa.PrimaryKeyConstraint('ts', 'decision_id', 'engine', 'policy'),
    postgresql_partition_by='RANGE (ts)',
    )
    op.create_index('ix_dry_run_flips_policy_ts', 'dry_run_flips', ['policy', 'ts'])
    op.create_table('decision_minutes',
    sa.Column('minute_us', sa.BigInteger(), nullable=False),
    sa.Column('allowed', sa.Boolean(), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('minute_us', 'allowed'),
    )
    op.create_table('decision_hours',
    sa.Column('hour_us', sa.BigInteger(), nullable=False),
    sa.Column('allowed', sa.Boolean(), nullable=False),
    sa.Column('engine', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('policy', sa.String(length=512), nullable=False),
    sa.Column('policy_id', sa.String(length=600), nullable=False),
    sa.Column('source_principal', sa.String(length=2048), nullable=False),
    sa.Column('source_namespace', sa.String(length=253), nullable=False),
    sa.Column('destination_namespace', sa.String(length=253), nullable=False),
    sa.Column('destination_workload', sa.String(length=253), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint(
        'hour_us', 'allowed', 'engine', 'reason', 'policy', 'policy_id',
        'source_principal', 'source_namespace', 'destination_namespace',
        'destination_workload',
    ),
    )
    op.create_table('policy_sets',
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('first_served_us', sa.BigInteger(), nullable=False),
    sa.Column('files', sa.Text(), nullable=False),
    sa.Column('settings', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('version'),
    )
    op.create_table('spool_positions',
    sa.Column('spool_id', sa.String(length=64), nullable=False),
    sa.Column('segment', sa.BigInteger(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('records', sa.BigInteger(), nullable=False),
    sa.Column('updated_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('spool_id'),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('spool_positions')
    op.drop_table('policy_sets')
    op.drop_table('decision_hours')
    op.drop_table('decision_minutes')
    op.drop_index('ix_dry_run_flips_policy_ts', table_name='dry_run_flips')
    op.drop_table('dry_run_flips')
    for name in (
        'ix_decisions_destination_ts',
        'ix_decisions_policy_ts',
        'ix_decisions_principal_ts',
        'ix_decisions_allowed_ts',
        'ix_decisions_decision_id',
    ):
        op.drop_index(name, table_name='decisions')
    op.drop_table('decisions')
