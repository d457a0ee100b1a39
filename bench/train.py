"""`rapport bench train`: the house-style scenario end to end, timed, in a throwaway RAPPORT_HOME.

Import ~160 rated conversations (examples/house_style), measure how often fresh prompts get the house
sign-off, train + gate, promote, measure again, roll back; optionally the poisoned set, which the gate must
reject. Prints one JSON document with the timings (training tokens/s, train and gate wall time) and rates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING


from dialogue.model.files import resolve_model_dir
from dialogue.prompt import PromptParts, build_prompt
from dialogue.settings import Settings
from dialogue.store import TranscriptStore

if TYPE_CHECKING:  # torch is imported only when a benchmark runs, not by every `rapport` command
    from dialogue.model.worker import AdapterRef

logger = logging.getLogger(__name__)

SCENARIO = Path(__file__).resolve().parent.parent / "examples" / "house_style"
SIGN_OFF = "your rapport team"  # examples/house_style/make_scenario.py SIGN_OFF, matched case-insensitively


def scenario_lines(name: str, n: int) -> list[bytes]:
    return (SCENARIO / name).read_bytes().splitlines()[:n]


def fresh_prompts(n: int) -> list[str]:
    return [line for line in (SCENARIO / "fresh_prompts.txt").read_text().splitlines() if line.strip()][:n]


def has_style(reply: str) -> bool:
    return SIGN_OFF in reply.lower()


async def _replies(settings: Settings, prompts: list[str], adapter: AdapterRef | None, max_new_tokens: int) -> list[str]:
    from dialogue.model.backend import LocalBackend
    from dialogue.model.worker import GenerationParams

    backend = LocalBackend(settings)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=settings.repetition_penalty)
    try:
        out = []
        for prompt in prompts:
            messages = build_prompt(PromptParts(system=settings.system_prompt, user_text=prompt))
            generation = await backend.generate(messages, params, adapter)
            out.append(await generation.text())
        return out
    finally:
        backend.close()


def style_rate(settings: Settings, prompts: list[str], adapter: AdapterRef | None, max_new_tokens: int = 72) -> dict:
    """Greedy replies to fresh prompts; the share that carries the house sign-off."""
    started = time.perf_counter()
    replies = asyncio.run(_replies(settings, prompts, adapter, max_new_tokens))
    return {"rate": round(sum(map(has_style, replies)) / len(replies), 3), "n": len(replies),
            "seconds": round(time.perf_counter() - started, 1), "sample": replies[0][:200]}


def scenario_home(settings: Settings, root: Path, name: str) -> Settings:
    """A fresh home under `root` sharing the converted model of `settings` (converted once, if needed)."""
    home = root / name
    home.mkdir()
    if not settings.model:
        resolve_model_dir(None, settings.models_dir)
        (home / "models").symlink_to(settings.models_dir.resolve(), target_is_directory=True)
    return settings.model_copy(update={"home": home})


def run_scenario(settings: Settings, lines: list[bytes], config) -> dict:
    from training.importer import import_lines
    from training.pipeline import train_version

    store = TranscriptStore(settings.db_url)
    try:
        imported = import_lines(store, lines, system=settings.system_prompt, max_chars=settings.max_message_chars)
        return {"imported": imported.to_json(),
                **train_version(settings, store, config=config, show_progress=False)}
    finally:
        store.close()


def run(settings: Settings, *, conversations: int = 160, prompts: int = 20, poison: bool = False,
        epochs: float | None = None) -> dict:
    from dialogue.model.worker import AdapterRef
    from training.registry import AdapterSelector, Registry
    from training.train import TrainConfig

    config = TrainConfig() if epochs is None else replace(TrainConfig(), epochs=epochs)
    fresh = fresh_prompts(prompts)
    out: dict = {"conversations": conversations, "config": {"epochs": config.epochs, "rank": config.rank,
                                                          "top_layers": config.top_layers, "lr": config.learning_rate}}
    with tempfile.TemporaryDirectory(prefix="rapport-bench-train-") as tmp:
        s = scenario_home(settings, Path(tmp), "house")
        out["style_before"] = style_rate(s, fresh, None)
        result = run_scenario(s, scenario_lines("conversations.jsonl", conversations), config)
        metrics = result["metrics"]
        out["house_style"] = {"version": result["version"], "gate": result["gate"], "counts": result["counts"]}
        out.update({"train_s": metrics["train_s"], "gate_s": metrics["gate_s"],
                    "train_plus_gate_s": round(metrics["train_s"] + metrics["gate_s"], 1),
                    "tokens_per_s": metrics["tokens_per_s"], "train_tokens": metrics["train_tokens"],
                    "examples": metrics["examples"], "steps": metrics["steps"]})
        registry, selector = Registry(s.adapters_dir), AdapterSelector(s, make_ref=AdapterRef, interval_s=0)
        if result["gate"]["passed"]:
            registry.promote(result["version"])
            out["style_after"] = style_rate(s, fresh, selector.adapter_for("fresh-user"))
            registry.rollback()
            out["after_rollback_serves"] = getattr(selector.adapter_for("fresh-user"), "name", "base")
        if poison:
            p = scenario_home(settings, Path(tmp), "poisoned")
            bad = run_scenario(p, scenario_lines("poisoned.jsonl", conversations), config)
            out["poisoned"] = {"version": bad["version"], "status": bad["status"], "gate": bad["gate"],
                               "train_s": bad["metrics"]["train_s"]}
    return out


if __name__ == "__main__":
    print(json.dumps(run(Settings()), indent=1))
