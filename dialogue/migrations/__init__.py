"""The transcript database's schema history, as Alembic revisions (`versions/`), run by `dialogue.schema`."""
