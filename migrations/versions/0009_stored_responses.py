"""stored responses of inference request ids; usage records of later attempts ("<id>#<n>")

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('stored_responses',
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('body_hash', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('response', sa.LargeBinary(), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('org_id', 'request_id', name=op.f('pk_stored_responses'))
    )
    op.create_index(op.f('ix_stored_responses_expires_at'), 'stored_responses', ['expires_at'], unique=False)
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.alter_column('request_id', existing_type=sa.String(length=128), type_=sa.String(length=160), existing_nullable=False)


def downgrade() -> None:
    # A record of a later attempt ("<id>#<n>") may not fit the old column: refuse rather than cut or drop
    # billing records.
    longest = op.get_bind().execute(sa.text("SELECT max(length(request_id)) FROM usage_records")).scalar()
    if longest is not None and longest > 128:
        raise RuntimeError("usage_records holds request ids longer than 128 characters (later attempts); "
                           "they would not fit the column of revision 0008")
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.alter_column('request_id', existing_type=sa.String(length=160), type_=sa.String(length=128), existing_nullable=False)
    op.drop_index(op.f('ix_stored_responses_expires_at'), table_name='stored_responses')
    op.drop_table('stored_responses')
