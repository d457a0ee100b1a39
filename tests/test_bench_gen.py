"""The generation benchmarks run end to end on the tiny model (their figures come from `rapport bench`)."""

from __future__ import annotations

import pytest

from bench.gen import full_batch_rate, run_async
from bench.sweep import run as sweep


async def test_bench_gen_reports_cold_turns_the_second_turn_and_a_full_batch_rate(tiny_settings):
    result = await run_async(tiny_settings, prompt_tokens=40, new_tokens=12, concurrency=3, repeats=2)
    assert result["ttft_s"] > 0 and result["decode_tok_s"] > 0 and result["turn_s"] >= result["ttft_s"]
    assert result["full_batch_steps"] > 0 and result["aggregate_tok_s"] > 0
    assert result["second_turn_reused_tokens"] >= 40  # the next turn re-reads none of the first one's prompt
    assert result["peak_rss_mb"] > 0


def test_full_batch_rate_counts_only_steps_with_every_conversation_decoding():
    steps = [(2, 40, 1.0), (3, 0, 0.1), (3, 0, 0.2), (2, 0, 5.0)]
    rate, count = full_batch_rate(steps, 3)
    assert count == 2 and rate == pytest.approx(20.0)
    assert full_batch_rate(steps, 4) == (None, 0)


def test_bench_sweep_draws_its_chart(tiny_settings, tmp_path):
    result = sweep(tiny_settings, [1, 2], prompt_tokens=20, new_tokens=6, plot=tmp_path / "chart.png")
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_compare_pairs_each_round_and_reports_the_medians(tiny_settings, monkeypatch):
    """Rounds of llama.cpp then ours: each ratio is taken within its round (the machine's speed drifts between
    rounds), and the reported figures are the medians."""
    import bench.compare as compare

    speed = iter([1.0, 2.0, 0.5])  # the machine's speed in each round: both sides slow down together
    state = {}

    def theirs(settings, prompt_tokens, new_tokens, repeats, python, lib=None):
        state["speed"] = next(speed)
        return {"ttft_s": 4.0 / state["speed"], "decode_tok_s": 50.0 * state["speed"], "turn_s": 6.0 / state["speed"]}

    def ours(cpu_class, prompt_tokens, new_tokens, concurrency, repeats):
        s = state["speed"]
        return {"cpu_class": "avx2", "ttft_s": 1.0 / s, "decode_tok_s": 60.0 * s, "turn_s": 2.0 / s,
                "second_turn_s": 1.0 / s, "aggregate_tok_s": 180.0 * s if concurrency > 1 else None}

    monkeypatch.setattr(compare, "llamacpp", theirs)
    monkeypatch.setattr(compare, "ours_as", ours)
    result = compare.run(tiny_settings, classes=["native"], rounds=3)
    entry = result["classes"]["native"]
    assert [r["decode_ratio"] for r in entry["rounds"]] == [1.2, 1.2, 1.2]  # the same in every round
    assert entry["ratios"]["decode_ratio"] == 1.2 and entry["ratios"]["aggregate_vs_their_single_stream"] == 3.6
    assert entry["rapport"]["decode_tok_s"] == 60.0 and entry["rapport"]["cpu_class"] == "avx2"  # medians
    assert result["llama_cpp"]["decode_tok_s"] == 50.0
