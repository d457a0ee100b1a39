"""The house's rooms import one way (memory < dialogue < training < bench < bot) and no two files import each other.

Read from the source with `ast`, every import counts: top-level, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ROOMS = {"memory": 0, "dialogue": 1, "training": 2, "bench": 3, "bot": 4}  # a room imports only rooms at or below it


def modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in sorted((REPO / room).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Our own modules that `path` imports (`from a.b import c` is a.b.c when that is a module, else a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in known else node.module)
    return {name for name in names if name.split(".")[0] in ROOMS}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def test_no_room_imports_a_room_above_it():
    wrong = [f"{name} imports {target}" for name, targets in graph().items() for target in targets
             if ROOMS[target.split(".")[0]] > ROOMS[name.split(".")[0]]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_files():
    edges = graph()
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges.get(name, ())):
            if target == name or target not in edges:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_walk_sees_the_imports():
    """The checks above are only as good as the graph: it must see a known edge and the known rooms."""
    edges = graph()
    assert "dialogue.model.worker" in edges["dialogue.model.backend"]
    assert "bot.services" in edges["bot.cli.common"]  # a lazy import inside a function
    assert {name.split(".")[0] for name in edges} == set(ROOMS)
