"""The A/B experiment's statistics and decision rule, on simulated outcomes whose truth is known."""

from __future__ import annotations

import pytest

from training.experiment import RULE, decide, percentile, prob_better, simulate, wilson


def test_wilson_interval_holds_the_rate_and_narrows_with_more_ratings():
    low, high = wilson(70, 100)
    assert low < 0.7 < high and high - low == pytest.approx(0.176, abs=0.005)
    low2, high2 = wilson(700, 1000)
    assert high2 - low2 < (high - low) / 3
    assert wilson(0, 0) is None and wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_percentiles_interpolate():
    assert percentile([], 0.5) is None
    assert percentile([10, 20, 30, 40], 0.5) == 25 and percentile(list(range(101)), 0.95) == 95


def test_the_rule_waits_for_its_minimum_sample_then_calls_clear_differences():
    assert decide(90, 10, 10, 90)[0] == "keep running"  # stark, but under the minimum sample
    assert prob_better(140, 60, 170, 30) > 0.99
    assert decide(140, 60, 180, 20)[0] == "B is better: promote"
    assert decide(180, 20, 140, 60)[0] == "B is worse: stop"
    assert decide(2100, 900, 2100, 900)[0] == "no clear difference: stop"
    assert decide(1000, 400, 1000, 400)[0] == "keep running"


@pytest.mark.parametrize("p_a, p_b, right, at_least", [
    (0.70, 0.75, "B is better: promote", 0.90),
    (0.70, 0.65, "B is worse: stop", 0.90),
    (0.70, 0.70, "no clear difference: stop", 0.93),
])
def test_error_rates_over_simulated_runs_with_a_known_truth(p_a, p_b, right, at_least):
    """Looked at after every 50 ratings a side, as an operator would: the right call in most runs, and a call in
    the wrong direction (promoting a worse B, stopping a better one) almost never."""
    outcome = simulate(p_a, p_b, runs=300, seed=1)
    assert outcome.get(right, 0.0) >= at_least, outcome
    wrong = {"B is better: promote": "B is worse: stop", "B is worse: stop": "B is better: promote"}.get(right)
    if wrong:
        assert outcome.get(wrong, 0.0) <= 0.01, outcome
    else:
        assert outcome.get("B is better: promote", 0.0) <= 0.04, outcome  # false promotions under no difference
    assert outcome["mean_rated_per_side"] <= RULE.max_rated + 50
