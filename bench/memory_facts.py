"""Precision and recall of "kept as memory" (`memory.facts.memory_text`) on the labelled set in bench/data/."""

from __future__ import annotations

import json
from pathlib import Path

from memory.facts import memory_text
from memory.lexical import tokenize

DATA = Path(__file__).resolve().parent / "data" / "memory_facts.jsonl"


def load(split: str | None = None) -> list[dict]:
    """The labelled messages (`text`, `label` keep|drop, `kind`, `split` train|heldout, `memory` for mixed)."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if split is None or row["split"] == split]


def part_ok(row: dict, kept: str | None) -> bool:
    """A mixed message's kept text holds the statement's content words and no question."""
    if "memory" not in row:
        return True
    return kept is not None and "?" not in kept and set(tokenize(row["memory"])) <= set(tokenize(kept))


def evaluate(rows: list[dict]) -> dict:
    tp = fp = fn = tn = parts = 0
    errors = []
    for row in rows:
        kept = memory_text(row["text"])
        want = row["label"] == "keep"
        tp += want and kept is not None
        fp += not want and kept is not None
        fn += want and kept is None
        tn += not want and kept is None
        good_part = part_ok(row, kept)
        parts += "memory" in row and good_part and kept is not None
        if (kept is not None) != want or not good_part:
            errors.append({"text": row["text"], "label": row["label"], "kept": kept})
    mixed = sum("memory" in row for row in rows)
    return {"n": len(rows), "precision": round(tp / max(tp + fp, 1), 3), "recall": round(tp / max(tp + fn, 1), 3),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "mixed": mixed, "mixed_part_ok": parts, "errors": errors}


def main() -> None:
    report = {split or "all": evaluate(load(split)) for split in ("train", "heldout", None)}
    for value in report.values():
        value["errors"] = value["errors"][:40]
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
