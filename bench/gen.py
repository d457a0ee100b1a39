"""`rapport bench gen`: time to first token, decode speed and turn time on the configured model.

Every measured prompt is new to the worker (a distinct leading salt), so the prefix cache cannot flatter
the cold numbers; the second turn of the same conversation is measured separately, as `second_turn_*`.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time

from dialogue.model.backend import LocalBackend
from dialogue.model.worker import GenerationParams
from dialogue.settings import Settings

FILLER = (
    "Rapport keeps notes about each conversation so that it can answer questions about earlier days, "
    "look up the shop's opening hours, and hand a customer over to a colleague when it is unsure. "
)
FOLLOW_UP = " Thank you. And what about next Saturday, are you open in the afternoon as well?"


def prompt_ids(tokenizer, n_tokens: int, salt: int = 0) -> list[int]:
    """Exactly `n_tokens` ids of ordinary English, different from the first token on for each `salt`."""
    ids = tokenizer.encode(f"{salt} Request {salt}. " + FILLER * (n_tokens // 20 + 2), add_special_tokens=False)
    return ids[:n_tokens]


async def one_turn(backend: LocalBackend, ids: list[int], new_tokens: int) -> dict[str, float]:
    params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    start = time.perf_counter()
    generation = await backend.worker.submit(ids, params)
    first = None
    async for _ in generation:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    decoded = max(generation.completion_tokens - 1, 1)
    return {"ttft_s": first - start, "decode_tok_s": decoded / max(end - first, 1e-9), "turn_s": end - start,
            "tokens": generation.completion_tokens, "generated": generation.generated,
            "reused_tokens": generation.reused_tokens}


def full_batch_rate(steps: list[tuple[int, int, float]], concurrency: int) -> tuple[float | None, int]:
    """(tokens/s, steps) over the worker's steps that decoded every conversation and read no prompt: the
    decode throughput of a full batch, sampling and streaming included."""
    full = [seconds for rows, prompt_tokens, seconds in steps if rows == concurrency and not prompt_tokens]
    if not full:
        return None, 0
    return concurrency * len(full) / sum(full), len(full)


def median(rows: list[dict], key: str, digits: int = 4) -> float:
    return round(statistics.median(r[key] for r in rows), digits)


async def run_async(settings: Settings, prompt_tokens: int, new_tokens: int, concurrency: int, repeats: int) -> dict:
    backend = LocalBackend(settings)
    try:
        await backend.ready()
        await one_turn(backend, prompt_ids(backend.tokenizer, 32, -1), 4)  # warm-up: first-call allocations
        runs = []
        backend.worker.steps.clear()
        for repeat in range(repeats):
            prompts = [prompt_ids(backend.tokenizer, prompt_tokens, repeat * concurrency + i) for i in range(concurrency)]
            start = time.perf_counter()
            results = await asyncio.gather(*(one_turn(backend, ids, new_tokens) for ids in prompts))
            runs.append((results, time.perf_counter() - start, prompts))
        rate, full_steps = full_batch_rate(list(backend.worker.steps), concurrency)
        flat = [r for results, _, _ in runs for r in results]
        out = {
            "model": backend.model_id,
            **{k: v for k, v in backend.path().items() if not k.endswith("_us")},  # the path that ran, and why
            "threads": settings.threads,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "concurrency": concurrency,
            "repeats": repeats,
            "ttft_s": median(flat, "ttft_s"),
            "decode_tok_s": median(flat, "decode_tok_s", 2),
            "turn_s": median(flat, "turn_s"),
        }
        if concurrency > 1:
            out["aggregate_tok_s"] = round(rate, 2) if rate else None
            out["full_batch_steps"] = full_steps  # how many steps that figure rests on
            out["end_to_end_tok_s"] = round(statistics.median(  # prompts read included
                sum(r["tokens"] for r in results) / wall for results, wall, _ in runs), 2)
        # The next turn of the first conversation: its prompt extends the first turn's prompt and reply.
        results, _, prompts = runs[-1]
        follow = backend.tokenizer.encode(FOLLOW_UP, add_special_tokens=False)
        second = await one_turn(backend, prompts[0] + results[0]["generated"] + follow, new_tokens)
        out["second_turn_ttft_s"] = round(second["ttft_s"], 4)
        out["second_turn_s"] = round(second["turn_s"], 4)
        out["second_turn_reused_tokens"] = second["reused_tokens"]
        out["calibration_us"] = {k: v for k, v in backend.path().items() if k.endswith("_us")}
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return out
    finally:
        backend.close()


def run(settings: Settings, prompt_tokens: int = 800, new_tokens: int = 64, concurrency: int = 1, repeats: int = 3) -> dict:
    return asyncio.run(run_async(settings, prompt_tokens, new_tokens, concurrency, repeats))


if __name__ == "__main__":  # `python -m bench.gen '[prompt_tokens, new_tokens, concurrency, repeats]'` (bench compare)
    import json
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(Settings(), *json.loads(sys.argv[1]))))
