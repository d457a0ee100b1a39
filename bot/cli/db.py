"""`rapport db upgrade`: the transcript database's schema migrations (every process also runs them at start)."""

from __future__ import annotations

import click

from bot.cli.common import emit_json, load_settings


@click.group("db")
def db_group() -> None:
    """The transcript database (SQLite in $RAPPORT_HOME, or RAPPORT_DATABASE_URL)."""


@db_group.command("upgrade")
@click.option("--json", "as_json", is_flag=True, help='print {"applied": [...], "revision": ...}')
def db_upgrade(as_json: bool) -> None:
    """Apply the schema migrations this database has not seen (under a lock; safe beside running processes)."""
    from dialogue.schema import head
    from dialogue.store import TranscriptStore

    settings = load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    store = TranscriptStore(settings.db_url)  # opening the store is the upgrade
    store.close()
    revision = head()
    if as_json:
        emit_json({"applied": store.applied, "revision": revision})
    elif store.applied:
        click.echo(f"applied {', '.join(store.applied)}; the database is at revision {revision}")
    else:
        click.echo(f"the database is up to date (revision {revision})")
