"""`rapport bench gen`: time to first token, decode speed and turn time on the configured model."""

from __future__ import annotations

import asyncio
import statistics
import time

from dialogue.backend import LocalBackend
from dialogue.runtime import GenerationParams
from dialogue.settings import Settings

FILLER = (
    "Rapport keeps notes about each conversation so that it can answer questions about earlier days, "
    "look up the shop's opening hours, and hand a customer over to a colleague when it is unsure. "
)


def prompt_ids(backend: LocalBackend, n_tokens: int, salt: int = 0) -> list[int]:
    """Exactly `n_tokens` ids of ordinary English; `salt` makes concurrent prompts differ."""
    ids = backend.tokenizer.encode(f"Request {salt}. " + FILLER * (n_tokens // 20 + 2), add_special_tokens=False)
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
            "tokens": generation.completion_tokens}


async def run_async(settings: Settings, prompt_tokens: int, new_tokens: int, concurrency: int, repeats: int) -> dict:
    backend = LocalBackend(settings)
    try:
        await backend.ready()
        await one_turn(backend, prompt_ids(backend, 32), 4)  # warm-up: first-call allocations
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            results = await asyncio.gather(*(one_turn(backend, prompt_ids(backend, prompt_tokens, i), new_tokens)
                                             for i in range(concurrency)))
            wall = time.perf_counter() - start
            runs.append((results, wall))
        flat = [r for results, _ in runs for r in results]
        out = {
            "model": backend.model_id,
            "dtype": str(backend.dtype).removeprefix("torch."),
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "concurrency": concurrency,
            "repeats": repeats,
            "ttft_s": round(statistics.median(r["ttft_s"] for r in flat), 4),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in flat), 2),
            "turn_s": round(statistics.median(r["turn_s"] for r in flat), 4),
        }
        if concurrency > 1:
            out["aggregate_tok_s"] = round(statistics.median(
                sum(r["tokens"] for r in results) / wall for results, wall in runs), 2)
        return out
    finally:
        backend.close()


def run(settings: Settings, prompt_tokens: int = 800, new_tokens: int = 64, concurrency: int = 1, repeats: int = 3) -> dict:
    return asyncio.run(run_async(settings, prompt_tokens, new_tokens, concurrency, repeats))
