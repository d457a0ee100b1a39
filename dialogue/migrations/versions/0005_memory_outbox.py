"""The memory outbox: a recorded turn's memory write, owed until it is done (retried, including after a restart).

Revision ID: 0005
Revises: 0003
(0004 is another branch's; once both are merged this revision follows 0004.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "memory_outbox",
        sa.Column("turn_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_index("ix_memory_outbox_user_id", "memory_outbox", ["user_id"])


def downgrade() -> None:
    op.drop_table("memory_outbox")
