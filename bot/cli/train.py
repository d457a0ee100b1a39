"""`rapport transcripts …`, `rapport train`, `rapport adapters …` and `rapport bench train`: the learning loop."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from bot.cli.common import emit_json, load_settings, services
from memory.errors import StoreUnavailable

logger = logging.getLogger(__name__)


@click.group("transcripts")
def transcripts_group() -> None:
    """Historical conversations in and out, as JSONL (one conversation a line)."""


@transcripts_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def transcripts_import(file: Path) -> None:
    """Add conversations (with ratings and corrections) to the transcript store; prints counts as JSON."""
    from training.importer import import_lines

    with services() as opened, open(file, "rb") as handle:
        report = import_lines(opened.store, handle, system=opened.settings.system_prompt,
                              max_chars=opened.settings.max_message_chars)
    emit_json(report.to_json())
    for error in report.errors[:20]:
        click.echo(f"line {error['line']}: {error['error']}", err=True)
    if report.errors:
        click.echo(f"error: {len(report.errors)} line(s) skipped", err=True)
        sys.exit(1)


@transcripts_group.command("export")
def transcripts_export() -> None:
    """Every conversation as JSONL on stdout, in the import format."""
    import json

    from training.importer import export_conversations

    with services() as opened:
        for item in export_conversations(opened.store):
            click.echo(json.dumps(item, ensure_ascii=False))


def faq_entries(opened, use_faq: bool) -> list:
    """The FAQ's entries for grounded-answer examples; none when the embedded store is held by `serve`."""
    if not use_faq:
        return []
    try:
        return list(opened.faq.list())
    except StoreUnavailable as exc:
        click.echo(f"warning: training without FAQ examples ({exc})", err=True)
        return []


@click.command("train")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
@click.option("--exclude-deleted", is_flag=True, help="rebuild without erased users (replaces flagged versions)")
@click.option("--epochs", type=click.FloatRange(0.1, 50), default=None, help="passes over the data")
@click.option("--max-steps", type=click.IntRange(1, 100000), default=None, help="stop after N optimizer steps")
@click.option("--learning-rate", type=click.FloatRange(1e-7, 1.0), default=None)
@click.option("--rank", type=click.IntRange(1, 256), default=None, help="LoRA rank")
@click.option("--top-layers", type=click.IntRange(0, 1000), default=None, help="adapt the top N layers (0 = all)")
@click.option("--seed", type=int, default=None)
@click.option("--no-faq", is_flag=True, help="leave the FAQ out of the training data")
@click.option("--search", is_flag=True,
              help="choose learning rate, epochs and the disliked weight by validation (trains each grid point)")
@click.option("--no-clean", is_flag=True, help="train on the raw pool (no fluency/language/contact cleaning)")
def train_command(as_json: bool, exclude_deleted: bool, epochs, max_steps, learning_rate, rank, top_layers, seed,
                  no_faq: bool, search: bool, no_clean: bool) -> None:
    """Train a candidate adapter version from transcripts and ratings, then run the evaluation gate."""
    from dataclasses import replace

    from training.clean import CleanConfig
    from training.pipeline import train_version
    from training.search import SearchConfig
    from training.train import TrainConfig

    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate,
                                   "rank": rank, "seed": seed}.items() if v is not None}
    if top_layers is not None:
        overrides["top_layers"] = top_layers or None
    config = replace(TrainConfig(), **overrides)
    with services() as opened:
        result = train_version(opened.settings, opened.store, faq_entries=faq_entries(opened, not no_faq),
                               config=config, exclude_deleted=exclude_deleted, show_progress=sys.stderr.isatty(),
                               clean=None if no_clean else CleanConfig(), search=SearchConfig() if search else None)
    if as_json:
        emit_json(result)
        return
    gate = result["gate"]
    verdict = "passed" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
    click.echo(f"{result['version']} ({result['name']}): gate {verdict} (vs {gate['baseline']}); "
               f"status {result['status']}")
    canary = gate["checks"]["canary"]
    click.echo(f"  canary perplexity {canary['candidate_ppl']} (baseline {canary['baseline_ppl']}); "
               f"{result['metrics'].get('examples')} examples, {result['metrics'].get('train_s')} s training")


@click.group("adapters")
def adapters_group() -> None:
    """The adapter registry: list, evaluate, promote (optionally to a sticky share of users), roll back."""


def _registry(store=None):
    from training.registry import Registry

    return Registry(load_settings().adapters_dir, store)  # with the transcripts, an ended A/B split keeps its figures


@adapters_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def adapters_list(as_json: bool) -> None:
    """Every version with its status and metrics."""
    rows = _registry().list()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no adapter versions yet: the base model is served (run `rapport train`)")
    for row in rows:
        share = f" serving {row['share']:.0%}" if row.get("share") else ""
        metrics = row["metrics"]
        flags = f" flags={','.join(row['flags'])}" if row["flags"] else ""
        click.echo(f"{row['version']}  {row['status']:<9}{share}  canary_ppl={metrics.get('canary_ppl')} "
                   f"margin={metrics.get('pref_margin')} faq={metrics.get('faq_accuracy')}  {row['created_at']}{flags}")


@adapters_group.command("eval")
@click.argument("version")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-faq", is_flag=True)
def adapters_eval(version: str, as_json: bool, no_faq: bool) -> None:
    """Run the gate for VERSION against what is served now, on today's held-out data."""
    from training.pipeline import evaluate_version

    with services() as opened:
        result = evaluate_version(opened.settings, opened.store, version, faq_entries=faq_entries(opened, not no_faq))
    if as_json:
        emit_json(result)
    else:
        gate = result["gate"]
        click.echo(f"{result['version']}: gate {'passed' if gate['passed'] else 'failed'} vs {gate['baseline']} "
                   f"{'; '.join(gate['reasons'])}")
        click.echo(f"  metrics {result['metrics']}")


@adapters_group.command("promote")
@click.argument("version")
@click.option("--share", type=float, default=None, help="serve to this fraction of users (sticky A/B), e.g. 0.2")
def adapters_promote(version: str, share: float | None) -> None:
    """Serve VERSION (running chat/serve/telegram pick it up within seconds)."""
    with services() as opened:
        item = _registry(opened.store).promote(version, share)
    target = f"{share:.0%} of users" if share is not None and share < 1 else "everyone"
    click.echo(f"{item.version} ({item.name}) now serves {target}")


@adapters_group.command("rollback")
def adapters_rollback() -> None:
    """End a running A/B test, or restore the version that was active before this one."""
    with services() as opened:
        result = _registry(opened.store).rollback()
    if "ended_ab" in result:
        click.echo(f"ended the A/B test of {result['ended_ab']}; serving {result['active'] or 'the base model'}")
    else:
        click.echo(f"retired {result['retired']}; serving {result['active'] or 'the base model'}")


@adapters_group.command("purge")
def adapters_purge() -> None:
    """Delete the files of every version trained on an erased user's data (they are no longer served), and the
    checkpoints of unfinished runs on it."""
    purged = _registry().purge()
    click.echo(f"purged {', '.join(purged)}" if purged
               else "nothing to purge: no version or checkpoint holds an erased user's data")


@adapters_group.command("experiment")
@click.option("--json", "as_json", is_flag=True)
def adapters_experiment(as_json: bool) -> None:
    """The running A/B split per variant, with the decision rule's verdict (as the console's Experiments page)."""
    from training.experiment import current_experiment

    with services() as opened:
        report = current_experiment(_registry(), opened.store)
    if as_json:
        emit_json(report)
        return
    if not report["running"]:
        click.echo("no A/B split is running (`rapport adapters promote V --share F` starts one)")
    else:
        for v in report["variants"]:
            rate = f"{v['thumbs_up_rate']:.1%}" if v["thumbs_up_rate"] is not None else "-"
            click.echo(f"{v['label']} {v['version']:<6} {v['share']:.0%}  conversations={v['conversations']} "
                       f"turns={v['turns']} rated={v['rated']} thumbs_up={rate} handoff={v['handoff_rate']} "
                       f"p50={v['latency_p50_ms']} p95={v['latency_p95_ms']} ms")
        click.echo(f"{report['decision']} (P(B better) = {report['prob_b_better']:.3f})")
        click.echo(f"rule: {report['rule']}")
    for past in report["past"]:
        why = f" ({past['reason']})" if past["reason"] else ""
        click.echo(f"past: {past['b']} at {past['share']:.0%} vs {past['a']}, {past['started_at']} to "
                   f"{past['ended_at']}: {past['ended']}{why}; decision then: {past['decision'] or '-'}")


@adapters_group.command("report")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG path (default: $RAPPORT_HOME/adapters/report.png)")
@click.option("--json", "as_json", is_flag=True)
def adapters_report(output: Path | None, as_json: bool) -> None:
    """A PNG chart of metrics and rating rates across versions."""
    from training.report import write_report

    with services() as opened:
        result = write_report(_registry(), opened.store, output or opened.settings.adapters_dir / "report.png")
    if as_json:
        emit_json(result)
    else:
        click.echo(result["path"])
