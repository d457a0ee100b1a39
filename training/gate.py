"""The evaluation gate: a candidate adapter against the serving baseline, on data the candidate never saw.

Three checks, all by log-likelihood (no sampling, so the verdict is deterministic):
- canary: perplexity of fixed general answers (training/canary.py) must not rise by more than a
  tolerance; this is what stops a poisoned or degenerate dataset;
- preference: on held-out rated turns, mean per-token log-lik of liked replies minus disliked ones must
  not fall below the baseline's;
- FAQ grounding (when there is a FAQ): with a few entries in the prompt, the right entry's answer must be
  the most likely one; accuracy must not fall by more than a tolerance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dialogue.prompt import PromptParts, build_prompt
from dialogue.settings import Settings
from training.canary import CANARY
from training.datasets import Dataset, Example
from training.scoring import collate, completion_logprobs, encode, load_base, set_threads

logger = logging.getLogger(__name__)

BASE = "base"


@dataclass(frozen=True)
class GateConfig:
    canary_tolerance: float = 0.10  # candidate canary perplexity may be at most 10% above the baseline's
    margin_tolerance: float = 0.02  # nats/token the preference margin may lose (noise on small held-out sets)
    faq_tolerance: float = 0.05
    faq_items: int = 20
    batch_size: int = 8
    max_len: int = 384


def _score(model, tokenizer, pairs: list[tuple[list[dict], str]], config: GateConfig, *, end: bool) -> list[tuple[float, int]]:
    """(sum log p, tokens) of each completion given its messages."""
    encoded = [encode(tokenizer, m, c, max_len=config.max_len, end=end) for m, c in pairs]
    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for start in range(0, len(encoded), config.batch_size):
            sums, counts = completion_logprobs(model, collate(encoded[start:start + config.batch_size],
                                                              tokenizer.pad_token_id))
            out += list(zip(sums.tolist(), counts.tolist()))
    return out


def canary_perplexity(model, tokenizer, system: str, config: GateConfig) -> float:
    """exp(mean NLL per token) of the canary answers' words (the end-of-turn token is left out, so a learned
    house style that would rather add a sign-off does not count as damage)."""
    pairs = [(build_prompt(PromptParts(system=system, user_text=q)), a) for q, a in CANARY]
    scores = _score(model, tokenizer, pairs, config, end=False)
    return math.exp(-sum(s for s, _ in scores) / max(sum(n for _, n in scores), 1))


def preference(model, tokenizer, heldout: list[Example], config: GateConfig) -> dict[str, Any]:
    """Mean per-token log-lik of held-out liked and disliked replies, and their difference."""
    scores = _score(model, tokenizer, [(e.messages, e.completion) for e in heldout], config, end=True)
    liked = [s / max(n, 1) for (s, n), e in zip(scores, heldout) if e.desirable]
    disliked = [s / max(n, 1) for (s, n), e in zip(scores, heldout) if not e.desirable]
    out: dict[str, Any] = {"liked_logp": _mean(liked), "disliked_logp": _mean(disliked),
                           "liked": len(liked), "disliked": len(disliked)}
    out["margin"] = (out["liked_logp"] - out["disliked_logp"]) if liked and disliked else None
    return out


def faq_accuracy(model, tokenizer, entries: list[dict], system: str, config: GateConfig,
                 pool: list[dict]) -> float | None:
    """Share of questions whose own entry's answer is the most likely of the entries in context."""
    if len(pool) < 2 or not entries:
        return None
    correct = 0
    items = entries[: config.faq_items]
    for n, item in enumerate(items):
        others = [e for e in pool if e["id"] != item["id"]]
        context = [item] + [others[(n + k) % len(others)] for k in range(min(2, len(others)))]
        context = context[n % len(context):] + context[: n % len(context)]  # the right entry is not always first
        messages = build_prompt(PromptParts(system=system, user_text=item["question"], faq=context))
        scores = _score(model, tokenizer, [(messages, e["answer"]) for e in context], config, end=True)
        best = max(range(len(context)), key=lambda i: scores[i][0] / max(scores[i][1], 1))
        correct += context[best]["id"] == item["id"]
    return correct / len(items)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure(model, tokenizer, dataset: Dataset, system: str, config: GateConfig) -> dict[str, Any]:
    faq_items = dataset.faq_eval if len(dataset.faq_eval) >= 3 else dataset.faq_all
    pref = preference(model, tokenizer, dataset.heldout, config) if dataset.heldout else {}
    return {
        "canary_ppl": canary_perplexity(model, tokenizer, system, config),
        "pref_margin": pref.get("margin"),
        "liked_logp": pref.get("liked_logp"),
        "disliked_logp": pref.get("disliked_logp"),
        "faq_accuracy": faq_accuracy(model, tokenizer, faq_items, system, config, dataset.faq_all),
    }


def run_gate(settings: Settings, dataset: Dataset, candidate: Path, baseline: tuple[str, Path] | None,
             config: GateConfig = GateConfig()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(gate verdict, candidate metrics): candidate vs `baseline` (name, path), or vs the base model."""
    from peft import PeftModel

    set_threads(settings)
    base, tokenizer = load_base(settings)
    model = PeftModel.from_pretrained(base, candidate, adapter_name="candidate")
    if baseline is not None:
        model.load_adapter(baseline[1], adapter_name="baseline")
    model.eval()
    system = settings.system_prompt
    model.set_adapter("candidate")
    cand = measure(model, tokenizer, dataset, system, config)
    base_model_canary = None
    if baseline is not None:
        model.set_adapter("baseline")
        base_metrics = measure(model, tokenizer, dataset, system, config)
        with model.disable_adapter():  # the canary's anchor: the base model, so drift cannot ratchet version by version
            base_model_canary = canary_perplexity(model, tokenizer, system, config)
    else:
        with model.disable_adapter():
            base_metrics = measure(model, tokenizer, dataset, system, config)
    return (verdict(cand, base_metrics, baseline[0] if baseline else BASE, config, base_model_canary=base_model_canary),
            _rounded(cand))


def verdict(cand: dict[str, Any], base: dict[str, Any], baseline_name: str, config: GateConfig, *,
            base_model_canary: float | None = None) -> dict[str, Any]:
    """Pass only if no check got worse than its tolerance; each check says what it compared.

    The canary is held against the serving baseline and, when that is an adapter, against the base model too
    (`base_model_canary`): each version may drift up to the tolerance from the one before, never further in all."""
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    ratio = cand["canary_ppl"] / base["canary_ppl"]
    checks["canary"] = {"candidate_ppl": cand["canary_ppl"], "baseline_ppl": base["canary_ppl"], "ratio": ratio,
                        "tolerance": config.canary_tolerance, "passed": ratio <= 1 + config.canary_tolerance}
    if not checks["canary"]["passed"]:
        reasons.append(f"canary perplexity rose {ratio - 1:.0%} (tolerance {config.canary_tolerance:.0%})")
    if base_model_canary is not None:
        drift = cand["canary_ppl"] / base_model_canary
        checks["canary_base"] = {"candidate_ppl": cand["canary_ppl"], "base_model_ppl": base_model_canary,
                                 "ratio": drift, "passed": drift <= 1 + config.canary_tolerance}
        if not checks["canary_base"]["passed"]:
            reasons.append(f"canary perplexity is {drift - 1:.0%} above the base model's "
                           f"(tolerance {config.canary_tolerance:.0%})")
    if cand["pref_margin"] is not None and base["pref_margin"] is not None:
        ok = cand["pref_margin"] >= base["pref_margin"] - config.margin_tolerance
        checks["preference"] = {"candidate_margin": cand["pref_margin"], "baseline_margin": base["pref_margin"],
                                "passed": ok}
        if not ok:
            reasons.append("held-out preference margin fell")
    else:
        checks["preference"] = {"skipped": "held-out data lacks liked or disliked replies", "passed": True}
    if cand["faq_accuracy"] is not None and base["faq_accuracy"] is not None:
        ok = cand["faq_accuracy"] >= base["faq_accuracy"] - config.faq_tolerance
        checks["faq"] = {"candidate_accuracy": cand["faq_accuracy"], "baseline_accuracy": base["faq_accuracy"],
                         "passed": ok}
        if not ok:
            reasons.append("FAQ grounding accuracy fell")
    else:
        checks["faq"] = {"skipped": "no FAQ", "passed": True}
    return _rounded({"passed": not reasons, "baseline": baseline_name, "reasons": reasons, "checks": checks})


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
