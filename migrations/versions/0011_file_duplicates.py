"""files.duplicates: the upload's exact and near-duplicate report, shown on the file object

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 20:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('duplicates', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_column('duplicates')
