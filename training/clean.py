"""Clean a dataset before training: score every desirable example under the base model and by its source.

Dropped: replies the base model finds far less fluent than ordinary English (per-token NLL over the base
model's own figure on the canary reference answers plus `drop_margin`: gibberish, another script, byte
noise; SmolLM2 scores the canary answers 1.6 nats/token, styled liked replies 3.5-4.3 (short ones up
to 6), gibberish 7.3), replies in no recognisable English, looping replies, insults, and contact details (phone numbers,
e-mail, URLs) that the prompt did not give. Down-weighted: moderately unusual replies (NLL over the soft
margin) and very long ones. Each example's weight is also its source's trust. The thresholds are relative
to the base model's own canary figure, so they hold for the embedded model and a tiny test model alike.

Disliked replies are kept whatever they say: pushing gibberish down teaches nothing harmful. What was dropped
and why is `Dataset.cleaning`, which the lineage in train_meta.json carries and the gate's data check reads.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from dialogue.prompt import PromptParts, build_prompt
from dialogue.settings import Settings
from training.canary import CANARY
from training.datasets import Dataset, Example
from training.gate import GateConfig, score_pairs
from training.scoring import load_base, set_threads
from training.textcheck import common_word_share, insult_count, repetition_rate, ungrounded_contacts, words

logger = logging.getLogger(__name__)

EXEMPT = {"faq"}  # the business's own entries: trusted, never dropped


@dataclass(frozen=True)
class CleanConfig:
    drop_margin: float = 4.5  # nats/token over the base model's canary NLL: dropped as not fluent
    soft_margin: float = 3.0  # ... over this: kept at half weight
    min_common_share: float = 0.15  # share of common English words below which a 6+ word reply is "not English"
    max_repetition: float = 0.3  # share of repeated word trigrams
    long_words: int = 160  # replies longer than this many words are kept at half weight
    source_trust: dict[str, float] = field(default_factory=lambda: {
        "faq": 1.0, "agent": 1.0, "correction": 1.0, "liked": 1.0, "disliked": 1.0})
    batch_size: int = 8
    max_len: int = 384
    keep_records: int = 200  # dropped/down-weighted examples listed by turn id in the lineage


def _nll(model, tokenizer, pairs: list[tuple[list[dict], str]], config: CleanConfig) -> list[float]:
    """Mean NLL per token of each completion (end-of-turn left out) under `model`."""
    scores = score_pairs(model, tokenizer, pairs, GateConfig(batch_size=config.batch_size, max_len=config.max_len),
                         end=False)
    return [-s / max(n, 1) for s, n in scores]


def judge(example: Example, nll: float, reference: float, config: CleanConfig) -> tuple[float, str | None]:
    """(weight, reason): weight 0 with the reason it was dropped, or a down-weight with the reason, or (trust, None)."""
    trust = config.source_trust.get(example.source, 1.0)
    if not example.desirable or example.source in EXEMPT:
        return trust, None
    prompt = "\n".join(m["content"] for m in example.messages)
    text = example.completion
    share = common_word_share(text)
    if nll > reference + config.drop_margin:
        return 0.0, "not fluent under the base model"
    if share is not None and share < config.min_common_share:
        return 0.0, "not recognisable English"
    if repetition_rate(text) > config.max_repetition:
        return 0.0, "repetitive"
    if insult_count(text):
        return 0.0, "insulting"
    if ungrounded_contacts(text, prompt):
        return 0.0, "contact details the prompt did not give"
    if nll > reference + config.soft_margin:
        return trust * 0.5, "unusual under the base model"
    if len(words(text)) > config.long_words:
        return trust * 0.5, "very long"
    return trust, None


def clean_dataset(settings: Settings, dataset: Dataset, config: CleanConfig = CleanConfig(), *,
                  model=None, tokenizer=None) -> Dataset:
    """A copy of `dataset` without the outliers, weights set, and `cleaning` saying what happened and why."""
    if model is None:
        set_threads(settings)
        model, tokenizer = load_base(settings)
    system = settings.system_prompt
    canary = [(build_prompt(PromptParts(system=system, user_text=q)), a) for q, a in CANARY]
    reference = sum(_nll(model, tokenizer, canary, config)) / len(canary)
    examples = dataset.train + dataset.heldout
    scored = [e for e in examples if e.desirable and e.source not in EXEMPT]
    nlls = dict(zip((id(e) for e in scored), _nll(model, tokenizer, [(e.messages, e.completion) for e in scored],
                                                  config)))
    reasons: Counter = Counter()
    records: list[dict[str, Any]] = []
    dropped = downweighted = 0

    def clean(part: list[Example]) -> list[Example]:
        nonlocal dropped, downweighted
        kept = []
        for example in part:
            nll = nlls.get(id(example), math.nan)
            weight, reason = judge(example, nll, reference, config) if id(example) in nlls else (
                config.source_trust.get(example.source, 1.0), None)
            if reason:
                reasons[reason] += 1
                dropped += weight == 0
                downweighted += weight > 0
                if len(records) < config.keep_records:
                    records.append({"turn_id": example.turn_id, "source": example.source, "reason": reason,
                                    "weight": weight, "nll": round(nll, 3)})
            if weight > 0:
                kept.append(replace(example, weight=weight) if weight != example.weight else example)
        return kept

    train, heldout = clean(dataset.train), clean(dataset.heldout)
    values = sorted(nlls.values())
    cleaning = {
        "scored": len(scored), "dropped": dropped, "downweighted": downweighted,
        "dropped_share": round(dropped / len(scored), 4) if scored else 0.0,
        "reasons": dict(reasons), "reference_nll": round(reference, 3),
        "thresholds": {"drop_nll": round(reference + config.drop_margin, 3),
                       "soft_nll": round(reference + config.soft_margin, 3),
                       "min_common_share": config.min_common_share, "max_repetition": config.max_repetition},
        "nll_median": round(values[len(values) // 2], 3) if values else None,
        "examples": records,
    }
    logger.info("cleaning: %d of %d desirable examples dropped, %d down-weighted %s", dropped, len(scored),
                downweighted, dict(reasons))
    return replace(dataset, train=train, heldout=heldout, cleaning=cleaning)
