"""`rapport bench …`: every benchmark command; the measuring itself lives in `bench/`, which never imports `bot`."""

from __future__ import annotations

from pathlib import Path

import click

from bot.cli.common import emit_json, load_settings


@click.group()
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
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 10),
              help="with --isa: rounds of llama.cpp then ours per class; ratios are each round's, and their medians")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_compare(prompt_tokens: int, new_tokens: int, repeats: int, isa: str, rounds: int, as_json: bool) -> None:
    """This runtime beside llama.cpp on the same GGUF and prompts: {"rapport", "llama_cpp", "ratios"}, or with --isa
    {"llama_cpp", "classes": {class: {"rapport", "ratios"}}}."""
    from bench.compare import run

    classes = [c.strip() for c in isa.split(",") if c.strip()]
    emit_json(run(load_settings(), prompt_tokens, new_tokens, repeats, classes=classes or None, rounds=rounds))


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


@bench.command("serve")
@click.option("--conversations", default=16, show_default=True, type=click.IntRange(1, 256))
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(1, 3600), help="seconds")
@click.option("--new-tokens", default=48, show_default=True, type=click.IntRange(1, 4096), help="reply budget")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_serve(conversations: int, duration: float, new_tokens: int, as_json: bool) -> None:
    """API load: concurrent conversations against a real `rapport serve`; throughput, p50/p95, errors."""
    from bench.serve import run

    emit_json(run(load_settings(), conversations=conversations, duration_s=duration, new_tokens=new_tokens))


@bench.command("faq")
@click.option("--set", "which", type=click.Choice(["bank", "bikeshop"]), default="bank", show_default=True,
              help="bank: the harder set in bench/data/faq_bank_* (scope, mechanisms); bikeshop: examples/faq")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="a directory laid out like the chosen set's")
@click.option("--calibrate", "do_calibrate", is_flag=True, help="fit the decision (bank: scope) model on the dev halves first")
@click.option("--limit", type=click.IntRange(2, 10_000), default=None, help="bank: only the first N entries and their messages")
@click.option("--api", "through_api", is_flag=True,
              help="bank: each test message as the first of a new conversation through the HTTP API and the model")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 64), help="torch threads")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_faq(which: str, directory: Path | None, do_calibrate: bool, limit: int | None, through_api: bool,
              threads: int, as_json: bool) -> None:
    """FAQ: top-1/top-3, the answer and scope policy on in-/out-of-scope test messages, search latency."""
    if which == "bikeshop":
        from bench.faq import run

        emit_json(run(directory, do_calibrate=do_calibrate, threads=threads))
        return
    from bench.faq_bank import run as run_bank, run_api

    if through_api:
        from bot.http.app import create_app
        from bot.services import open_services

        emit_json(run_api(open_services, create_app, limit=limit, threads=threads))
        return
    emit_json(run_bank(directory, do_calibrate=do_calibrate, threads=threads, limit=limit))


@bench.command("memory")
@click.option("--set", "dataset", type=click.Choice(["conversations", "synthetic"]), default="conversations",
              show_default=True, help="two-person conversations (bench/memory_conv.py) or the older one-speaker set")
@click.option("--sizes", default=None, help="memories per user, comma-separated [conversations: 600,10000; "
                                            "synthetic: 10000,100000 for latency]")
@click.option("--conversations", default=4, show_default=True, type=click.IntRange(1, 50),
              help="users per split at sizes up to 2000 (larger sizes use one)")
@click.option("--split", "splits", default="tune,heldout", show_default=True, help="tune, heldout or both")
@click.option("--questions", default=None, type=click.IntRange(1, 10000), help="at most this many per user")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 64), help="torch threads")
@click.option("--isa", default="", help="CPU classes to run as, comma-separated: native, avx512, avx2 "
                                        "(each in its own process)")
@click.option("--no-recall", is_flag=True, help="synthetic set: only the latency runs")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_memory(dataset: str, sizes: str | None, conversations: int, splits: str, questions: int | None,
                 threads: int, isa: str, no_recall: bool, as_json: bool) -> None:
    """Memory search: evidence recall@1/5/10 of the product, plain dense and plain BM25; search p50/p95 per size."""
    from bench.memory import run

    sizes = sizes or ("600,10000" if dataset == "conversations" else "10000,100000")
    try:
        parsed = [int(size) for size in sizes.split(",") if size.strip()]
    except ValueError:
        raise click.BadParameter("sizes must be comma-separated integers") from None
    if not parsed or min(parsed) < 20 or max(parsed) > 200_000:
        raise click.BadParameter("sizes must be between 20 and 200000")
    chosen = [s.strip() for s in splits.split(",") if s.strip()]
    if not chosen or set(chosen) - {"tune", "heldout"}:
        raise click.BadParameter("split must be tune, heldout or tune,heldout")
    classes = [c.strip() for c in isa.split(",") if c.strip()]
    if set(classes) - {"native", "avx512", "avx2"}:
        raise click.BadParameter("isa must name native, avx512 or avx2")
    emit_json(run(parsed, recall=not no_recall, dataset=dataset, conversations=conversations, splits=chosen,
                  questions=questions, threads=threads, isa=classes or None))


@bench.command("train")
@click.option("--conversations", type=click.IntRange(4, 10000), default=160, show_default=True)
@click.option("--prompts", type=click.IntRange(1, 200), default=20, show_default=True, help="fresh prompts for style")
@click.option("--poison", is_flag=True, help="also train on the poisoned set (the gate must reject it)")
@click.option("--epochs", type=click.FloatRange(0.1, 50), default=None)
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_train(conversations: int, prompts: int, poison: bool, epochs, as_json: bool) -> None:
    """The learning loop on the house-style scenario: style rate before/after, train + gate time, tokens/s."""
    from bench.train import run

    emit_json(run(load_settings(), conversations=conversations, prompts=prompts, poison=poison, epochs=epochs))


@bench.command("train-scenarios")
@click.option("--conversations", type=click.IntRange(8, 160), default=48, show_default=True,
              help="rated conversations per scenario")
@click.option("--prompts", type=click.IntRange(1, 40), default=10, show_default=True, help="fresh prompts for style")
@click.option("--only", default="", help="comma-separated scenario names (default: all)")
@click.option("--epochs", type=click.FloatRange(0.5, 20), default=3.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_train_scenarios(conversations: int, prompts: int, only: str, epochs: float, as_json: bool) -> None:
    """Good and poisoned rating pools through clean → search → train → gate → promote: per scenario the gate's
    verdict with its reasons and the share of fresh replies that show what the pool teaches."""
    from bench.train_scenarios import SCENARIOS, run

    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in SCENARIOS})
    if unknown:
        raise click.BadParameter(f"unknown scenario(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(s.name for s in SCENARIOS)}")
    import json

    def progress(name: str, result: dict) -> None:
        click.echo(json.dumps({"scenario": name, **result}), err=True)

    emit_json(run(load_settings(), conversations=conversations, prompts=prompts, only=names or None, epochs=epochs,
                  on_result=progress))


@bench.command("chat")
@click.option("--users", default=6, show_default=True, type=click.IntRange(0, 1000),
              help="scripted users to play (0 = all of them); about 9 turns each")
@click.option("--seed", default=0, show_default=True, type=int, help="which users are drawn")
@click.option("--split", type=click.Choice(["all", "tune", "heldout"]), default="all", show_default=True,
              help="the users tuned against, the held-out ones, or both (reported apart)")
@click.option("--turns", "with_turns", is_flag=True, help="also list every turn with its reply and verdicts")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_chat(users: int, seed: int, split: str, with_turns: bool, as_json: bool) -> None:
    """Conversation quality through a real `rapport serve`: echo, repeat, role confusion, empty replies,
    recall of what the user said, turn time p50/p95, and the CPU path."""
    from bench.chat import run

    emit_json(run(load_settings(), users=users, seed=seed, split=split, samples=with_turns))


@bench.command("soak")
@click.option("--conversations", default=16, show_default=True, type=click.IntRange(1, 256))
@click.option("--minutes", default=10.0, show_default=True, type=click.FloatRange(0.25, 600))
@click.option("--database-url", default=None, help="a PostgreSQL URL (default: RAPPORT_DATABASE_URL when it is one, "
                                                   "else the local server's postgres database); the bench makes a "
                                                   "schema of its own there and drops it after")
@click.option("--seed", default=0, show_default=True, type=int, help="when the kills come")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output format)")
def bench_soak(conversations: int, minutes: float, database_url: str | None, seed: int, as_json: bool) -> None:
    """Two `rapport serve` processes on PostgreSQL and a Chroma server, one killed (SIGKILL) and restarted at random
    moments: turns acknowledged and lost, duplicate replies, 5xx outside restarts, memory/SQL drift, p95 turn time."""
    from bench.soak import LOCAL_POSTGRES, run

    settings = load_settings()
    configured = settings.database_url if (settings.database_url or "").startswith("postgresql") else None
    url = database_url or configured or LOCAL_POSTGRES
    if not url.startswith("postgresql"):
        raise click.BadParameter("bench soak runs two processes on PostgreSQL: pass --database-url "
                                 "postgresql+psycopg://…", param_hint="--database-url")
    emit_json(run(settings, pg_url=url, conversations=conversations, minutes=minutes, seed=seed))
