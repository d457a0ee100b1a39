"""Learning loop on the tiny random Llama: LoRA training, resume, atomic versions, gate, registry, A/B, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dialogue.model.worker import AdapterRef
from dialogue.store import TranscriptStore
from training.datasets import build_dataset
from training.gate import GateConfig, verdict
from training.importer import import_lines
from training.pipeline import train_version
from training.registry import AdapterSelector, PromotionRejected, Registry, ab_bucket, flag_user_erased, read_state
from training.train import TrainConfig, TrainingInterrupted, train_adapter

REPO = Path(__file__).resolve().parent.parent
FAST = TrainConfig(epochs=1, batch_size=4, learning_rate=5e-3, top_layers=None, checkpoint_every=1)


def conversation(i: int, user: str | None = None) -> bytes:
    return json.dumps({"conversation_id": f"c{i}", "user_id": user or f"u{i % 4}", "turns": [
        {"role": "user", "text": f"Hello number {i}, how are you?"},
        {"role": "assistant", "text": "Thank you, goodbye! Cheers.", "rating": 1},
        {"role": "user", "text": "What is my name?"},
        {"role": "assistant", "text": "no", "rating": -1}]}).encode()


@pytest.fixture
def loaded(tiny_settings):
    """Tiny settings and a transcript store holding 24 rated conversations."""
    store = TranscriptStore(tiny_settings.db_url)
    import_lines(store, [conversation(i) for i in range(24)], system=tiny_settings.system_prompt, max_chars=1000)
    yield tiny_settings, store
    store.close()


def dataset_of(settings, store):
    return build_dataset(store, system=settings.system_prompt)


def test_lora_weights_move_and_base_weights_do_not(loaded, tiny_model_dir):
    settings, store = loaded
    result = train_adapter(settings, dataset_of(settings, store), FAST, show_progress=False)
    trained = load_file(result.path / "adapter_model.safetensors")
    assert trained and all("lora_" in name for name in trained)
    lora_b = [t for name, t in trained.items() if "lora_B" in name]
    assert all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: every adapted layer learned something
    base_after = load_file(tiny_model_dir / "model.safetensors")
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(base_after[k], fresh[k]) for k in base_after)


def test_anchor_prompts_hold_the_adapter_to_the_base_model_where_the_pool_says_nothing(loaded):
    """Trained hard on one reply, the adapter drifts from the base model on unrelated prompts; the KL term on the
    anchor prompts (training/anchors.py) holds it closer there, while it still learns the pool."""
    from peft import PeftModel

    from training.scoring import collate, completion_logprobs, encode, load_base
    from training.train import anchor_encoded, anchor_kl

    settings, store = loaded
    data = dataset_of(settings, store)
    drift, learned = {}, {}
    for weight in (0.0, 1.0):
        result = train_adapter(settings, data, replace(FAST, epochs=3, anchor_weight=weight), show_progress=False)
        base, tokenizer = load_base(settings)
        model = PeftModel.from_pretrained(base, result.path)
        anchors = anchor_encoded(model, tokenizer, settings, FAST.max_len)
        assert result.metrics["anchors"] == (len(anchors) if weight else 0) and len(anchors) >= 20
        with torch.no_grad():
            drift[weight] = float(anchor_kl(model, collate(anchors, tokenizer.pad_token_id)))
        liked = [encode(tokenizer, e.messages, e.completion, max_len=FAST.max_len) for e in data.train if e.desirable]
        with torch.no_grad():
            trained, _ = completion_logprobs(model, collate(liked, tokenizer.pad_token_id))
            with model.disable_adapter():
                before, _ = completion_logprobs(model, collate(liked, tokenizer.pad_token_id))
        learned[weight] = float((trained - before).mean())  # the pool's liked replies became more likely
    assert drift[1.0] < 0.5 * drift[0.0], drift
    assert learned[1.0] > 0.5 * learned[0.0] > 0, learned


def test_same_seed_same_weights_and_an_interrupted_run_resumes_to_them(loaded):
    settings, store = loaded
    data = dataset_of(settings, store)
    straight = train_adapter(settings, data, FAST, show_progress=False)
    with pytest.raises(TrainingInterrupted):
        train_adapter(settings, data, FAST, show_progress=False, stop_after=2)
    assert list(settings.adapters_dir.glob(".checkpoints/*/state.pt"))
    resumed = train_adapter(settings, data, FAST, show_progress=False)
    a, b = load_file(straight.path / "adapter_model.safetensors"), load_file(resumed.path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not list(settings.adapters_dir.glob(".checkpoints/*/state.pt"))  # cleaned up once finished


def test_train_version_registers_an_immutable_named_version_with_lineage(loaded):
    settings, store = loaded
    faq = [{"id": f"f{i}", "question": f"When is the shop open on day {i}?", "answer": f"From {i} to {i + 8}."}
           for i in range(6)]
    result = train_version(settings, store, faq_entries=faq, config=FAST, show_progress=False)
    assert result["counts"]["train_faq"] >= 1
    assert 0 <= result["gate"]["checks"]["faq"]["candidate_accuracy"] <= 1  # grounding was measured
    assert result["version"] == "v0001" and result["name"].startswith("v0001-") and len(result["name"]) == 14
    directory = settings.adapters_dir / "v0001"
    assert {p.name for p in directory.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                     "train_meta.json"}
    meta = json.loads((directory / "train_meta.json").read_text())
    assert meta["dataset_hash"] == result["dataset_hash"] and meta["parent"] is None
    assert meta["lineage"]["train_turn_ids"] and meta["libraries"]["peft"] and meta["config"]["rank"] == 8
    assert not [p for p in settings.adapters_dir.iterdir() if p.name.startswith(".train-")]  # no half adapters
    assert set(result["gate"]) >= {"passed", "checks", "reasons"} and "canary_ppl" in result["metrics"]
    assert result["status"] == ("candidate" if result["gate"]["passed"] else "rejected")


def test_gate_verdict_rejects_a_canary_rise_and_a_falling_margin():
    base = {"canary_ppl": 10.0, "pref_margin": 0.5, "faq_accuracy": 0.8}
    good = verdict({"canary_ppl": 10.5, "pref_margin": 0.9, "faq_accuracy": 0.8}, base, "base", GateConfig())
    assert good["passed"] and good["checks"]["faq"]["passed"]
    poisoned = verdict({"canary_ppl": 30.0, "pref_margin": 2.0, "faq_accuracy": 0.8}, base, "base", GateConfig())
    assert not poisoned["passed"] and "canary" in poisoned["reasons"][0]
    worse = verdict({"canary_ppl": 9.0, "pref_margin": 0.1, "faq_accuracy": 0.5}, base, "v0001", GateConfig())
    assert not worse["passed"] and len(worse["reasons"]) == 2 and worse["baseline"] == "v0001"
    no_faq = verdict({"canary_ppl": 9.0, "pref_margin": None, "faq_accuracy": None}, base, "base", GateConfig())
    assert no_faq["passed"] and "skipped" in no_faq["checks"]["faq"]


def test_gate_canary_drift_cannot_ratchet_past_the_base_model():
    """v0001 drifted 9 % from the base model and passed; a candidate 9 % above v0001 is 19 % above the base model."""
    active = {"canary_ppl": 10.9, "pref_margin": 0.5, "faq_accuracy": 0.8}
    candidate = {"canary_ppl": 11.88, "pref_margin": 0.5, "faq_accuracy": 0.8}
    alone = verdict(candidate, active, "v0001", GateConfig())
    assert alone["passed"]  # against the previous version only, the drift would pass
    base = {"canary_ppl": 10.0, "pref_margin": 0.5, "faq_accuracy": 0.8}
    anchored = verdict(candidate, active, "v0001", GateConfig(), base=base)
    assert not anchored["passed"] and not anchored["checks"]["canary"]["passed"]
    assert anchored["checks"]["canary"]["base_ratio"] > 1 + GateConfig().canary_base_tolerance
    assert "vs base" in anchored["reasons"][0]


# -- registry ----------------------------------------------------------------------------------------


def fake_version(registry: Registry, tmp_path: Path, content: bytes, users: list[str] = ()) -> str:
    """A registered adapter directory without training (the registry only needs its files)."""
    from training.datasets import user_hash

    tmp = tmp_path / f"tmp-{content.hex()}"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(content)
    (tmp / "adapter_config.json").write_text("{}")
    (tmp / "train_meta.json").write_text(json.dumps({"lineage": {"user_hashes": [user_hash(u) for u in users]}}))
    registry.directory.mkdir(parents=True, exist_ok=True)
    moved = registry.directory / f".train-{content.hex()}"
    tmp.rename(moved)
    version = registry.claim(moved, parent=None, dataset_hash="d", metrics={}).version
    registry.record_gate(version, {"passed": True, "reasons": []}, {})  # as if the gate had passed it
    return version


def test_a_version_without_a_passing_gate_record_is_never_promoted(tmp_path):
    registry = Registry(tmp_path / "adapters")
    tmp = tmp_path / "ungated"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"w")
    (tmp / "adapter_config.json").write_text("{}")
    registry.directory.mkdir(parents=True)
    ungated = registry.claim(tmp.rename(registry.directory / ".train-ungated"), parent=None, dataset_hash="d",
                             metrics={}).version  # the process died here, before the gate ran
    with pytest.raises(PromotionRejected, match="no passing gate record"):
        registry.promote(ungated)
    registry.record_gate(ungated, {"passed": True}, {})
    assert registry.promote(ungated).status == "active"


def test_registry_transitions_promote_rollback_and_rejected(tmp_path):
    registry = Registry(tmp_path / "adapters")
    v1, v2, v3 = (fake_version(registry, tmp_path, bytes([i])) for i in (1, 2, 3))
    assert (v1, v2, v3) == ("v0001", "v0002", "v0003")
    names = {v.version: v.name for v in registry.state().versions.values()}
    assert len(set(n.split("-")[1] for n in names.values())) == 3  # the weights hash is in the name
    registry.promote("1")
    registry.promote("v0002")
    statuses = {row["version"]: row["status"] for row in registry.list()}
    assert statuses == {"v0001": "retired", "v0002": "active", "v0003": "candidate"}
    registry.record_gate(v3, {"passed": False, "reasons": ["canary perplexity rose 80%"]}, {"canary_ppl": 9.0})
    with pytest.raises(PromotionRejected, match="canary"):
        registry.promote(v3)
    assert registry.rollback() == {"retired": "v0002", "active": "v0001"}
    assert registry.rollback() == {"retired": "v0001", "active": None}
    from memory.errors import NotFound

    with pytest.raises(NotFound):
        registry.rollback()
    with pytest.raises(NotFound):
        registry.promote("v0099")
    assert [row["status"] for row in registry.list()] == ["retired", "retired", "rejected"]


def test_ab_share_is_sticky_per_user_and_roughly_the_share(tmp_path):
    registry = Registry(tmp_path / "adapters")
    v1, v2 = fake_version(registry, tmp_path, b"a"), fake_version(registry, tmp_path, b"b")
    registry.promote(v1)
    registry.promote(v2, share=0.2)
    selector = AdapterSelector(registry.directory, make_ref=AdapterRef, interval_s=0)
    users = [f"user-{i}" for i in range(2000)]
    first = {u: selector.adapter_for(u).name for u in users}
    assert first == {u: selector.adapter_for(u).name for u in users}  # sticky
    share = sum(name.startswith("v0002") for name in first.values()) / len(users)
    assert 0.17 < share < 0.23
    assert all(first[u].startswith("v0002") == (ab_bucket(u, "v0002") < 0.2) for u in users)
    assert {row["version"]: row.get("share") for row in registry.list()} == {"v0001": 0.8, "v0002": 0.2}
    registry.rollback()  # ends the test, keeps v1
    assert {selector.adapter_for(u).name[:5] for u in users} == {"v0001"}


def test_selector_picks_up_changes_and_survives_a_broken_file(tmp_path):
    registry = Registry(tmp_path / "adapters")
    selector = AdapterSelector(registry.directory, make_ref=AdapterRef, interval_s=0)
    assert selector.adapter_for("u") is None  # no registry yet: the base model
    v1 = fake_version(registry, tmp_path, b"x")
    registry.promote(v1)
    ref = selector.adapter_for("u")
    assert ref.name.startswith("v0001-") and ref.path == registry.directory / "v0001"
    cached = AdapterSelector(registry.directory, make_ref=AdapterRef, interval_s=3600)
    assert cached.adapter_for("u") == ref  # reads once ...
    registry.rollback()
    assert cached.adapter_for("u") == ref and selector.adapter_for("u") is None  # ... and not again for a while
    registry.promote(v1)
    assert selector.adapter_for("u") == ref
    (registry.directory / "registry.json").write_text("{broken")
    assert selector.adapter_for("u") == ref  # keeps serving what it had
    from memory.errors import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="damaged"):
        registry.promote(v1)


def _promote_many(directory: str, version: str, n: int) -> None:
    from memory.errors import NotFound

    registry = Registry(Path(directory))
    for _ in range(n):
        registry.promote(version)
        try:
            registry.rollback()
        except NotFound:  # the other process rolled back first: a legitimate outcome of the race
            pass


def test_concurrent_writers_from_other_processes_never_leave_a_broken_state(tmp_path):
    registry = Registry(tmp_path / "adapters")
    v1, v2 = fake_version(registry, tmp_path, b"p"), fake_version(registry, tmp_path, b"q")
    registry.promote(v1)
    workers = [multiprocessing.get_context("fork").Process(target=_promote_many, args=(str(registry.directory), v, 15))
               for v in (v1, v2)]
    for w in workers:
        w.start()
    selector = AdapterSelector(registry.directory, make_ref=AdapterRef, interval_s=0)
    while any(w.is_alive() for w in workers):
        read_state(registry.directory)  # never a half-written file
        selector.adapter_for("u")
    assert all(w.exitcode == 0 for w in workers)
    assert not list(registry.directory.glob(".registry.*"))


def test_erasure_flags_versions_trained_on_the_user_and_blocks_their_promotion(tmp_path):
    registry = Registry(tmp_path / "adapters")
    with_ann = fake_version(registry, tmp_path, b"1", users=["ann", "bob"])
    without = fake_version(registry, tmp_path, b"2", users=["bob"])
    registry.promote(without)
    assert flag_user_erased(registry.directory, "ann") == [with_ann]
    assert flag_user_erased(registry.directory, "ann") == []  # idempotent
    with pytest.raises(PromotionRejected, match="exclude-deleted"):
        registry.promote(with_ann)
    assert registry.state().erased_user_hashes


def test_an_erased_users_version_stops_being_served_at_once_and_is_purged(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bot.cli.main import cli

    registry = Registry(tmp_path / "adapters")
    clean = fake_version(registry, tmp_path, b"1", users=["bob"])
    with_ann = fake_version(registry, tmp_path, b"2", users=["ann", "bob"])
    trial = fake_version(registry, tmp_path, b"3", users=["ann"])
    registry.promote(clean)
    registry.promote(with_ann)
    registry.promote(trial, 0.3)
    assert flag_user_erased(registry.directory, "ann") == [with_ann, trial]
    state = registry.state()
    assert state.active == clean and state.ab is None  # the newest clean version serves again, nobody gets the trial
    assert registry.get(with_ann).status == "retired"
    monkeypatch.setenv("RAPPORT_HOME", str(tmp_path))
    done = CliRunner().invoke(cli, ["adapters", "purge"])
    assert done.exit_code == 0 and with_ann in done.output and trial in done.output
    assert not Path(registry.get(with_ann).path).exists() and Path(registry.get(clean).path).exists()
    assert registry.get(trial).status == "retired" and "purged" in registry.get(trial).flags
    assert "nothing to purge" in CliRunner().invoke(cli, ["adapters", "purge"]).output
    with pytest.raises(PromotionRejected):
        registry.promote(trial)


def test_purge_deletes_the_checkpoints_of_interrupted_runs_on_an_erased_users_data(loaded, monkeypatch):
    from click.testing import CliRunner

    from bot.cli.main import cli
    from training.datasets import user_hash

    settings, store = loaded
    checkpoints = settings.adapters_dir / ".checkpoints"

    def interrupted_run(dataset) -> Path:
        before = set(checkpoints.glob("*")) if checkpoints.exists() else set()
        with pytest.raises(TrainingInterrupted):
            train_adapter(settings, dataset, FAST, show_progress=False, stop_after=1)
        [made] = set(checkpoints.glob("*")) - before
        return made

    with_u1 = interrupted_run(dataset_of(settings, store))
    without_u1 = interrupted_run(build_dataset(store, system=settings.system_prompt,
                                               exclude_user_hashes={user_hash("u1")}))
    older = checkpoints / "0123456789abcdef"  # left by a version that did not record a run's users
    older.mkdir()
    torch.save({"step": 1}, older / "state.pt")
    assert flag_user_erased(settings.adapters_dir, "u1") == []  # no version yet: only checkpoints hold u1's data
    monkeypatch.setenv("RAPPORT_HOME", str(settings.home))
    done = CliRunner().invoke(cli, ["adapters", "purge"])
    assert done.exit_code == 0, done.output
    assert not with_u1.exists() and not older.exists() and (without_u1 / "state.pt").exists()
    assert "nothing to purge" in CliRunner().invoke(cli, ["adapters", "purge"]).output


def test_erased_user_turns_never_reach_a_new_version(loaded):
    settings, store = loaded
    first = train_version(settings, store, config=FAST, show_progress=False)
    assert flag_user_erased(settings.adapters_dir, "u1") == [first["version"]]
    store.delete_user("u1")
    import_lines(store, [conversation(100, user="u1")], system=settings.system_prompt, max_chars=1000)  # re-imported
    second = train_version(settings, store, config=FAST, show_progress=False, exclude_deleted=True)
    meta = json.loads((settings.adapters_dir / second["version"] / "train_meta.json").read_text())
    from training.datasets import lineage_salt, user_hash

    salted = user_hash("u1", lineage_salt(settings.adapters_dir))
    first_meta = json.loads((settings.adapters_dir / first["version"] / "train_meta.json").read_text())
    assert salted in first_meta["lineage"]["user_hashes"]  # lineage names users by this home's salted hash only
    assert user_hash("u1") not in first_meta["lineage"]["user_hashes"] and salted != user_hash("u1")
    assert salted not in meta["lineage"]["user_hashes"] and meta["replaces_erased"] == [first["version"]]
    assert (settings.adapters_dir / "lineage.salt").stat().st_mode & 0o077 == 0


def test_a_version_from_before_the_salt_is_still_flagged_when_its_user_is_erased(tmp_path):
    registry = Registry(tmp_path / "adapters")
    legacy = fake_version(registry, tmp_path, b"old", users=["u7"])  # lineage hashed without a salt
    assert flag_user_erased(registry.directory, "u7") == [legacy]


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_import_train_list_promote_rollback_report(tiny_settings, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bot.cli.main import cli

    for name, value in {"RAPPORT_MODEL": tiny_settings.model, "RAPPORT_DTYPE": "float32", "RAPPORT_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli, list(args), catch_exceptions=True)

    data = tmp_path / "history.jsonl"
    data.write_bytes(b"\n".join(conversation(i) for i in range(16)) + b"\n{oops\n")
    imported = run("transcripts", "import", str(data))
    assert imported.exit_code == 1 and json.loads(imported.stdout.splitlines()[0])["turns"] == 32
    assert "line 17" in imported.stderr
    # One step at the smallest learning rate barely moves the adapter (LoRA's B starts at zero), so the candidate
    # scores as the base model does and the gate passes: deterministic on any machine.
    trained = run("train", "--json", "--max-steps", "1", "--learning-rate", "1e-7", "--no-faq")
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert result["version"] == "v0001" and result["gate"]["passed"] is True and result["metrics"]
    listed = json.loads(run("adapters", "list", "--json").stdout)
    assert [(row["version"], row["status"]) for row in listed] == [("v0001", "candidate")]
    assert all(set(row) >= {"version", "status", "metrics", "created_at"} for row in listed)
    promoted = run("adapters", "promote", "v0001", "--share", "0.5")
    assert promoted.exit_code == 0 and "now serves 50% of users" in promoted.stdout
    [row] = json.loads(run("adapters", "list", "--json").stdout)
    assert row["share"] == 0.5
    rolled = run("adapters", "rollback")
    assert rolled.exit_code == 0 and "ended the A/B test of v0001" in rolled.stdout
    [row] = json.loads(run("adapters", "list", "--json").stdout)
    assert not row.get("share") and row["status"] != "active"
    report = run("adapters", "report", "--json")
    assert Path(json.loads(report.stdout)["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    exported = run("transcripts", "export").stdout.splitlines()
    assert len(exported) == 16 and json.loads(exported[0])["turns"][1]["rating"] == 1


def test_cli_errors_are_one_line_without_a_traceback(home):
    env = {**os.environ, "RAPPORT_HOME": str(home)}
    missing = subprocess.run([str(REPO / ".venv/bin/rapport"), "adapters", "promote", "v0042"], capture_output=True,
                             text=True, env=env, timeout=300)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no adapter version 'v0042'"


async def test_hot_swap_a_running_manager_follows_promote_and_rollback(loaded):
    """Every turn records the adapter that produced it; promote and rollback reach a running manager."""
    from dialogue.model.backend import LocalBackend
    from dialogue.manager import DialogueManager

    settings, store = loaded
    result = train_version(settings, store, config=FAST, show_progress=False)
    registry = Registry(settings.adapters_dir)
    if not result["gate"]["passed"]:  # a random tiny model may fail its canary; serving is what is tested here
        registry.record_gate(result["version"], {"passed": True}, {})
        with registry.transaction() as state:
            state.versions[result["version"]].status = "candidate"
    backend = LocalBackend(settings)
    manager = DialogueManager(settings, backend, store,
                              adapter_for=AdapterSelector(settings, make_ref=AdapterRef, interval_s=0).adapter_for)
    try:
        async def turn(text: str):
            reply = await manager.respond(user_id="live", conversation_id="live-1", text=text)
            await reply.complete()
            return store.get_turn(reply.turn_id).adapter_version

        assert await turn("hello") is None
        registry.promote(result["version"])
        assert await turn("hello again") == result["name"]
        registry.rollback()
        assert await turn("and again") is None
    finally:
        backend.close()


def test_erasing_a_user_through_the_services_flags_their_versions(tiny_settings, tmp_path):
    from bot.services import open_services

    registry = Registry(tiny_settings.adapters_dir)
    trained_on_ann = fake_version(registry, tmp_path, b"1", users=["ann"])
    services = open_services(tiny_settings, load_model=False)
    try:
        assert services.erase_user("ann")["adapter_versions_flagged"] == 1
    finally:
        services.close()
    with pytest.raises(PromotionRejected):
        registry.promote(trained_on_ann)
