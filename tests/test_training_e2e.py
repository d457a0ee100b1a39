"""The learning loop on the real SmolLM2, scaled down: house-style conversations → train → gate → promote →
the style shows on fresh prompts → rollback. The full-size scenario (and the poisoned set) is `rapport bench train`."""

from __future__ import annotations

import pytest

from bench.train import SCENARIO, has_style, scenario_lines, style_rate
from dialogue.model.worker import AdapterRef
from dialogue.settings import Settings
from dialogue.store import TranscriptStore
from training.importer import import_lines
from training.pipeline import train_version
from training.registry import AdapterSelector, Registry
from training.train import TrainConfig

# About 8 minutes on an idle 2-core machine (the gate generates on the canaries, training holds the anchors); 14 when
# another training run shares the cores.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2700)]


def test_house_style_is_learned_gated_promoted_and_rolled_back(real_home):
    settings = Settings(home=real_home, threads=1)
    store = TranscriptStore(settings.db_url)
    lines = scenario_lines("conversations.jsonl", 48)
    report = import_lines(store, lines, system=settings.system_prompt, max_chars=settings.max_message_chars)
    assert report.conversations == 48 and not report.errors
    result = train_version(settings, store, config=TrainConfig(epochs=3, batch_size=4), show_progress=False)
    store.close()
    assert result["gate"]["passed"], result["gate"]
    assert result["gate"]["checks"]["behaviour"]["passed"] and result["gate"]["checks"]["data"]["passed"]
    registry = Registry(settings.adapters_dir)
    registry.promote(result["version"])
    selector = AdapterSelector(settings, make_ref=AdapterRef, interval_s=0)
    served = selector.adapter_for("new-customer")
    assert served.name == result["name"]
    prompts = (SCENARIO / "fresh_prompts.txt").read_text().splitlines()[:5]
    after = style_rate(settings, prompts, served, max_new_tokens=80)
    assert after["rate"] >= 0.6, after
    registry.rollback()
    assert selector.adapter_for("new-customer") is None
    assert not has_style("Plain reply without the line.")
