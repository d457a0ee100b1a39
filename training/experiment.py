"""The A/B experiment between the active adapter (A, or the base model) and the one served to a share (B).

Per variant, from the stored turns since the split began: conversations, bot turns, thumbs-up rate with a 95 %
Wilson interval, handoff rate (conversations with any handoff), correction rate (per rated turn), p50/p95 latency.

The decision rule, stated once (`RULE`): the thumbs-up rates get Beta(1 + up, 1 + down) posteriors and
P(B better) = P(p_B > p_A) (normal approximation of the two posteriors). With fewer than `min_rated` rated turns
on either side the answer is "keep running". Then P(B better) >= `confidence` says "B is better: promote",
<= 1 - `confidence` says "B is worse: stop", and once both sides have `max_rated` rated turns without either,
"no clear difference: stop" (keep A). The threshold is strict (0.998) because the rule is looked at again and
again as ratings arrive; `simulate` measures its error rates on outcomes with a known truth.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Z95 = 1.959964

Verdict = Literal["keep running", "B is better: promote", "B is worse: stop", "no clear difference: stop"]


@dataclass(frozen=True)
class Rule:
    min_rated: int = 200  # rated turns each side before any verdict
    max_rated: int = 3000  # rated turns each side after which a tie is called
    confidence: float = 0.998  # P(B better) needed to promote (1 - it to stop); strict, as it is looked at often

    def describe(self) -> str:
        return (f"Beta(1+up, 1+down) posterior per variant; P(B better) = P(p_B > p_A). Keep running until both "
                f"have {self.min_rated} rated turns; then promote B at P ≥ {self.confidence:.3f}, stop B at "
                f"P ≤ {1 - self.confidence:.3f}; no clear difference (keep A) once both have {self.max_rated}.")


RULE = Rule()


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a proportion (None without observations)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(values: list[int], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def prob_better(up_a: int, down_a: int, up_b: int, down_b: int) -> float:
    """P(p_B > p_A) under independent Beta(1 + up, 1 + down) posteriors (normal approximation)."""
    def moments(up: int, down: int) -> tuple[float, float]:
        a, b = up + 1, down + 1
        return a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))

    (mean_a, var_a), (mean_b, var_b) = moments(up_a, down_a), moments(up_b, down_b)
    return 0.5 * (1 + math.erf((mean_b - mean_a) / math.sqrt(2 * (var_a + var_b))))


def decide(up_a: int, down_a: int, up_b: int, down_b: int, rule: Rule = RULE) -> tuple[Verdict, float]:
    """The rule's verdict and P(B better)."""
    p = prob_better(up_a, down_a, up_b, down_b)
    rated_a, rated_b = up_a + down_a, up_b + down_b
    if min(rated_a, rated_b) < rule.min_rated:
        return "keep running", p
    if p >= rule.confidence:
        return "B is better: promote", p
    if p <= 1 - rule.confidence:
        return "B is worse: stop", p
    if min(rated_a, rated_b) >= rule.max_rated:
        return "no clear difference: stop", p
    return "keep running", p


@dataclass
class Variant:
    """One side of the split, as measured."""

    label: str  # "A" or "B"
    version: str  # "v0007", or "base"
    name: str  # the serving name turns carry ("" for the base model)
    share: float
    outcomes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        o = self.outcomes
        up, down = o.get("up", 0), o.get("down", 0)
        rated, conversations = up + down, o.get("conversations", 0)
        interval = wilson(up, rated)
        latencies = o.get("latencies_ms", [])
        return {"label": self.label, "version": self.version, "share": self.share,
                "conversations": conversations, "turns": o.get("turns", 0), "rated": rated, "up": up, "down": down,
                "thumbs_up_rate": round(up / rated, 4) if rated else None,
                "thumbs_up_ci95": [round(x, 4) for x in interval] if interval else None,
                "handoff_rate": round(o.get("handoff_conversations", 0) / conversations, 4) if conversations else None,
                "correction_rate": round(o.get("corrections", 0) / rated, 4) if rated else None,
                "latency_p50_ms": percentile(latencies, 0.5), "latency_p95_ms": percentile(latencies, 0.95)}


def experiment_report(state, outcomes: dict[str, dict], rule: Rule = RULE) -> dict[str, Any]:
    """The running split (registry state `state`, per-serving-name `outcomes` since it began) with its verdict."""
    if not state.ab:
        return {"running": False, "rule": rule.describe()}
    active = state.versions.get(state.active) if state.active else None
    candidate = state.versions[state.ab["version"]]
    share = float(state.ab["share"])
    a = Variant("A", active.version if active else "base", active.name if active else "", round(1 - share, 4),
                outcomes.get(active.name if active else "", {}))
    b = Variant("B", candidate.version, candidate.name, share, outcomes.get(candidate.name, {}))
    sa, sb = a.summary(), b.summary()
    verdict, p = decide(sa["up"], sa["down"], sb["up"], sb["down"], rule)
    action = {"B is better: promote": "promote", "B is worse: stop": "stop",
              "no clear difference: stop": "stop"}.get(verdict)
    return {"running": True, "started_at": state.ab.get("started_at"), "variants": [sa, sb],
            "prob_b_better": round(p, 4), "decision": verdict, "action": action, "rule": rule.describe()}


def split_report(state, store, rule: Rule = RULE) -> dict[str, Any]:
    """The running split of registry state `state` measured on `store`'s turns since it began."""
    if not state.ab:
        return experiment_report(state, {}, rule)
    started = state.ab.get("started_at")
    return experiment_report(state, store.variant_outcomes(since=datetime.fromisoformat(started) if started else None),
                             rule)


def current_experiment(registry, store, rule: Rule = RULE) -> dict[str, Any]:
    """The running split of `registry` measured on `store`'s turns since it began, and under `past` the ended ones
    as they were recorded, newest first (the console, `adapters experiment`)."""
    state = registry.state()
    return {**split_report(state, store, rule), "past": state.past[::-1]}


def simulate(p_a: float, p_b: float, *, runs: int = 500, batch: int = 50, rule: Rule = RULE,
             seed: int = 0) -> dict[str, float]:
    """The rule applied after every `batch` ratings per side until it stops, `runs` times, with true thumbs-up
    rates `p_a` and `p_b`: the share of runs ending in each verdict, and the mean ratings per side at the end."""
    rng = random.Random(seed)
    ends: dict[str, int] = {}
    spent = 0
    for _ in range(runs):
        up_a = down_a = up_b = down_b = 0
        while True:
            for _ in range(batch):
                if rng.random() < p_a:
                    up_a += 1
                else:
                    down_a += 1
                if rng.random() < p_b:
                    up_b += 1
                else:
                    down_b += 1
            verdict, _ = decide(up_a, down_a, up_b, down_b, rule)
            if verdict != "keep running":
                break
        ends[verdict] = ends.get(verdict, 0) + 1
        spent += up_a + down_a
    return {**{k: v / runs for k, v in sorted(ends.items())}, "mean_rated_per_side": spent / runs}
