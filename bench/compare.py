"""`rapport bench compare`: our runtime and llama.cpp on the same GGUF, in one run, as ratios.

llama.cpp runs through llama-cpp-python in its own virtualenv (`make llama-server` builds it), on the same
prompts (the same token ids), threads and token counts; both sides greedy, both forced to `new_tokens`.
A lesser CPU class is compared with llama.cpp built for that class where `make llama-classes` has built it
(`.venv-llama/var/src/build-<class>/bin/`, loaded through LLAMA_CPP_LIB_PATH), else with its native build.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.gen import prompt_ids, run_async
from dialogue.errors import GenerationError
from dialogue.model.files import embedded_gguf, resolve_model_dir
from dialogue.settings import Settings

PROBE = Path(__file__).with_name("llamacpp_probe.py")
DEFAULT_PYTHON = Path(__file__).parents[1] / ".venv-llama" / "bin" / "python"


def class_build(python: Path, cpu_class: str) -> Path | None:
    """The directory of llama.cpp's libraries built for `cpu_class` by `make llama-classes`, if there is one."""
    directory = python.parents[1] / "var" / "src" / f"build-{cpu_class}" / "bin"
    return directory if (directory / "libllama.so").exists() else None


def llamacpp(settings: Settings, prompt_tokens: int, new_tokens: int, repeats: int, python: Path,
             lib: Path | None = None) -> dict:
    if not python.exists():
        raise GenerationError(f"llama-cpp-python is not installed at {python}: run `make llama-server`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(settings.model, settings.models_dir))
    prompts = [prompt_ids(tokenizer, prompt_tokens, salt) for salt in range(repeats)]  # the ones bench gen times
    job = {"gguf": str(embedded_gguf()), "prompts": prompts, "new_tokens": new_tokens,
           "threads": settings.threads or os.cpu_count()}
    env = {**os.environ, **({"LLAMA_CPP_LIB_PATH": str(lib)} if lib else {})}
    done = subprocess.run([str(python), str(PROBE)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=1800, env=env)
    if done.returncode != 0:
        raise GenerationError(f"llama.cpp probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# How a lesser CPU class is emulated on a better CPU: the variables torch reads before it first dispatches (oneDNN,
# ATen's kernels, and MKL, which does the float32 matmuls of prompt chunks).
CLASS_ENV = {"native": {},
             "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"},
             "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
AGGREGATE_CONVERSATIONS = 16
AGGREGATE_NEW_TOKENS = 192  # as bench sweep: long enough that all 16 decode together after the last prompt is read


def ours_as(cpu_class: str, prompt_tokens: int, new_tokens: int, concurrency: int, repeats: int) -> dict:
    """bench gen in a child process that runs as `cpu_class` (torch reads the caps once, at start)."""
    if cpu_class not in CLASS_ENV:
        raise GenerationError(f"unknown CPU class {cpu_class!r}: one of {', '.join(CLASS_ENV)}")
    args = json.dumps([prompt_tokens, new_tokens, concurrency, repeats])
    done = subprocess.run([sys.executable, "-m", "bench.gen", args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **CLASS_ENV[cpu_class]})
    if done.returncode != 0:
        raise GenerationError(f"bench gen as {cpu_class} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(ours: dict, theirs: dict) -> dict:
    """> 1 means Rapport is better."""
    out = {"turn_speedup": round(theirs["turn_s"] / ours["turn_s"], 2),
           "ttft_speedup": round(theirs["ttft_s"] / ours["ttft_s"], 2),
           "decode_ratio": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 2),
           "second_turn_speedup": round(theirs["turn_s"] / ours["second_turn_s"], 2)}
    if ours.get("aggregate_tok_s"):
        out["aggregate_vs_their_single_stream"] = round(ours["aggregate_tok_s"] / theirs["decode_tok_s"], 2)
    return out


def median_of(results: list[dict]) -> dict:
    """One result from several runs of the same measurement: the median of each number, the first run's other
    values (the path that ran, its reasons)."""
    out = dict(results[0])
    for key, value in results[0].items():
        values = [r.get(key) for r in results]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
                isinstance(v, (int, float)) for v in values):
            out[key] = round(statistics.median(values), 4)
    return out


def run(settings: Settings, prompt_tokens: int = 800, new_tokens: int = 64, repeats: int = 3,
        python: Path = DEFAULT_PYTHON, classes: list[str] | None = None, rounds: int = 1) -> dict:
    """Without `classes`, this process as it is; with them, each class in a child process, and for each also the
    16-conversation aggregate, beside llama.cpp built for that class (`llama_cpp_build` says which build ran: the
    class's own, or the native one where no class build exists).

    With `rounds` > 1 each class runs that many rounds of llama.cpp then ours, one after the other, and reports
    each round's ratios and their medians: on a machine whose speed drifts by a third from minute to minute (a
    shared host's memory), a ratio taken within a round compares the two at the same speed."""
    import asyncio

    if not classes:
        theirs = llamacpp(settings, prompt_tokens, new_tokens, repeats, python)
        ours = asyncio.run(run_async(settings, prompt_tokens, new_tokens, 1, repeats))
        return {"rapport": ours, "llama_cpp": theirs, "ratios": ratios(ours, theirs)}
    out: dict = {"classes": {}}
    for cpu_class in classes:
        lib = class_build(python, cpu_class) if cpu_class != "native" else None
        measured = []
        for _ in range(max(1, rounds)):
            theirs = llamacpp(settings, prompt_tokens, new_tokens, repeats, python, lib)
            ours = ours_as(cpu_class, prompt_tokens, new_tokens, 1, repeats)
            crowd = ours_as(cpu_class, prompt_tokens, AGGREGATE_NEW_TOKENS, AGGREGATE_CONVERSATIONS, 1)
            ours["aggregate_tok_s"] = crowd.get("aggregate_tok_s")
            ours["aggregate_conversations"] = AGGREGATE_CONVERSATIONS
            measured.append({"rapport": ours, "llama_cpp": theirs, "ratios": ratios(ours, theirs)})
        entry = {"rapport": median_of([m["rapport"] for m in measured]),
                 "llama_cpp": median_of([m["llama_cpp"] for m in measured]),
                 "llama_cpp_build": cpu_class if lib else "native",
                 "ratios": median_of([m["ratios"] for m in measured])}
        if len(measured) > 1:
            entry["rounds"] = [m["ratios"] for m in measured]
        out["classes"][cpu_class] = entry
        out.setdefault("llama_cpp", entry["llama_cpp"])  # the first class's (the native one, where it is listed)
    return out
