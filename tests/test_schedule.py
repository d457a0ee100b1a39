"""Retraining on a schedule: when a run is due, the lock across processes, and a real run on the tiny model."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from dialogue.store import TranscriptStore
from training.importer import import_lines
from training.registry import Registry
from training.schedule import LOCK_FILE, RetrainScheduler, Schedule, due, read_runs, retrain_lock

from test_training import FAST, conversation

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_a_run_is_due_on_enough_new_examples_or_enough_days_and_never_without_new_data():
    by_count, by_days = Schedule(min_examples=10), Schedule(every_days=7)
    assert due(Schedule(), new_examples=1000, last_run_at=None, now=NOW) is None  # off by default
    assert due(by_count, new_examples=9, last_run_at=None, now=NOW) is None
    assert "10 new examples" in due(by_count, new_examples=10, last_run_at=NOW, now=NOW)
    assert due(by_days, new_examples=3, last_run_at=NOW - timedelta(days=6), now=NOW) is None
    assert "7 days" in due(by_days, new_examples=3, last_run_at=NOW - timedelta(days=7), now=NOW)
    assert due(by_days, new_examples=3, last_run_at=None, now=NOW) is not None  # never ran: due now
    assert due(by_days, new_examples=0, last_run_at=NOW - timedelta(days=30), now=NOW) is None


@pytest.fixture
def loaded(tiny_settings):
    settings = tiny_settings.model_copy(update={"retrain_min_examples": 10})
    store = TranscriptStore(settings.db_url)
    import_lines(store, [conversation(i) for i in range(24)], system=settings.system_prompt, max_chars=1000)
    yield settings, store
    store.close()


def test_only_new_examples_that_enter_the_dataset_count_towards_a_run(tiny_settings):
    """Ratings count when they would teach (a finished bot reply, not kept out), corrections when approved: a rating
    on a cancelled reply, one kept out or a correction waiting for review is no reason to train."""
    import json

    from dialogue.store import Turn, utcnow
    from training.datasets import build_dataset
    from training.store import TrainingStore

    settings = tiny_settings.model_copy(update={"retrain_min_examples": 2})
    store = TranscriptStore(settings.db_url)
    training = TrainingStore(store)
    store.ensure_conversation(conversation_id="s1", user_id="ida", channel="api")

    def rated(rating: int, finish: str = "stop", correction: str | None = None) -> str:
        turn = store.record_turn(Turn(conversation_id="s1", user_id="ida", user_text="q", reply="a reply",
                                      model_id="tiny", finish_reason=finish))
        store.rate(turn_id=turn.id, rating=rating, correction=correction)
        return turn.id

    rated(1)
    corrected = rated(-1, correction="A better reply.")  # its rating counts; its correction waits for approval
    assert training.examples_since(None) == 2
    last_run = utcnow()
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    (settings.adapters_dir / "retrain.json").write_text(json.dumps({"runs": [
        {"started_at": last_run.isoformat(), "reason": "x", "new_examples": 2, "status": "done"}]}))
    rated(1, finish="cancelled")  # cut short: never learned from
    training.review(rated(-1), "rating", "keep_out")
    assert training.examples_since(last_run) == 0
    assert RetrainScheduler(settings, store, config=FAST).check() is None  # two new ratings, no new example
    assert training.approve_correction(corrected)  # given before the last run, approved after it: new
    assert training.examples_since(last_run) == 1 and training.examples_since(None) == 3
    assert len(build_dataset(store, system="s", heldout_fraction=0.0).train) == 3  # the same three examples
    assert len(read_runs(settings.adapters_dir)) == 1
    store.close()


def test_another_process_holding_the_lock_makes_the_check_skip(loaded):
    settings, store = loaded
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
        "sys.stdin.read()"), str(settings.adapters_dir / LOCK_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert RetrainScheduler(settings, store, config=FAST).check() is None
        assert read_runs(settings.adapters_dir) == [] and Registry(settings.adapters_dir).state().versions == {}
        with retrain_lock(settings.adapters_dir) as held:
            assert held is False
    finally:
        holder.stdin.close()
        holder.wait(10)
    with retrain_lock(settings.adapters_dir) as held:  # free again once that process let go
        assert held is True


def test_a_due_run_trains_and_gates_a_candidate_records_it_and_promotes_nothing(loaded):
    settings, store = loaded
    scheduler = RetrainScheduler(settings, store, config=FAST)
    run = scheduler.check()
    assert run["status"] == "done", run
    assert run["new_examples"] == 48 and "48 new examples" in run["reason"]
    state = Registry(settings.adapters_dir).state()
    item = state.versions[run["version"]]
    assert item.gate and run["gate_passed"] == bool(item.gate["passed"])
    assert item.status in ("candidate", "rejected") and state.active is None and state.ab is None  # no click, no promotion
    assert read_runs(settings.adapters_dir) == [run]
    assert scheduler.check() is None  # nothing new since: not again
    assert len(read_runs(settings.adapters_dir)) == 1


def test_a_run_whose_process_died_is_marked_interrupted_by_the_next_holder_of_the_lock(loaded):
    import json

    settings, store = loaded
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    (settings.adapters_dir / "retrain.json").write_text(json.dumps({"runs": [
        {"started_at": datetime.now(UTC).isoformat(), "reason": "x", "new_examples": 48,
         "status": "running"}]}))
    assert RetrainScheduler(settings, store, config=FAST).check() is None  # no rating since that run started
    assert [r["status"] for r in read_runs(settings.adapters_dir)] == ["interrupted"]


def test_with_a_promote_share_a_version_that_passed_the_gate_starts_an_ab_split(loaded):
    settings, store = loaded
    settings = settings.model_copy(update={"retrain_promote_share": 0.5})
    run = RetrainScheduler(settings, store, config=FAST).check()
    state = Registry(settings.adapters_dir).state()
    assert run["gate_passed"] is True, run  # the tiny model learns this data: the gate passes against the base
    assert run["promoted"] == 0.5 and state.ab["version"] == run["version"] and state.ab["share"] == 0.5
