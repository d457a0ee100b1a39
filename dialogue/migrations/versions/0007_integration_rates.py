"""An integration's own rate limits: requests a minute for its key and for each of its users (NULL: the settings').

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.add_column(sa.Column("rate_per_minute", sa.Float, nullable=True))
        batch.add_column(sa.Column("user_rate_per_minute", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.drop_column("user_rate_per_minute")
        batch.drop_column("rate_per_minute")
