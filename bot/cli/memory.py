"""`rapport memory import|search|forget`: one user's long-term memory from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from bot.cli.common import emit_json, services
from memory.errors import InvalidInput

MAX_IMPORT_BYTES = 200 * 1024 * 1024


@click.group("memory")
def memory_group() -> None:
    """A user's long-term memory: import past exchanges, search, forget."""


@memory_group.command("import")
@click.option("--user", "user_id", required=True, help="whose memories these are")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help='print {"ids", "imported", "merged"}')
def import_memories(user_id: str, file: Path, as_json: bool) -> None:
    """Import JSONL lines {"text", "speaker"?, "timestamp"?, "meta"?}; a bad line imports nothing."""
    from memory.memories import parse_jsonl

    if file.stat().st_size > MAX_IMPORT_BYTES:
        raise InvalidInput(f"{file} is larger than {MAX_IMPORT_BYTES // 2**20} MB; split it")
    items = parse_jsonl(file.read_bytes())
    with services() as opened:
        ids = opened.memory.for_user(user_id).add(items)
    merged = len(ids) - len(set(ids))
    if as_json:
        emit_json({"ids": ids, "imported": len(ids), "merged": merged})
    else:
        click.echo(f"imported {len(ids)} memories for {user_id} ({merged} merged into earlier ones)")


@memory_group.command("search")
@click.option("--user", "user_id", required=True)
@click.argument("query")
@click.option("--k", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--json", "as_json", is_flag=True, help='a JSON list of {"id", "text", "score", "meta"}, best first')
def search_memories(user_id: str, query: str, k: int, as_json: bool) -> None:
    """What the user said that best matches QUERY, best first."""
    with services() as opened:
        hits = opened.memory.for_user(user_id).search(query, k=k)
    if as_json:
        emit_json([hit.to_json() for hit in hits])
        return
    if not hits:
        click.echo("no memories match")
    for hit in hits:
        click.echo(f"{hit.score:.3f}  {hit.id}  {hit.text}")


@memory_group.command("forget")
@click.option("--user", "user_id", required=True)
@click.option("--id", "memory_id", default=None, help="one memory; without it, all of the user's memories")
def forget_memories(user_id: str, memory_id: str | None) -> None:
    """Forget one memory (--id) or all of a user's memories, on disk too."""
    with services() as opened:
        memory = opened.memory.for_user(user_id)
        if memory_id is not None:
            memory.forget(memory_id)
            click.echo(f"forgot memory {memory_id}")
        else:
            click.echo(f"forgot {memory.forget_all()} memories of {user_id}")
