"""identity schema

Revision ID: 0001
Revises: 
Times are stored as naive UTC (see identity.store.models.UTCDateTime).

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('attested_agents',
    sa.Column('spiffe_id', sa.String(length=2048), nullable=False),
    sa.Column('attestation_type', sa.String(length=64), nullable=False),
    sa.Column('certificate_serial', sa.String(length=40), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('banned', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('spiffe_id')
    )
    op.create_table('ca_slots',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('key_type', sa.String(length=16), nullable=False),
    sa.Column('certificate_pem', sa.Text(), nullable=False),
    sa.Column('upstream_chain_pem', sa.Text(), nullable=False),
    sa.Column('jwt_key_id', sa.String(length=64), nullable=False),
    sa.Column('jwt_public_key_pem', sa.Text(), nullable=False),
    sa.Column('not_before', sa.DateTime(), nullable=False),
    sa.Column('not_after', sa.DateTime(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('activated_at', sa.DateTime(), nullable=True),
    sa.Column('retired_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('jwt_key_id')
    )
    with op.batch_alter_table('ca_slots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ca_slots_state'), ['state'], unique=False)

    op.create_table('counters',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('entries',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('spiffe_id', sa.String(length=2048), nullable=False),
    sa.Column('parent_id', sa.String(length=2048), nullable=False),
    sa.Column('x509_svid_ttl', sa.Integer(), nullable=True),
    sa.Column('jwt_svid_ttl', sa.Integer(), nullable=True),
    sa.Column('dns_names', sa.Text(), nullable=False),
    sa.Column('hint', sa.String(length=256), nullable=False),
    sa.Column('admin', sa.Boolean(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('revision', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_entries_parent_id'), ['parent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_entries_revision'), ['revision'], unique=False)
        batch_op.create_index(batch_op.f('ix_entries_spiffe_id'), ['spiffe_id'], unique=False)

    op.create_table('issued_certificates',
    sa.Column('serial', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('spiffe_id', sa.String(length=2048), nullable=False),
    sa.Column('issued_to', sa.String(length=2048), nullable=False),
    sa.Column('ca_slot_id', sa.String(length=36), nullable=True),
    sa.Column('not_before', sa.DateTime(), nullable=False),
    sa.Column('not_after', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('serial')
    )
    with op.batch_alter_table('issued_certificates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_issued_certificates_not_after'), ['not_after'], unique=False)
        batch_op.create_index(batch_op.f('ix_issued_certificates_spiffe_id'), ['spiffe_id'], unique=False)

    op.create_table('join_tokens',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_sha256')
    )
    op.create_table('trust_bundles',
    sa.Column('trust_domain', sa.String(length=255), nullable=False),
    sa.Column('x509_authorities_pem', sa.Text(), nullable=False),
    sa.Column('jwt_authorities_json', sa.Text(), nullable=False),
    sa.Column('sequence', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('trust_domain')
    )
    op.bulk_insert(
        sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger)),
        [{"name": "entries", "value": 0}],
    )
    op.create_table('entry_selectors',
    sa.Column('entry_id', sa.String(length=36), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('value', sa.String(length=1024), nullable=False),
    sa.ForeignKeyConstraint(['entry_id'], ['entries.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('entry_id', 'position')
    )
    with op.batch_alter_table('entry_selectors', schema=None) as batch_op:
        batch_op.create_index('ix_entry_selectors_selector', ['type', 'key', 'value'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('entry_selectors', schema=None) as batch_op:
        batch_op.drop_index('ix_entry_selectors_selector')

    op.drop_table('entry_selectors')
    op.drop_table('trust_bundles')
    op.drop_table('join_tokens')
    with op.batch_alter_table('issued_certificates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_issued_certificates_spiffe_id'))
        batch_op.drop_index(batch_op.f('ix_issued_certificates_not_after'))

    op.drop_table('issued_certificates')
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_entries_spiffe_id'))
        batch_op.drop_index(batch_op.f('ix_entries_revision'))
        batch_op.drop_index(batch_op.f('ix_entries_parent_id'))

    op.drop_table('entries')
    op.drop_table('counters')
    with op.batch_alter_table('ca_slots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ca_slots_state'))

    op.drop_table('ca_slots')
    op.drop_table('attested_agents')
