"""`rapport faq import|list|search|ask`: the business FAQ from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from bot.cli.common import emit_json, services


@click.group("faq")
def faq_group() -> None:
    """The business FAQ: import entries, list them, search them."""


@faq_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help='print {"added", "updated", "unchanged"}')
def import_faq(file: Path, as_json: bool) -> None:
    """Import FILE (.csv id,question,answer[,tags] · .jsonl · .md); upsert by id, a bad file imports nothing."""
    from memory.faq import parse_faq_file

    entries = parse_faq_file(file)  # validated whole before the store is even opened
    with services() as opened:
        result = opened.faq.upsert(entries)  # fits the FAQ's own map and classifier (and encoder, if asked) when this version was never fitted
        fit = opened.faq.last_fit
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{file.name}: {len(entries)} entries ({result['added']} added, {result['updated']} updated, "
                   f"{result['unchanged']} unchanged)")
        if fit is not None:
            scores = f" (held-out top-1 {fit.plain_top1} -> {fit.fitted_top1})" if fit.plain_top1 is not None else ""
            if fit.encoder_top1 is not None:
                scores += f", own encoder {fit.encoder_top1}"
            state = ("own encoder used" if fit.encoder_used else "map used" if fit.used else "map not used") + \
                (", entry classifier used" if fit.classifier_used else "")
            took = fit.seconds + (fit.encoder_seconds or 0.0)
            click.echo(f"fit {fit.fingerprint}: {state}, {fit.reason}{scores}"
                       f"{', fitted earlier' if not fit.trained else f', {took:.1f} s'}")


@faq_group.command("list")
@click.option("--json", "as_json", is_flag=True, help='a JSON list of {"id", "question", "answer", "tags", "alternates"}')
def list_faq(as_json: bool) -> None:
    """Every entry, in import order."""
    with services() as opened:
        entries = opened.faq.list()
    if as_json:
        emit_json([entry.to_json() for entry in entries])
        return
    if not entries:
        click.echo("the FAQ is empty: add entries with `rapport faq import FILE`")
    for entry in entries:
        click.echo(f"{entry.id}\t{entry.question}")


@faq_group.command("search")
@click.argument("query")
@click.option("--k", default=5, show_default=True, type=click.IntRange(1, 50))
@click.option("--json", "as_json", is_flag=True, help='a JSON list of {"id", "text", "score", "meta"}, best first')
def search_faq(query: str, k: int, as_json: bool) -> None:
    """The entries that best answer QUERY, one per id, best first."""
    with services() as opened:
        hits = opened.faq.search(query, k=k)
    if as_json:
        emit_json([hit.to_json() for hit in hits])
        return
    if not hits:
        click.echo("the FAQ is empty")
    for hit in hits:
        click.echo(f"{hit.score:.3f}  {hit.id}  {hit.question}\n       {hit.answer}")


@faq_group.command("ask")
@click.argument("message")
@click.option("--json", "as_json", is_flag=True, help='print {"level", "confidence", "reply", "handoff", "sources"}')
def ask_faq(message: str, as_json: bool) -> None:
    """What the assistant would do with MESSAGE: answer from the FAQ, ground on it, hand off, answer small talk,
    decline it as outside the business, or just chat (RAPPORT_SCOPE decides which of these apply)."""
    from memory.faq import FaqDecision, grounded_reply

    with services() as opened:
        decision = opened.faq.verdict(message, opened.settings.scope) or FaqDecision("none", [])
    reply = grounded_reply(decision)
    if as_json:
        emit_json({"level": decision.level, "confidence": round(decision.confidence, 4), "reply": reply,
                   "handoff": decision.handoff, "sources": decision.sources()})
        return
    click.echo(f"{decision.level} (confidence {decision.confidence:.2f})")
    if reply:
        click.echo(reply)
    for source in decision.sources():
        click.echo(f"  source: faq {source['id']} ({source['score']:.3f})")


@faq_group.command("candidates")
@click.option("--json", "as_json", is_flag=True, help='a JSON list of {"turn_id", "customer_text", "agent_reply", "entry_id", "score"}')
def list_candidates(as_json: bool) -> None:
    """Customer messages a human agent answered: new phrasings of FAQ entries, waiting for review."""
    from training.faq_phrasings import candidates

    with services() as opened:
        found = candidates(opened.store, opened.faq, opened.settings.home)
    if as_json:
        emit_json([c.to_json() for c in found])
        return
    if not found:
        click.echo("no candidates: agent replies to customer messages appear here")
    for c in found:
        suggestion = f"{c.entry_id} ({c.score:.2f})" if c.entry_id else f"no entry matches ({c.score:.2f})"
        click.echo(f"{c.turn_id}  {suggestion}\n  customer: {c.customer_text[:200]}\n  agent: {c.agent_reply[:200]}")


@faq_group.command("approve")
@click.argument("turn_id")
@click.option("--entry", "entry_id", default=None, help="the entry to add the phrasing to (default: the suggested one)")
@click.option("--json", "as_json", is_flag=True)
def approve_candidate(turn_id: str, entry_id: str | None, as_json: bool) -> None:
    """Add a candidate's customer message to an entry's alternates (the FAQ is refitted)."""
    from training.faq_phrasings import approve

    with services() as opened:
        result = approve(opened.store, opened.faq, opened.settings.home, turn_id, entry_id)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{result['entry_id']}: added the phrasing {result['alternate']!r}")


@faq_group.command("reject")
@click.argument("turn_id")
def reject_candidate(turn_id: str) -> None:
    """Leave a candidate out of the list for good."""
    from training.faq_phrasings import reject

    with services() as opened:
        reject(opened.store, opened.faq, opened.settings.home, turn_id)
    click.echo(f"{turn_id}: rejected")
