"""The memory outbox (a recorded turn's memory write, owed until it is done, retried after a restart too) and
erasure tombstones (an erasure begun and not yet finished: the user's requests are refused, the job resumes).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
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
    op.create_table(
        "erasures",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("requested_at", WHEN, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("erasures")
    op.drop_table("memory_outbox")
