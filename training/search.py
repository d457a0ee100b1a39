"""Choose the learning rate, epochs and weight of disliked replies by validation, not by a fixed default.

Each trial trains an adapter on the training split and is scored on what the gate will check:
- the held-out preference margin (liked minus disliked per-token log-lik; higher learns the pool's taste; the
  liked replies' log-lik alone when the held-out part has no disliked ones), and
- the canary terms: reference-answer perplexity against the base model's, and the fluency (NLL under the base
  model) of the trial's own greedy replies to the behaviour canaries against the base model's replies, and
- the gate's other behaviour checks on those replies, and on its replies to the held-out split's prompts,
  against the base model's (repetition, echo, persona, …).
A trial whose canary terms use more than `slack` of the gate's tolerances, or that fails a behaviour check, is
infeasible; of the feasible trials the one with the best margin wins. (Picking by margin alone chose the largest
learning rate, whose adapters the gate then rejected for fluency drift: the margin keeps rising while English
degrades.) When no trial is feasible, the gentlest one is kept and the gate decides. The winner's adapter is
kept; the others are deleted.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, replace
from typing import Any

from dialogue.settings import Settings
from training.datasets import Dataset
from memory.loading import BUILD_LOCK
from training.gate import (BEHAVIOUR_TOLERANCES, POOL_TOLERANCES, GateConfig, behaviour_check, behaviour_metrics,
                           canary_conversations, canary_perplexity, generate_replies, pool_conversations, preference,
                           reply_metrics, score_pairs)
from training.scoring import load_base, set_threads
from training.train import TrainConfig, TrainResult, train_adapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchConfig:
    # (learning rate, epochs, weight of the disliked replies' loss)
    grid: tuple[tuple[float, float, float], ...] = ((5e-4, 3.0, 1.0), (1e-3, 3.0, 1.0), (2e-3, 3.0, 1.0))
    slack: float = 0.7  # share of the gate's canary tolerances a trial may use and still count as feasible


def evaluate_trial(settings: Settings, dataset: Dataset, result: TrainResult, gate: GateConfig,
                   base_figures: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trial figures, base model figures): margin, canary perplexity and canary reply fluency."""
    from peft import PeftModel

    base, tokenizer = load_base(settings)
    with BUILD_LOCK:
        model = PeftModel.from_pretrained(base, result.path)
    model.eval()
    system = settings.system_prompt
    conversations = canary_conversations(system)
    pool = pool_conversations(dataset, gate.pool_prompts)

    def figures(with_margin: bool) -> dict[str, Any]:
        replies = generate_replies(model, tokenizer, conversations, gate)
        pool_replies = generate_replies(model, tokenizer, pool, gate) if pool else []
        with model.disable_adapter():
            fluency = score_pairs(model, tokenizer, list(zip(conversations, replies)), gate, end=False)
            pool_fluency = score_pairs(model, tokenizer, list(zip(pool, pool_replies)), gate, end=False)
        behaviour = behaviour_metrics(replies, conversations, fluency)
        out = {"canary_ppl": canary_perplexity(model, tokenizer, system, gate),
               "fluency_nll": behaviour["fluency_nll"], "behaviour": behaviour,
               "on_pool": reply_metrics(pool_replies, pool_fluency) if pool else None}
        if with_margin:  # without held-out disliked replies, the held-out liked replies' log-lik alone
            pref = preference(model, tokenizer, dataset.heldout, gate) if dataset.heldout else {}
            out["margin"] = pref.get("margin") if pref.get("margin") is not None else pref.get("liked_logp")
        return out

    trial = figures(True)
    if base_figures is None:
        with model.disable_adapter():
            base_figures = figures(False)
    return trial, base_figures


def choose_config(settings: Settings, dataset: Dataset, config: TrainConfig, search: SearchConfig = SearchConfig(),
                  gate: GateConfig = GateConfig()) -> tuple[TrainResult, dict[str, Any]]:
    """Train every grid point, keep the best feasible adapter; returns it and the search's record."""
    set_threads(settings)
    fluency_tolerance = BEHAVIOUR_TOLERANCES["fluency_nll"][1]
    trials: list[dict[str, Any]] = []
    results: list[TrainResult] = []
    base_figures = None
    try:
        for learning_rate, epochs, undesirable_weight in search.grid:
            trial_config = replace(config, learning_rate=learning_rate, epochs=epochs,
                                   undesirable_weight=undesirable_weight, max_steps=None)
            result = train_adapter(settings, dataset, trial_config, show_progress=False)
            results.append(result)
            figures, base_figures = evaluate_trial(settings, dataset, result, gate, base_figures)
            ratio = figures["canary_ppl"] / base_figures["canary_ppl"]
            drift = figures["fluency_nll"] - base_figures["fluency_nll"]
            _, failed = behaviour_check(figures["behaviour"], {"base": base_figures["behaviour"]})
            if figures["on_pool"]:
                failed += behaviour_check(figures["on_pool"], {"base": base_figures["on_pool"]}, POOL_TOLERANCES,
                                          "held-out prompts'")[1]
            feasible = (ratio <= 1 + search.slack * gate.canary_base_tolerance
                        and drift <= search.slack * fluency_tolerance and not failed)
            trials.append({"learning_rate": learning_rate, "epochs": epochs, "undesirable_weight": undesirable_weight,
                           "margin": _round(figures["margin"]), "canary_ratio": _round(ratio),
                           "fluency_drift": _round(drift), "behaviour_failed": failed, "feasible": feasible,
                           "train_s": result.metrics["wall_s"]})
            logger.info("search trial %s", trials[-1])
        feasible = [i for i, t in enumerate(trials) if t["feasible"]]
        if feasible:
            best = max(feasible, key=lambda i: trials[i]["margin"] if trials[i]["margin"] is not None else -math.inf)
            why = "best held-out margin among trials within the canary tolerances"
        else:
            best = min(range(len(trials)), key=lambda i: (trials[i]["learning_rate"] * trials[i]["epochs"]))
            why = "no trial within the canary tolerances: the gentlest is kept for the gate to judge"
    except BaseException:
        for result in results:
            shutil.rmtree(result.path, ignore_errors=True)
        raise
    for i, result in enumerate(results):
        if i != best:
            shutil.rmtree(result.path, ignore_errors=True)
    record = {"trials": trials, "chosen": {k: trials[best][k] for k in ("learning_rate", "epochs",
                                                                        "undesirable_weight")},
              "why": why, "base_canary_ppl": _round(base_figures["canary_ppl"]),
              "base_fluency_nll": _round(base_figures["fluency_nll"])}
    return results[best], record


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
