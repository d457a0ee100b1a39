"""The evaluation gate: a candidate adapter against the base model and the active version.

Likelihood checks (on data the candidate never saw):
- canary: perplexity of fixed general answers (training/canary.py) must not rise by more than a tolerance
  over the base model's nor over the active version's;
- preference: on held-out rated turns, mean per-token log-lik of liked replies minus disliked ones must
  not fall below the serving baseline's;
- FAQ grounding (when there is a FAQ): the right entry's answer must stay the most likely one.
A data check: the cleaning step (training/clean.py) may drop at most a small share of the liked replies;
a pool where many are gibberish, insults or strange phone numbers is a rating campaign, not a style.
Behaviour checks: the candidate answers the fixed canary prompts (`CANARY_PROMPTS`: small talk, personal,
FAQ, unknown; never user feedback) greedily, and its replies are measured (training/textcheck.py, and
per-token NLL under the base model for fluency) against the base model's and the active version's replies
to the same prompts; and its replies to the pool's own held-out prompts must stay as fluent, non-repeating English
as theirs. Every tolerance is against both, so versions cannot drift a tolerance at a time.
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
from memory.loading import BUILD_LOCK
from training.canary import CANARY, CANARY_FAQ, CANARY_PERSONA, CANARY_PROMPTS
from training.datasets import Dataset, Example
from training.scoring import collate, completion_logprobs, encode, greedy_replies, load_base, set_threads
from training.textcheck import (common_word_share, echo_rate, insult_count, offers_handoff, repetition_rate,
                                ungrounded_contacts)

logger = logging.getLogger(__name__)

BASE = "base"


# Behaviour tolerances: (metric, direction, allowed change) against the base model's and the active version's
# figure. Rates are shares of the canary prompts of that kind (4-5 each: one reply in either direction is
# 0.2-0.25); fluency is nats/token of the replies under the base model (greedy replies of the base model itself
# score ~1 nat, human-written liked replies 3.5-4, gibberish over 7).
BEHAVIOUR_TOLERANCES: dict[str, tuple[str, float]] = {
    "fluency_nll": ("lower", 1.5),
    "repetition": ("lower", 0.10),
    "echo": ("lower", 0.10),
    "non_english": ("lower", 0.12),
    "empty": ("lower", 0.06),
    "contacts": ("lower", 0.0),
    "insults": ("lower", 0.0),
    "faq_grounding": ("higher", 0.2),
    "handoff": ("higher", 0.25),
    "persona": ("higher", 0.25),
}


# On the pool's own held-out prompts only what needs no expected answer is checked: that the candidate still
# answers them in fluent, non-repeating English. The canaries alone missed a pool of gibberish liked replies once
# training held the adapter to the base model on prompts like the canaries (training/anchors.py): the canary
# replies stayed fluent while 7 of 10 fresh how-to questions were answered in gibberish.
POOL_TOLERANCES: dict[str, tuple[str, float]] = {k: BEHAVIOUR_TOLERANCES[k]
                                                 for k in ("fluency_nll", "repetition", "non_english", "empty")}


@dataclass(frozen=True)
class GateConfig:
    canary_tolerance: float = 0.10  # canary perplexity may be at most 10% above the active version's
    canary_base_tolerance: float = 0.15  # ... and at most 15% above the base model's
    max_drop_share: float = 0.25  # the cleaning step may drop at most this share of the desirable examples
    behaviour: bool = True  # generate on the canary prompts (off only for likelihood-only evaluation)
    canary_new_tokens: int = 40
    pool_prompts: int = 12  # held-out prompts of the pool the candidate also answers (0 = none)
    repetition_penalty: float = 1.1
    margin_tolerance: float = 0.02  # nats/token the preference margin may lose (noise on small held-out sets)
    faq_tolerance: float = 0.05
    faq_items: int = 20
    batch_size: int = 8
    max_len: int = 384


def score_pairs(model, tokenizer, pairs: list[tuple[list[dict], str]], config: GateConfig, *, end: bool) -> list[tuple[float, int]]:
    """(sum log p, tokens) of each completion given its messages; (0, 0) for an empty one."""
    encoded = [encode(tokenizer, m, c, max_len=config.max_len, end=end) for m, c in pairs]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    todo = [i for i, item in enumerate(encoded) if item.n_completion]
    with torch.no_grad():
        for start in range(0, len(todo), config.batch_size):
            chunk = todo[start:start + config.batch_size]
            sums, counts = completion_logprobs(model, collate([encoded[i] for i in chunk], tokenizer.pad_token_id))
            for i, s, n in zip(chunk, sums.tolist(), counts.tolist()):
                out[i] = (s, n)
    return out


def canary_perplexity(model, tokenizer, system: str, config: GateConfig) -> float:
    """exp(mean NLL per token) of the canary answers' words (the end-of-turn token is left out, so a learned
    house style that would rather add a sign-off does not count as damage)."""
    pairs = [(build_prompt(PromptParts(system=system, user_text=q)), a) for q, a in CANARY]
    scores = score_pairs(model, tokenizer, pairs, config, end=False)
    return math.exp(-sum(s for s, _ in scores) / max(sum(n for _, n in scores), 1))


def preference(model, tokenizer, heldout: list[Example], config: GateConfig) -> dict[str, Any]:
    """Mean per-token log-lik of held-out liked and disliked replies, and their difference."""
    scores = score_pairs(model, tokenizer, [(e.messages, e.completion) for e in heldout], config, end=True)
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
        scores = score_pairs(model, tokenizer, [(messages, e["answer"]) for e in context], config, end=True)
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


def canary_conversations(system: str) -> list[list[dict]]:
    """The behaviour canaries as chat messages: the fixed FAQ or persona in context where the kind asks."""
    return [build_prompt(PromptParts(system=system, user_text=c.text, faq=list(CANARY_FAQ) if c.faq else [],
                                     persona=dict(CANARY_PERSONA) if c.persona else {}))
            for c in CANARY_PROMPTS]


def generate_replies(model, tokenizer, conversations: list[list[dict]], config: GateConfig) -> list[str]:
    """Greedy replies of the model as it is set now (adapter or not)."""
    return [text for text, _ in greedy_replies(model, tokenizer, conversations, max_new_tokens=config.canary_new_tokens,
                                               repetition_penalty=config.repetition_penalty,
                                               batch_size=config.batch_size * 2)]


def reply_metrics(replies: list[str], fluency: list[tuple[float, int]]) -> dict:
    """What any set of replies is held to: fluency under the base model, loops, language, emptiness."""
    languages = [x for x in map(common_word_share, replies) if x is not None]
    return {
        "fluency_nll": -sum(s for s, _ in fluency) / max(sum(n for _, n in fluency), 1),
        "repetition": _mean([repetition_rate(r) for r in replies]) or 0.0,
        "non_english": sum(x < 0.15 for x in languages) / max(len(languages), 1),
        "empty": sum(not r for r in replies) / max(len(replies), 1),
    }


def behaviour_metrics(replies: list[str], conversations: list[list[dict]], fluency: list[tuple[float, int]]) -> dict:
    """The canary replies' figures: fluency under the base model, text faults, and each kind's success rate."""
    def share(kind: str, ok) -> float:
        items = [(c, r) for c, r in zip(CANARY_PROMPTS, replies) if c.kind == kind]
        return sum(bool(ok(c, r)) for c, r in items) / max(len(items), 1)

    prompts = ["\n".join(m["content"] for m in conv) for conv in conversations]
    return {
        **reply_metrics(replies, fluency),
        "echo": _mean([echo_rate(r, c.text) for c, r in zip(CANARY_PROMPTS, replies)]) or 0.0,
        "contacts": sum(len(ungrounded_contacts(r, p)) for r, p in zip(replies, prompts)),
        "insults": sum(insult_count(r) for r in replies),
        "faq_grounding": share("faq", lambda c, r: any(e in r.lower() for e in c.expect)),
        "handoff": share("unknown", lambda c, r: offers_handoff(r)),
        "persona": share("personal", lambda c, r: any(e in r.lower() for e in c.expect)),
    }


def pool_conversations(dataset: Dataset, limit: int) -> list[list[dict]]:
    """Up to `limit` distinct prompts of the held-out split (what users asked; their replies are not used)."""
    seen: dict[str, list[dict]] = {}
    for example in dataset.heldout:
        seen.setdefault(example.messages[-1]["content"], example.messages)
    return list(seen.values())[:limit]


def behaviour_check(cand: dict, references: dict[str, dict], tolerances: dict[str, tuple[str, float]] = BEHAVIOUR_TOLERANCES,
                    what: str = "canary") -> tuple[dict, list[str]]:
    """Each metric against every reference (base model, active version) with its tolerance."""
    check: dict[str, Any] = {"tolerances": {k: v[1] for k, v in tolerances.items()}, "metrics": {}}
    reasons = []
    for metric, (direction, tolerance) in tolerances.items():
        row = {"candidate": cand[metric], **{name: ref[metric] for name, ref in references.items()}}
        failed = [name for name, ref in references.items()
                  if (cand[metric] > ref[metric] + tolerance + 1e-9 if direction == "lower"
                      else cand[metric] < ref[metric] - tolerance - 1e-9)]
        row["passed"] = not failed
        check["metrics"][metric] = row
        if failed:
            worse = "rose" if direction == "lower" else "fell"
            reasons.append(f"behaviour: {what} {metric} {worse} to {cand[metric]:.3g} "
                           f"(vs {', '.join(f'{n} {references[n][metric]:.3g}' for n in failed)}; "
                           f"tolerance {tolerance:g})")
    check["passed"] = not reasons
    return check, reasons


def run_gate(settings: Settings, dataset: Dataset, candidate: Path, baseline: tuple[str, Path] | None,
             config: GateConfig = GateConfig()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(gate verdict, candidate metrics): the candidate against the base model and `baseline` (name, path)."""
    from peft import PeftModel

    set_threads(settings)
    base, tokenizer = load_base(settings)
    with BUILD_LOCK:
        model = PeftModel.from_pretrained(base, candidate, adapter_name="candidate")
        if baseline is not None:
            model.load_adapter(baseline[1], adapter_name="baseline")
    model.eval()
    system = settings.system_prompt
    conversations = canary_conversations(system)
    pool = pool_conversations(dataset, config.pool_prompts) if config.behaviour else []
    replies: dict[str, list[str]] = {}
    pool_replies: dict[str, list[str]] = {}
    measured: dict[str, dict[str, Any]] = {}

    def answer(name: str) -> None:
        if config.behaviour:
            replies[name] = generate_replies(model, tokenizer, conversations, config)
            pool_replies[name] = generate_replies(model, tokenizer, pool, config) if pool else []

    for name in ["candidate"] + (["baseline"] if baseline is not None else []):
        model.set_adapter(name)
        measured[name] = measure(model, tokenizer, dataset, system, config)
        answer(name)
    behaviour: dict[str, dict] = {}
    on_pool: dict[str, dict] = {}
    with model.disable_adapter():
        measured[BASE] = measure(model, tokenizer, dataset, system, config)
        answer(BASE)
        for name, texts in replies.items():
            fluency = score_pairs(model, tokenizer, list(zip(conversations, texts)), config, end=False)
            behaviour[name] = behaviour_metrics(texts, conversations, fluency)
            if pool:
                fluency = score_pairs(model, tokenizer, list(zip(pool, pool_replies[name])), config, end=False)
                on_pool[name] = reply_metrics(pool_replies[name], fluency)
    names = {"candidate": "candidate", "baseline": baseline[0] if baseline else None, BASE: BASE}
    result = verdict(measured["candidate"], measured["baseline"] if baseline else measured[BASE],
                     baseline[0] if baseline else BASE, config, base=measured[BASE],
                     behaviour={names[k]: v for k, v in behaviour.items()} or None,
                     on_pool={names[k]: v for k, v in on_pool.items()} or None, cleaning=dataset.cleaning)
    if config.behaviour:
        result["canary_replies"] = {names[k]: v[:6] for k, v in replies.items()}  # a sample, for the record
        result["pool_replies"] = {names[k]: v[:4] for k, v in pool_replies.items()}
    metrics = {**measured["candidate"], **({"behaviour": behaviour["candidate"]} if behaviour else {})}
    return _rounded(result), _rounded(metrics)


def verdict(cand: dict[str, Any], ref: dict[str, Any], baseline_name: str, config: GateConfig, *,
            base: dict[str, Any] | None = None, behaviour: dict[str, dict] | None = None,
            on_pool: dict[str, dict] | None = None, cleaning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pass only if no check got worse than its tolerance; each check says what it compared.

    `ref` is the serving baseline (the active version, or the base model); `base` the base model's figures when
    the baseline is a version; `behaviour` maps "candidate", the baseline's name and "base" to canary metrics,
    `on_pool` to the reply metrics on the pool's held-out prompts.
    """
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    base = base if base is not None else ref
    ratio = cand["canary_ppl"] / ref["canary_ppl"]
    base_ratio = cand["canary_ppl"] / base["canary_ppl"]
    ok = base_ratio <= 1 + config.canary_base_tolerance and (ref is base or ratio <= 1 + config.canary_tolerance)
    checks["canary"] = {"candidate_ppl": cand["canary_ppl"], "baseline_ppl": ref["canary_ppl"],
                        "base_ppl": base["canary_ppl"], "ratio": ratio, "base_ratio": base_ratio,
                        "tolerance": config.canary_tolerance, "base_tolerance": config.canary_base_tolerance,
                        "passed": ok}
    if not ok:
        versus = f"{config.canary_tolerance:.0%} vs {baseline_name}, " if baseline_name != BASE else ""
        reasons.append(f"canary perplexity rose {max(ratio, base_ratio) - 1:.0%} "
                       f"(tolerance {versus}{config.canary_base_tolerance:.0%} vs base)")
    if cand["pref_margin"] is not None and ref["pref_margin"] is not None:
        ok = cand["pref_margin"] >= ref["pref_margin"] - config.margin_tolerance
        checks["preference"] = {"candidate_margin": cand["pref_margin"], "baseline_margin": ref["pref_margin"],
                                "tolerance": config.margin_tolerance, "passed": ok}
        if not ok:
            reasons.append("held-out preference margin fell")
    else:
        checks["preference"] = {"skipped": "held-out data lacks liked or disliked replies", "passed": True}
    refs = [x["faq_accuracy"] for x in (ref, base) if x.get("faq_accuracy") is not None]
    if cand["faq_accuracy"] is not None and refs:
        ok = all(cand["faq_accuracy"] >= r - config.faq_tolerance for r in refs)
        checks["faq"] = {"candidate_accuracy": cand["faq_accuracy"], "baseline_accuracy": ref["faq_accuracy"],
                         "base_accuracy": base.get("faq_accuracy"), "passed": ok}
        if not ok:
            reasons.append("FAQ grounding accuracy fell")
    else:
        checks["faq"] = {"skipped": "no FAQ", "passed": True}
    if cleaning is not None:
        share = cleaning.get("dropped_share", 0.0)
        ok = share <= config.max_drop_share
        checks["data"] = {"dropped_share": share, "tolerance": config.max_drop_share,
                          "reasons": cleaning.get("reasons", {}), "passed": ok}
        if not ok:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(cleaning.get("reasons", {}).items(), key=lambda kv: -kv[1]))
            reasons.append(f"data: cleaning dropped {share:.0%} of the desirable examples "
                           f"(tolerance {config.max_drop_share:.0%}; {why})")
    if behaviour:
        references = {k: v for k, v in behaviour.items() if k != "candidate"}
        checks["behaviour"], why = behaviour_check(behaviour["candidate"], references)
        reasons += why
    if on_pool:
        references = {k: v for k, v in on_pool.items() if k != "candidate"}
        checks["pool_behaviour"], why = behaviour_check(on_pool["candidate"], references, POOL_TOLERANCES,
                                                        "held-out prompts'")
        reasons += why
    return _rounded({"passed": not reasons, "baseline": baseline_name, "reasons": reasons, "checks": checks})


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
