"""An admin's review of a rating for training: the rating or its correction kept out, and when it was last decided.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("ratings") as batch:
        batch.add_column(sa.Column("kept_out", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("correction_kept_out", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("reviewed_at", WHEN, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ratings") as batch:
        batch.drop_column("reviewed_at")
        batch.drop_column("correction_kept_out")
        batch.drop_column("kept_out")
