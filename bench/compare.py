"""`rapport bench compare`: our runtime and llama.cpp on the same GGUF, in one run, as ratios.

llama.cpp runs through llama-cpp-python in its own virtualenv (`make llama-server` builds it), on the same
prompts (the same token ids), threads and token counts; both sides greedy, both forced to `new_tokens`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bench.gen import prompt_ids, run_async
from dialogue.errors import GenerationError
from dialogue.model.files import embedded_gguf, resolve_model_dir
from dialogue.settings import Settings

PROBE = Path(__file__).with_name("llamacpp_probe.py")
DEFAULT_PYTHON = Path(__file__).parents[1] / ".venv-llama" / "bin" / "python"


def llamacpp(settings: Settings, prompt_tokens: int, new_tokens: int, repeats: int, python: Path) -> dict:
    if not python.exists():
        raise GenerationError(f"llama-cpp-python is not installed at {python}: run `make llama-server`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(settings.model, settings.models_dir))
    prompts = [prompt_ids(tokenizer, prompt_tokens, salt) for salt in range(repeats)]  # the ones bench gen times
    job = {"gguf": str(embedded_gguf()), "prompts": prompts, "new_tokens": new_tokens,
           "threads": settings.threads or os.cpu_count()}
    done = subprocess.run([str(python), str(PROBE)], input=json.dumps(job), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise GenerationError(f"llama.cpp probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(settings: Settings, prompt_tokens: int = 800, new_tokens: int = 64, repeats: int = 3,
        python: Path = DEFAULT_PYTHON) -> dict:
    import asyncio

    ours = asyncio.run(run_async(settings, prompt_tokens, new_tokens, 1, repeats))
    theirs = llamacpp(settings, prompt_tokens, new_tokens, repeats, python)
    return {
        "rapport": ours,
        "llama_cpp": theirs,
        "ratios": {  # > 1 means Rapport is better
            "turn_speedup": round(theirs["turn_s"] / ours["turn_s"], 2),
            "ttft_speedup": round(theirs["ttft_s"] / ours["ttft_s"], 2),
            "decode_ratio": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 2),
            "second_turn_speedup": round(theirs["turn_s"] / ours["second_turn_s"], 2),
        },
    }
