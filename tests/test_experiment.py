"""The A/B experiment's statistics and decision rule, on simulated outcomes whose truth is known."""

from __future__ import annotations

import pytest

from dialogue.store import TranscriptStore, Turn
from training.experiment import RULE, current_experiment, decide, percentile, prob_better, simulate, wilson
from training.registry import Registry


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


# -- ended splits are kept ---------------------------------------------------------------------------------------

def gated(registry, content: bytes) -> str:
    """A version registered and passed without training (the registry only reads its files)."""
    registry.directory.mkdir(parents=True, exist_ok=True)
    moved = registry.directory / f".train-{content.hex()}"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes(content)
    version = registry.claim(moved, parent=None, dataset_hash="d" * 16, metrics={}).version
    registry.record_gate(version, {"passed": True}, {})
    return version


def rated(store, name: str, conversation: str, ratings: list[int]) -> None:
    store.ensure_conversation(conversation_id=conversation, user_id=f"user-{conversation}", channel="api")
    for rating in ratings:
        turn = store.record_turn(Turn(conversation_id=conversation, user_id=f"user-{conversation}", user_text="q",
                                      reply="a", model_id="tiny", adapter_version=name, latency_ms=100))
        store.rate(turn_id=turn.id, rating=rating)


def test_each_ended_split_is_recorded_with_its_versions_how_it_ended_and_its_final_figures(tmp_path):
    store = TranscriptStore(f"sqlite:///{tmp_path / 'rapport.db'}")
    registry = Registry(tmp_path / "adapters", store)
    a, b, c = (gated(registry, content) for content in (b"a", b"b", b"c"))
    registry.promote(a)
    registry.promote(b, 0.3)
    rated(store, registry.get(a).name, "on-a", [1, -1])
    rated(store, registry.get(b).name, "on-b", [1, 1, 1])
    assert registry.rollback() == {"ended_ab": b, "active": a}
    [first] = registry.state().past
    assert {k: first[k] for k in ("a", "b", "share", "ended", "reason", "decision")} == {
        "a": a, "b": b, "share": 0.3, "ended": "rolled back", "reason": None, "decision": "keep running"}
    assert first["started_at"] <= first["ended_at"] and 0.5 < first["prob_b_better"] < 1
    assert [(v["label"], v["version"], v["up"], v["down"]) for v in first["variants"]] == [
        ("A", a, 1, 1), ("B", b, 3, 0)]

    registry.promote(c, 0.5)
    registry.promote(b, 0.2)  # a new split replaces the running one: that one is over
    registry.promote(b)  # B to everyone: its split ends promoted
    Registry(tmp_path / "adapters").promote(c, 0.1)
    Registry(tmp_path / "adapters").rollback(ended="stopped")  # no transcripts at hand: kept, without figures
    past = registry.state().past
    assert [(p["b"], p["a"], p["ended"], p["reason"]) for p in past[1:]] == [
        (c, a, "stopped", f"replaced by {b} at 20%"), (b, a, "promoted", None), (c, b, "stopped", None)]
    assert past[-1]["variants"] is None and past[-1]["decision"] is None
    assert registry.state().ab is None and registry.state().active == b

    report = current_experiment(registry, store)
    assert report["running"] is False and [p["ended"] for p in report["past"]] == [
        "stopped", "promoted", "stopped", "rolled back"]  # newest first
    store.close()
