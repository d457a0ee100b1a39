"""Human handoff (a conversation's status, agent turns' `reply_to`), claimed inbound events, personas.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="bot"))
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("reply_to", sa.String(64), nullable=True))
    op.create_table(
        "inbound_events",
        sa.Column("channel", sa.String(32), primary_key=True),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("received_at", WHEN, nullable=False),
    )
    op.create_table(
        "personas",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("personas")
    op.drop_table("inbound_events")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("reply_to")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("status")
