"""job metadata (OpenAI's key-value pairs on a fine-tuning job)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 08:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('metadata', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'metadata')
