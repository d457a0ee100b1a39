"""`rapport users export|delete`: everything stored about one user, as JSON, or its erasure."""

from __future__ import annotations

import click

from bot.cli.common import emit_json, services


@click.group("users")
def users_group() -> None:
    """One user's data: export it or erase it."""


@users_group.command("export")
@click.argument("user_id")
def export_user(user_id: str) -> None:
    """Print everything stored about USER_ID (persona, memories, conversations, turns, ratings) as JSON."""
    from memory.text import validate_id

    validate_id(user_id, "user id")
    with services() as opened:
        emit_json(opened.export_user(user_id))


@users_group.command("delete")
@click.argument("user_id")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def delete_user(user_id: str, yes: bool) -> None:
    """Erase everything stored about USER_ID: memories, persona, transcripts and ratings."""
    from memory.text import validate_id

    validate_id(user_id, "user id")
    if not yes and click.get_text_stream("stdin").isatty():
        click.confirm(f"Erase everything about {user_id}?", abort=True)
    with services() as opened:
        counts = opened.erase_user(user_id)
    click.echo(f"erased {user_id}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
