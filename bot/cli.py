"""`rapport …`: the command line. Errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import click

from bot.cli_common import emit_json, load_settings
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
    from dialogue.manager import validate_id
    from dialogue.services import open_services

    validate_id(user_id, "--user")
    services = open_services(load_settings())
    try:
        services.chroma  # noqa: B018 - another process holding the stores fails this command now, not mid-chat
        threading.Thread(target=services.embedder.embed, args=(["warm-up"],), daemon=True).start()
        session = ChatSession(services, user_id)
        if sys.stdin.isatty():
            code = run_interactive(session, services.settings.home / "repl_history")
        else:
            code = run_piped(session)
    finally:
        services.close()
    sys.exit(code)


@cli.group()
def bench() -> None:
    """Benchmarks; each prints one JSON document."""


@bench.command("gen")
@click.option("--prompt-tokens", default=800, show_default=True, type=click.IntRange(1, 16384))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_gen(prompt_tokens: int, new_tokens: int, concurrency: int, repeats: int, as_json: bool) -> None:
    """Generation speed: {"ttft_s", "decode_tok_s", "turn_s"} (+ "aggregate_tok_s" when concurrent)."""
    from bench.gen import run

    emit_json(run(load_settings(), prompt_tokens, new_tokens, concurrency, repeats))


@bench.command("compare")
@click.option("--prompt-tokens", default=800, show_default=True, type=click.IntRange(1, 3000))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(1, 1000))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--isa", default="", help="CPU classes to run as, comma-separated: native, avx512, avx2 "
                                        "(each in its own process, with the 16-conversation aggregate)")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_compare(prompt_tokens: int, new_tokens: int, repeats: int, isa: str, as_json: bool) -> None:
    """This runtime beside llama.cpp on the same GGUF and prompts: {"rapport", "llama_cpp", "ratios"}, or with --isa
    {"llama_cpp", "classes": {class: {"rapport", "ratios"}}}."""
    from bench.compare import run

    classes = [c.strip() for c in isa.split(",") if c.strip()]
    emit_json(run(load_settings(), prompt_tokens, new_tokens, repeats, classes=classes or None))


@bench.command("sweep")
@click.option("--levels", default="1,2,4,8,16", show_default=True, help="comma-separated concurrency levels")
@click.option("--prompt-tokens", default=800, show_default=True, type=click.IntRange(1, 16384))
@click.option("--new-tokens", default=192, show_default=True, type=click.IntRange(1, 4096),
              help="long enough that every conversation decodes at once for a while")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="also write a PNG chart here")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_sweep(levels: str, prompt_tokens: int, new_tokens: int, plot: Path | None, as_json: bool) -> None:
    """Aggregate decode throughput against concurrency: {"levels": [{"concurrency", "aggregate_tok_s", ...}]}."""
    from bench.sweep import run

    try:
        parsed = [int(v) for v in levels.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("levels must be whole numbers, e.g. 1,4,16") from None
    if not parsed or min(parsed) < 1 or max(parsed) > 256:
        raise click.BadParameter("levels must be between 1 and 256")
    emit_json(run(load_settings(), parsed, prompt_tokens, new_tokens, plot))


# -- command groups that live in their own modules --------------------------------------------------
from bench.faq import bench_faq  # noqa: E402
from bench.memory import bench_memory  # noqa: E402
from bench.train import bench_train  # noqa: E402
from bot.cli_faq import faq_group  # noqa: E402
from bot.cli_memory import memory_group  # noqa: E402
from bot.cli_serve import bench_serve, serve  # noqa: E402
from bot.cli_telegram import telegram_command  # noqa: E402
from bot.cli_train import adapters_group, train_command, transcripts_group  # noqa: E402
from bot.cli_users import users_group  # noqa: E402

for command in (memory_group, faq_group, users_group, transcripts_group, train_command, adapters_group, serve,
                telegram_command):
    cli.add_command(command)
for command in (bench_memory, bench_faq, bench_train, bench_serve):
    bench.add_command(command)


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
