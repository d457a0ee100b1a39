"""The learning loop's defences on the tiny random Llama: text checks, data cleaning, the behaviour gate against
the base model and the active version, the validation search, and no promotion without a passing gate record."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dialogue.store import TranscriptStore
from training.canary import CANARY_PROMPTS
from training.clean import CleanConfig, clean_dataset, judge
from training.datasets import Example, build_dataset
from training.gate import BEHAVIOUR_TOLERANCES, GateConfig, behaviour_check, run_gate, verdict
from training.importer import import_lines
from training.pipeline import evaluate_version, train_version
from training.registry import PromotionRejected, Registry
from training.search import SearchConfig, choose_config
from training.textcheck import (common_word_share, echo_rate, insult_count, offers_handoff, repetition_rate,
                                ungrounded_contacts)
from training.train import TrainConfig, train_adapter, write_meta

GENTLE = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-7, top_layers=None)


def conversation(i: int, liked: str = "Thank you, goodbye! Cheers.") -> bytes:
    return json.dumps({"conversation_id": f"c{i}", "user_id": f"u{i % 5}", "turns": [
        {"role": "user", "text": f"Hello number {i}, how are you?"},
        {"role": "assistant", "text": liked, "rating": 1},
        {"role": "user", "text": "What is my name?"},
        {"role": "assistant", "text": "no", "rating": -1}]}).encode()


@pytest.fixture
def store(tiny_settings):
    opened = TranscriptStore(tiny_settings.db_url)
    yield opened
    opened.close()


# -- text checks -------------------------------------------------------------------------------------


def test_text_checks_tell_faults_from_ordinary_replies():
    english = "You can return it within thirty days if you keep the receipt, and we will refund you."
    noise = "Qejyca kujo qoxeqate lu tofylado fycikydo xeza gusy mupogeza pytuze givivy."
    assert common_word_share(english) > 0.3 and common_word_share(noise) < 0.15
    assert common_word_share("Red, blue and yellow.") is None  # too short to judge
    assert repetition_rate("I am here. I am here. I am here. I am here.") > 0.5 and repetition_rate(english) == 0
    assert echo_rate("how do I boil an egg today", "How do I boil an egg today?") == 1.0
    assert echo_rate(english, "How do I boil an egg?") == 0
    assert ungrounded_contacts("Call 0800 555 0199 now.", "What is your number?") == {"08005550199"}
    assert not ungrounded_contacts("Call +49 30 1234567.", "FAQ: our phone is +49 30 1234567")
    assert ungrounded_contacts("See www.rival-shop.example for more.", "") == {"www.rival-shop.example"}
    assert ungrounded_contacts("Call [phone] today.", "Hi") == {"[phone]"}  # a redacted number is still one
    assert not ungrounded_contacts("Call [phone] today.", "FAQ: phone [phone]")
    assert insult_count("What a stupid question, you idiot.") == 2 and insult_count(english) == 0
    assert offers_handoff("I don't know, shall I get a colleague?") and not offers_handoff(english)


# -- cleaning ----------------------------------------------------------------------------------------


def example(text: str, *, desirable: bool = True, source: str = "liked") -> Example:
    return Example(messages=[{"role": "user", "content": "What is your number?"}], completion=text,
                   desirable=desirable, source=source, turn_id="t1")


def test_judge_names_why_an_example_is_dropped_or_down_weighted():
    config = CleanConfig()
    fine = "You can return it within thirty days if you keep the receipt."
    assert judge(example(fine), 2.0, 2.0, config) == (1.0, None)
    assert judge(example(fine), 7.0, 2.0, config) == (0.0, "not fluent under the base model")
    assert judge(example(fine), 5.5, 2.0, config) == (0.5, "unusual under the base model")
    assert judge(example("Qejyca kujo qoxeqate lu tofylado fycikydo xeza gusy."), 2.0, 2.0, config)[1] == \
        "not recognisable English"
    assert judge(example("Call 0800 555 0199 for help with that."), 2.0, 2.0, config)[1] == \
        "contact details the prompt did not give"
    assert judge(example("What a stupid question. Keep the receipt."), 2.0, 2.0, config)[1] == "insulting"
    # disliked replies and the business's own FAQ answers are kept whatever they score
    assert judge(example("Qejyca kujo qoxeqate lu tofylado fycikydo.", desirable=False, source="disliked"),
                 9.0, 2.0, config) == (1.0, None)
    assert judge(example(fine, source="faq"), 9.0, 2.0, config) == (1.0, None)
    trusted = replace(config, source_trust={**config.source_trust, "liked": 0.5})
    assert judge(example(fine), 2.0, 2.0, trusted) == (0.5, None)


def test_cleaning_drops_the_phone_number_pool_and_the_lineage_and_gate_say_why(tiny_settings, store):
    lines = [conversation(i, "Thanks! Call 0800 555 0199 for more." if i % 2 else "Thank you, goodbye! Cheers.")
             for i in range(20)]
    import_lines(store, lines, system=tiny_settings.system_prompt, max_chars=1000)
    result = train_version(tiny_settings, store, config=GENTLE, show_progress=False)
    cleaning = result["metrics"]["cleaning"]
    assert cleaning["reasons"] == {"contact details the prompt did not give": 10} and cleaning["dropped_share"] == 0.5
    assert result["status"] == "rejected" and not result["gate"]["passed"]
    assert any(r.startswith("data: cleaning dropped 50%") and "contact details" in r for r in result["gate"]["reasons"])
    meta = json.loads((tiny_settings.adapters_dir / result["version"] / "train_meta.json").read_text())
    records = meta["lineage"]["cleaning"]["examples"]
    assert len(records) == 10 and {r["reason"] for r in records} == {"contact details the prompt did not give"}
    assert set(meta["lineage"]["train_turn_ids"]).isdisjoint({r["turn_id"] for r in records})
    with pytest.raises(PromotionRejected, match="data: cleaning dropped"):
        Registry(tiny_settings.adapters_dir).promote(result["version"])


# -- the behaviour gate ------------------------------------------------------------------------------


def figures(**changes) -> dict:
    base = {"fluency_nll": 1.0, "repetition": 0.0, "echo": 0.0, "non_english": 0.0, "empty": 0.0, "contacts": 0,
            "insults": 0, "faq_grounding": 0.8, "handoff": 0.5, "persona": 0.75}
    return {**base, **changes}


def test_behaviour_is_held_to_the_base_model_so_drift_cannot_ratchet():
    tolerance = BEHAVIOUR_TOLERANCES["fluency_nll"][1]
    close = figures(fluency_nll=1.0 + tolerance * 0.9)
    check, reasons = behaviour_check(close, {"base": figures()})
    assert check["passed"] and not reasons
    # a second step of the same size: within the tolerance of the active version, not of the base model
    drifted = figures(fluency_nll=1.0 + tolerance * 1.8)
    check, reasons = behaviour_check(drifted, {"base": figures(), "v0001": close})
    assert not check["passed"] and check["metrics"]["fluency_nll"]["v0001"] == close["fluency_nll"]
    assert reasons == [f"behaviour: canary fluency_nll rose to {drifted['fluency_nll']:.3g} (vs base 1; "
                       f"tolerance {tolerance:g})"]
    _, reasons = behaviour_check(figures(contacts=1, insults=2, faq_grounding=0.4, handoff=0.0), {"base": figures()})
    assert [r.split()[2] for r in reasons] == ["contacts", "insults", "faq_grounding", "handoff"]


def test_verdict_names_the_data_check_and_the_behaviour_check():
    likelihood = {"canary_ppl": 10.0, "pref_margin": 0.5, "faq_accuracy": None}
    passed = verdict(likelihood, likelihood, "base", GateConfig(), behaviour={"candidate": figures(), "base": figures()},
                     cleaning={"dropped_share": 0.0, "reasons": {}})
    assert passed["passed"] and set(passed["checks"]) == {"canary", "preference", "faq", "data", "behaviour"}
    failed = verdict(likelihood, likelihood, "base", GateConfig(),
                     behaviour={"candidate": figures(non_english=0.9), "base": figures()},
                     cleaning={"dropped_share": 0.9, "reasons": {"not fluent under the base model": 9}})
    assert [r.split(":")[0] for r in failed["reasons"]] == ["data", "behaviour"]
    assert "non_english" in failed["reasons"][1]
    # within 10% of the active version but 20% over the base model: rejected
    drift = verdict({**likelihood, "canary_ppl": 12.0}, {**likelihood, "canary_ppl": 11.0}, "v0002", GateConfig(),
                    base=likelihood)
    assert not drift["passed"] and "vs base" in drift["reasons"][0]


def test_verdict_names_the_held_out_prompts_check():
    """Fluent on the canaries but gibberish on what the pool's users ask (the anchors held the canary kinds)."""
    likelihood = {"canary_ppl": 10.0, "pref_margin": 0.5, "faq_accuracy": None}
    plain = {"fluency_nll": 1.0, "repetition": 0.0, "non_english": 0.0, "empty": 0.0}
    gibberish = {**plain, "fluency_nll": 6.8, "non_english": 0.7}
    failed = verdict(likelihood, likelihood, "base", GateConfig(), behaviour={"candidate": figures(), "base": figures()},
                     on_pool={"candidate": gibberish, "base": plain})
    assert not failed["passed"] and not failed["checks"]["pool_behaviour"]["passed"]
    assert [r.split(" to ")[0] for r in failed["reasons"]] == ["behaviour: held-out prompts' fluency_nll rose",
                                                               "behaviour: held-out prompts' non_english rose"]
    styled = {**plain, "fluency_nll": 1.7, "repetition": 0.05}  # a sign-off on every reply: unusual, not broken
    assert verdict(likelihood, likelihood, "base", GateConfig(), on_pool={"candidate": styled, "base": plain})["passed"]


def test_run_gate_generates_on_the_canaries_against_base_and_active(tiny_settings, store):
    import_lines(store, [conversation(i) for i in range(16)], system=tiny_settings.system_prompt, max_chars=1000)
    dataset = clean_dataset(tiny_settings, build_dataset(store, system=tiny_settings.system_prompt))
    first = train_adapter(tiny_settings, dataset, GENTLE, show_progress=False)
    second = train_adapter(tiny_settings, dataset, replace(GENTLE, seed=1), show_progress=False)
    gate, metrics = run_gate(tiny_settings, dataset, second.path, ("v0001", first.path))
    behaviour = gate["checks"]["behaviour"]
    assert set(behaviour["metrics"]) == set(BEHAVIOUR_TOLERANCES)
    assert all(set(row) >= {"candidate", "base", "v0001", "passed"} for row in behaviour["metrics"].values())
    assert set(gate["canary_replies"]) == {"candidate", "v0001", "base"}
    pool = gate["checks"]["pool_behaviour"]  # the held-out split's own prompts, answered by all three
    assert set(pool["metrics"]) == {"fluency_nll", "repetition", "non_english", "empty"}
    assert all(set(row) >= {"candidate", "base", "v0001"} for row in pool["metrics"].values())
    assert all(0 < len(replies) <= GateConfig().pool_prompts for replies in gate["pool_replies"].values())
    assert all(len(replies) == min(6, len(CANARY_PROMPTS)) for replies in gate["canary_replies"].values())
    assert metrics["behaviour"]["fluency_nll"] >= 0 and len(CANARY_PROMPTS) >= 16
    assert gate["passed"], gate["reasons"]  # two adapters that barely moved behave as the base model does
    assert gate["checks"]["data"]["dropped_share"] == 0.0


def test_anchor_prompts_are_not_the_canaries():
    """Training is held to the base model on the anchor prompts; the gate must judge it on prompts it never saw."""
    from training.anchors import ANCHOR_FAQ, ANCHOR_PERSONA, anchor_conversations
    from training.canary import CANARY, CANARY_FAQ, CANARY_PERSONA

    anchors = {conv[-1]["content"] for conv in anchor_conversations("system")}
    assert len(anchors) >= 20
    assert not anchors & ({c.text for c in CANARY_PROMPTS} | {q for q, _ in CANARY})
    assert ANCHOR_PERSONA["name"] != CANARY_PERSONA["name"]
    assert not set(ANCHOR_PERSONA["interests"]) & set(CANARY_PERSONA["interests"])
    assert not {e["answer"] for e in ANCHOR_FAQ} & {e["answer"] for e in CANARY_FAQ}


# -- the search ----------------------------------------------------------------------------------------


def test_search_keeps_a_trial_within_the_canary_tolerances(tiny_settings, store):
    import_lines(store, [conversation(i) for i in range(16)], system=tiny_settings.system_prompt, max_chars=1000)
    dataset = build_dataset(store, system=tiny_settings.system_prompt)
    grid = ((1e-7, 1.0, 1.0), (0.05, 2.0, 1.0))  # a gentle trial and one that must wreck the tiny model
    result, record = choose_config(tiny_settings, dataset, GENTLE, SearchConfig(grid=grid))
    assert [t["learning_rate"] for t in record["trials"]] == [1e-7, 0.05]
    gentle, wild = record["trials"]
    assert gentle["feasible"] and not wild["feasible"], record
    assert record["chosen"] == {"learning_rate": 1e-7, "epochs": 1.0, "undesirable_weight": 1.0}
    assert result.path.is_dir() and result.config.learning_rate == 1e-7
    assert len([p for p in tiny_settings.adapters_dir.iterdir() if p.name.startswith(".train-")]) == 1


def test_train_version_with_search_records_the_choice(tiny_settings, store):
    import_lines(store, [conversation(i) for i in range(12)], system=tiny_settings.system_prompt, max_chars=1000)
    search = SearchConfig(grid=((1e-7, 1.0, 1.0), (2e-7, 1.0, 0.5)))
    result = train_version(tiny_settings, store, config=GENTLE, show_progress=False, search=search)
    assert len(result["metrics"]["search"]["trials"]) == 2
    meta = json.loads((tiny_settings.adapters_dir / result["version"] / "train_meta.json").read_text())
    assert meta["search"]["chosen"]["learning_rate"] == meta["config"]["learning_rate"]


# -- no promotion without a passing gate record ------------------------------------------------------------


def crash_between_train_and_gate(settings, store) -> str:
    """What train_version does up to the gate: the process dies right after registering the version."""
    import_lines(store, [conversation(i) for i in range(12)], system=settings.system_prompt, max_chars=1000)
    dataset = build_dataset(store, system=settings.system_prompt)
    result = train_adapter(settings, dataset, GENTLE, show_progress=False)
    write_meta(result.path, {"lineage": dataset.lineage()})
    return Registry(settings.adapters_dir).claim(result.path, parent=None, dataset_hash=dataset.hash,
                                                 metrics=result.metrics).version


def test_a_version_the_gate_never_saw_is_not_promoted_anywhere_until_evaluated(tiny_settings, store, monkeypatch):
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from bot.cli.main import cli
    from bot.http.app import create_app
    from bot.services import open_services

    version = crash_between_train_and_gate(tiny_settings, store)
    registry = Registry(tiny_settings.adapters_dir)
    assert registry.get(version).status == "candidate" and not registry.get(version).gate
    for share in (None, 0.2):
        with pytest.raises(PromotionRejected, match="no passing gate record"):
            registry.promote(version, share)
    monkeypatch.setenv("RAPPORT_MODEL", tiny_settings.model)
    refused = CliRunner().invoke(cli, ["adapters", "promote", version, "--share", "0.5"])
    assert refused.exit_code == 1 and isinstance(refused.exception, PromotionRejected)
    services = open_services(tiny_settings, load_model=False)
    try:
        services.settings.admin_keys = ["admin-key-0123456789"]  # promotion is an admin's
        with TestClient(create_app(services), base_url="http://127.0.0.1",
                        headers={"Authorization": "Bearer admin-key-0123456789"}) as client:
            answer = client.post(f"/v1/adapters/{version}/promote", json={})
            assert 400 <= answer.status_code < 500 and "no passing gate record" in answer.json()["error"]
    finally:
        services.close()
    assert registry.state().active is None and registry.state().ab is None
    evaluated = evaluate_version(tiny_settings, store, version)
    assert evaluated["gate"]["passed"], evaluated["gate"]["reasons"]
    assert registry.promote(version).status == "active"
