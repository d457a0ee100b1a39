"""`rapport doctor`: checks the transcript database against the vector store, and repairs what drifted.

Drift is counted in four kinds: turns whose memory write never finished (the outbox still owes it),
memories whose turn is no longer on record (imported memories have no turn and are fine), memory
collections without an owner, and erasures begun and not finished. `--repair` performs the owed writes,
forgets the orphaned memories, drops the ownerless collections and finishes the erasures (first). The exit status is 0 when nothing (or nothing left after repair) drifted.
"""

from __future__ import annotations

import asyncio

import click

from bot.cli.common import emit_json, services


def examine(opened) -> dict:
    """What drifted, by kind (each a list of ids) and in all (`drift`)."""
    owed = [row.turn_id for row, _ in opened.store.owed_memory(limit=10_000)]
    owners = opened.memory.owners()
    orphans = []
    for user_id in sorted(o for o in owners.values() if o is not None):
        hits = [h for h in opened.memory.for_user(user_id).list() if h.turn_id]
        on_record = opened.store.turn_ids([h.turn_id for h in hits])
        orphans += [{"user_id": user_id, "memory_id": h.id, "turn_id": h.turn_id}
                    for h in hits if h.turn_id not in on_record]
    ownerless = sorted(name for name, owner in owners.items() if owner is None)
    report = {"unfinished_memory_writes": owed, "memories_without_turns": orphans, "vectors_without_owners": ownerless,
              "unfinished_erasures": opened.store.unfinished_erasures()}
    report["drift"] = sum(len(v) for v in report.values())
    return report


def repair(opened, report: dict) -> int:
    """Fix what `examine` found; returns how many things were repaired."""
    done = len(opened.resume_erasures())
    if done:  # what the erasures removed is no longer drift
        report = examine(opened)
    while True:  # the owed writes, in rounds of the outbox's batch
        flushed = asyncio.run(opened.manager.flush_outbox())
        done += flushed["done"] + flushed["dropped"]
        if flushed["failed"] or not (flushed["done"] or flushed["dropped"]):
            break
    for orphan in report["memories_without_turns"]:
        opened.memory.for_user(orphan["user_id"]).forget(orphan["memory_id"])
        done += 1
    for name in report["vectors_without_owners"]:
        opened.memory.drop_orphan(name)
        done += 1
    return done


@click.command("doctor")
@click.option("--repair", "fix", is_flag=True, help="repair what drifted (owed memory writes, orphaned memories, "
              "ownerless collections, unfinished erasures)")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON document")
def doctor(fix: bool, as_json: bool) -> None:
    """Check SQL against the vector store: turns without their memories, memories without turns, vectors
    without owners, unfinished erasures; with --repair, fix them."""
    with services() as opened:
        report = examine(opened)
        if fix and report["drift"]:
            report["repaired"] = repair(opened, report)
            report["left"] = examine(opened)["drift"]
        elif fix:
            report["repaired"], report["left"] = 0, 0
    if as_json:
        emit_json(report)
    else:
        for kind in ("unfinished_memory_writes", "memories_without_turns", "vectors_without_owners",
                     "unfinished_erasures"):
            click.echo(f"{kind.replace('_', ' ')}: {len(report[kind])}")
        if fix:
            click.echo(f"repaired {report['repaired']}; left {report['left']}")
    if report.get("left", report["drift"]):
        raise SystemExit(1)
