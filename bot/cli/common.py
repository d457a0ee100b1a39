"""What every `rapport` command module shares: settings, JSON output, and the process's services."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import click


def load_settings():
    from dialogue.settings import Settings

    try:
        return Settings()
    except ValueError as exc:  # pydantic's ValidationError: say which setting, in one line
        first = str(exc).splitlines()
        raise click.ClickException(f"invalid settings: {' '.join(first[:3])}") from None


def emit_json(data: object) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(data, ensure_ascii=False, default=str))


@contextmanager
def services(*, load_model: bool = False) -> Iterator:
    """This process's services for one command, closed afterwards; the model loads only when used."""
    from bot.services import open_services

    opened = open_services(load_settings(), load_model=load_model)
    try:
        yield opened
    finally:
        opened.close()
