"""Alembic's environment for the transcript database.

`dialogue.schema` runs it with a connection it has locked (`config.attributes["connection"]`); run by hand
(`alembic revision --autogenerate -m …` from the repository, see alembic.ini) it opens the configured database.
Every revision is rendered in batch mode, so SQLite's limited ALTER TABLE is worked around by copying the table.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import dialogue.store  # noqa: F401 - registers the tables (and memory.persona's) in SQLModel.metadata


def run(connection) -> None:
    applied = context.config.attributes.get("applied")

    def record(ctx, step, heads, run_args) -> None:
        if applied is not None and step.is_upgrade:
            applied.append(step.up_revision_id)

    context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True,
                      on_version_apply=record)
    with context.begin_transaction():
        context.run_migrations()


def configured_url() -> str:
    from dialogue.settings import Settings

    return context.config.get_main_option("sqlalchemy.url") or Settings().db_url


if context.is_offline_mode():  # `alembic upgrade head --sql`: the DDL as text, for a DBA to read or run
    context.configure(url=configured_url(), target_metadata=SQLModel.metadata, render_as_batch=True,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (given := context.config.attributes.get("connection")) is not None:
    run(given)
else:
    from sqlalchemy import create_engine

    engine = create_engine(configured_url())
    with engine.begin() as connection:
        run(connection)
    engine.dispose()
