"""Integrations with hashed API keys; whether a rating's correction is trusted for training.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "integrations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("namespace", sa.String(32), nullable=False),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("revoked_at", WHEN, nullable=True),
    )
    op.create_index("ix_integrations_name", "integrations", ["name"])
    op.create_index("ix_integrations_key_hash", "integrations", ["key_hash"], unique=True)
    with op.batch_alter_table("ratings") as batch:
        batch.add_column(sa.Column("correction_trusted", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("ratings") as batch:
        batch.drop_column("correction_trusted")
    op.drop_table("integrations")
