"""`rapport bench sweep`: aggregate decode throughput against the number of concurrent conversations, as
JSON and, with --plot, a PNG chart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.gen import run_async
from dialogue.settings import Settings


def run(settings: Settings, levels: list[int], prompt_tokens: int, new_tokens: int, plot: Path | None) -> dict:
    rows = []
    for concurrency in levels:
        result = asyncio.run(run_async(settings, prompt_tokens, new_tokens, concurrency, 1))
        rows.append({"concurrency": concurrency, "aggregate_tok_s": result.get("aggregate_tok_s") or result["decode_tok_s"],
                     "end_to_end_tok_s": result.get("end_to_end_tok_s", result["decode_tok_s"]),
                     "decode_tok_s": result["decode_tok_s"], "ttft_s": result["ttft_s"], "turn_s": result["turn_s"]})
    if plot is not None:
        draw(rows, plot, f"{prompt_tokens}-token prompts, {new_tokens} new tokens, {result['cpu_class']}, {result['dtype']}, decode weights {result['decode_weights']}")
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "levels": rows}


def draw(rows: list[dict], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(x, [r["aggregate_tok_s"] for r in rows], marker="o", label="decode, all conversations together")
    ax.plot(x, [r["end_to_end_tok_s"] for r in rows], marker="^", label="end to end (prompts read included)")
    ax.plot(x, [r["decode_tok_s"] for r in rows], marker="s", label="decode, each conversation")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("concurrent conversations")
    ax.set_ylabel("decoded tokens / s")
    ax.set_title(f"Decode throughput on this machine\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
