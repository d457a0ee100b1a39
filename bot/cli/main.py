"""`rapport …`: the command line. Errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
import threading

import click

from bot.cli.common import load_settings
from memory.errors import RapportError

logger = logging.getLogger(__name__)


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log more to stderr")
def cli(verbose: bool) -> None:
    """Rapport: a personal assistant that remembers you, answers from a FAQ and learns from your ratings."""
    configure_logging(verbose)


@cli.command()
@click.option("--user", "user_id", default=lambda: os.environ.get("USER") or "local", show_default="$USER",
              help="who is talking: memory and persona follow this id")
def chat(user_id: str) -> None:
    """Talk with the assistant (streamed replies; /help lists the commands)."""
    from bot.repl import ChatSession, run_interactive, run_piped
    from memory.text import validate_id
    from bot.services import open_services

    validate_id(user_id, "--user")
    services = open_services(load_settings())
    try:
        services.chroma  # noqa: B018 - another process holding the stores fails this command now, not mid-chat
        threading.Thread(target=services.embedder.embed, args=(["warm-up"],), daemon=True).start()
        session = ChatSession(services, user_id)
        if sys.stdin.isatty():
            code = run_interactive(session, services.history_file(user_id))  # per user: erased with them
        else:
            code = run_piped(session)
    finally:
        services.close()
    sys.exit(code)


# -- command groups that live in their own modules --------------------------------------------------
from bot.cli.bench import bench  # noqa: E402
from bot.cli.db import db_group  # noqa: E402
from bot.cli.doctor import doctor  # noqa: E402
from bot.cli.faq import faq_group  # noqa: E402
from bot.cli.keys import keys_group  # noqa: E402
from bot.cli.memory import memory_group  # noqa: E402
from bot.cli.serve import serve  # noqa: E402
from bot.cli.telegram import telegram_command  # noqa: E402
from bot.cli.train import adapters_group, train_command, transcripts_group  # noqa: E402
from bot.cli.users import users_group  # noqa: E402

for command in (memory_group, faq_group, users_group, transcripts_group, train_command, adapters_group, serve,
                telegram_command, bench, db_group, keys_group, doctor):
    cli.add_command(command)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RapportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug: one line for the user, the traceback only when asked for
        logger.debug("unexpected error", exc_info=True)
        click.echo(f"internal error: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                   " (run with -v for details)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
