"""base-model entitlements: per organization, a grant or a revocation of a base model overriding the
platform default (scheduler.entitlements)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 21:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('base_model_entitlements',
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('base_model', sa.String(length=512), nullable=False),
    sa.Column('entitled', sa.Boolean(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_base_model_entitlements_org_id_organizations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('org_id', 'base_model', name=op.f('pk_base_model_entitlements'))
    )


def downgrade() -> None:
    op.drop_table('base_model_entitlements')
