"""job pause and resume (OpenAI's pause/resume of a fine-tuning job)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 08:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('pause_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('jobs', sa.Column('pauses', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('jobs', 'pauses')
    op.drop_column('jobs', 'pause_requested')
