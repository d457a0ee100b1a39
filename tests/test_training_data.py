"""Learning loop, data side: redaction, transcript import/export, dataset building, split and lineage."""

from __future__ import annotations

import json

import pytest

from dialogue.prompt import PromptParts
from dialogue.store import Rating, TranscriptStore, Turn
from training.datasets import build_dataset, is_heldout, turn_messages, user_hash
from training.importer import export_conversations, import_lines, turn_id_for
from training.redact import redact
from training.store import TrainingStore

SYSTEM = "You are a test assistant."


@pytest.fixture
def store(sqlite_url):
    opened = TranscriptStore(sqlite_url)
    yield opened
    opened.close()


@pytest.fixture
def any_store(db_url):
    """The store on SQLite and on PostgreSQL (the scale path), for the tests that touch its queries."""
    opened = TranscriptStore(db_url)
    yield opened
    opened.close()


def line(conversation_id: str, user_id: str, turns: list[dict]) -> bytes:
    return json.dumps({"conversation_id": conversation_id, "user_id": user_id, "turns": turns}).encode()


def qa(question: str, answer: str, **extra) -> list[dict]:
    return [{"role": "user", "text": question}, {"role": "assistant", "text": answer, **extra}]


# -- redaction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("write to anna.k+news@mail.example.co.uk today", "write to [email] today"),
    ("call +49 170 1234567 or (030) 123-4567", "call [phone] or [phone]"),
    ("card 4111 1111 1111 1111, expires soon", "card [card], expires soon"),
    ("4111-1111-1111-1111", "[card]"),
])
def test_redaction_replaces_personal_identifiers(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", ["on 2024-01-05 at 10:30", "I am 42 and paid 1000 euros", "order 12345",
                                  "open 9 to 17", ""])
def test_redaction_keeps_ordinary_numbers_dates_and_times(text):
    assert redact(text) == text


# -- import / export ---------------------------------------------------------------------------------


def test_import_writes_turns_ratings_and_rebuilt_prompt_parts(any_store):
    store = any_store
    data = [line("c1", "alice", [
        {"role": "assistant", "text": "Welcome!"},  # a greeting nobody asked for: context only
        *qa("hi", "hello", rating=1),
        {"role": "user", "text": "what is 2+2?"}, {"role": "user", "text": "quickly"},
        {"role": "assistant", "text": "5", "rating": -1, "correction": "4"},
        *qa("thanks", "you are welcome"),
    ])]
    report = import_lines(store, data, system=SYSTEM, max_chars=1000)
    assert report.to_json() == {"conversations": 1, "turns": 3, "ratings": 2, "unchanged": 0, "errors": []}
    second = store.get_turn(turn_id_for("c1", 1))
    assert second.user_text == "what is 2+2?\nquickly" and second.reply == "5"
    parts = PromptParts.from_dict(json.loads(second.prompt))
    assert parts.system == SYSTEM
    assert parts.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with store.session() as session:
        rating = session.get(Rating, second.id)
    assert (rating.rating, rating.correction, rating.user_id) == (-1, "4", "alice")


def test_import_twice_adds_nothing_and_export_round_trips(any_store):
    store = any_store
    data = [line("c1", "alice", qa("hi", "hello", rating=1) + qa("more?", "no", correction="yes")),
            line("c2", "bob", qa("yo", "hey"))]
    import_lines(store, data, system=SYSTEM, max_chars=1000)
    again = import_lines(store, data, system=SYSTEM, max_chars=1000)
    assert (again.turns, again.unchanged) == (0, 3)
    exported = {c["conversation_id"]: c for c in export_conversations(store)}
    assert exported["c1"]["turns"] == [
        {"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello", "rating": 1},
        {"role": "user", "text": "more?"}, {"role": "assistant", "text": "no", "rating": -1, "correction": "yes"}]
    assert exported["c2"]["user_id"] == "bob"


@pytest.mark.parametrize("raw, error", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2]", "JSON object"),
    (line("c9", "bad user!", qa("a", "b")), "user_id"),
    (line("c9", "u", []), "non-empty"),
    (line("c9", "u", [{"role": "system", "text": "x"}]), "role"),
    (line("c9", "u", qa("a", "b", rating=5)), "rating"),
    (line("c9", "u", qa("a", "b", rating=True)), "rating"),
    (line("c9", "u", qa("\x00\x1b  ", "b")), "empty"),
    (line("c9", "u", qa("a" * 2000, "b")), "over 1000"),
    (line("c1", "mallory", qa("take over", "ok", rating=1)), "another user"),
])
def test_bad_lines_are_reported_by_number_and_the_rest_imported(sqlite_url, raw, error):
    store = TranscriptStore(sqlite_url)
    good = line("c1", "alice", qa("hi", "hello", rating=1))
    report = import_lines(store, [good, b"", raw], system=SYSTEM, max_chars=1000)
    assert report.turns == 1
    assert len(report.errors) == 1 and report.errors[0]["line"] == 3 and error in report.errors[0]["error"]
    assert store.get_turn(turn_id_for("c1", 0)).user_id == "alice"


# -- datasets ----------------------------------------------------------------------------------------


def record(store, conversation_id, user_id, user_text, reply, rating=None, correction=None, **fields) -> Turn:
    store.ensure_conversation(conversation_id=conversation_id, user_id=user_id, channel="api")
    parts = PromptParts(system="live system", user_text=user_text, memories=[{"id": "m1", "text": "likes tea"}])
    turn = store.record_turn(Turn(conversation_id=conversation_id, user_id=user_id, user_text=user_text, reply=reply,
                                  prompt=json.dumps(parts.to_dict()), **fields))
    if rating is not None:
        store.rate(turn_id=turn.id, rating=rating, correction=correction)
    return turn


def test_dataset_sources_labels_and_exact_prompts(any_store):
    store = any_store
    liked = record(store, "k1", "ann", "hi", "Hello there!", rating=1)
    disliked = record(store, "k1", "ann", "help", "No.", rating=-1, correction="Of course, what do you need?")
    agent = record(store, "k2", "ann", "refund please", "I have refunded your order.", model_id="human",
                   finish_reason="agent")
    record(store, "k2", "ann", "unrated", "something")  # unrated bot turn: teaches nothing
    record(store, "k3", "ann", "stop", "half a rep", rating=1, finish_reason="cancelled")  # cut short: skipped
    record(store, "k4", "ann", "hi", "hello", model_id="human", finish_reason="agent_untrusted")  # any key's "agent"
    untrusted = build_dataset(store, system=SYSTEM, heldout_fraction=0.0)
    assert {e.source for e in untrusted.train} == {"liked", "disliked", "agent"}  # the correction awaits approval
    assert TrainingStore(store).approve_correction(disliked.id)
    data = build_dataset(store, system=SYSTEM, heldout_fraction=0.0)
    by_source = {(e.source, e.turn_id): e for e in data.train}
    assert set(by_source) == {("liked", liked.id), ("correction", disliked.id), ("disliked", disliked.id),
                              ("agent", agent.id)}
    assert by_source[("disliked", disliked.id)].desirable is False
    assert by_source[("correction", disliked.id)].completion == "Of course, what do you need?"
    example = by_source[("liked", liked.id)]
    assert example.messages == turn_messages(liked, SYSTEM)  # the recorded parts, not today's system prompt
    assert example.messages[0]["content"].startswith("live system") and "likes tea" in example.messages[-2]["content"]


def test_dataset_redacts_before_training_and_deduplicates(store):
    record(store, "r1", "ann", "my mail is ann@example.com", "Noted: ann@example.com, card 4111 1111 1111 1111", rating=1)
    record(store, "r2", "bob", "my mail is ann@example.com", "Noted: ann@example.com, card 4111 1111 1111 1111", rating=1)
    data = build_dataset(store, system=SYSTEM, heldout_fraction=0.0)
    assert len(data.train) == 1 and data.dropped == {"duplicate": 1}
    text = json.dumps([data.train[0].messages, data.train[0].completion])
    assert "ann@example.com" not in text and "4111" not in text and "[email]" in text and "[card]" in text


def test_heldout_split_is_by_conversation_and_lineage_names_turns_and_user_hashes(store):
    turns = [record(store, f"conv-{i}", f"user-{i % 3}", f"question {i}.{j}", f"answer {i}", rating=1 if i % 2 else -1)
             for i in range(40) for j in range(2)]
    data = build_dataset(store, system=SYSTEM, heldout_fraction=0.3)
    train_convs = {e.conversation_id for e in data.train}
    held_convs = {e.conversation_id for e in data.heldout}
    assert data.heldout and not train_convs & held_convs
    assert all(is_heldout(c, 0.3) for c in held_convs)
    lineage = data.lineage()
    assert set(lineage["train_turn_ids"]) | set(lineage["heldout_turn_ids"]) == {t.id for t in turns}
    assert lineage["user_hashes"] == sorted({user_hash(f"user-{i}") for i in range(3)})
    assert "user-1" not in json.dumps(lineage)
    assert build_dataset(store, system=SYSTEM, heldout_fraction=0.3).hash == data.hash  # stable rebuilds
    record(store, "conv-new", "user-9", "new", "new answer", rating=1)
    assert build_dataset(store, system=SYSTEM, heldout_fraction=0.3).hash != data.hash


def test_erased_users_are_left_out_and_faq_entries_become_grounded_examples(store):
    record(store, "e1", "gone", "hello", "hi", rating=1)
    kept = record(store, "e2", "stays", "hello there", "hi there", rating=1)
    faq = [{"id": f"f{i}", "question": f"When do you open on day {i}?", "answer": f"At {i} o'clock.",
            "alternates": [f"Opening time day {i}?"]} for i in range(12)]
    data = build_dataset(store, system=SYSTEM, faq_entries=faq, exclude_user_hashes={user_hash("gone")},
                         heldout_fraction=0.2)
    assert [e.turn_id for e in data.train + data.heldout if e.source != "faq"] == [kept.id]
    assert data.dropped["erased_user"] == 1
    faq_train = [e for e in data.train if e.source == "faq"]
    held_ids = {e["id"] for e in data.faq_eval}
    assert held_ids and not held_ids & {e.turn_id.removeprefix("faq:") for e in faq_train}
    assert len(faq_train) == 2 * (12 - len(held_ids))  # question and alternate
    assert "## Business FAQ" in faq_train[0].messages[-2]["content"] and faq_train[0].completion.startswith("At ")


def test_rating_rates_per_version_come_from_live_turns(any_store):
    from training.report import rating_rates

    store = any_store
    for i, (adapter, rating) in enumerate([(None, 1), (None, -1), ("v0001-aaaaaaaa", 1), ("v0001-aaaaaaaa", 1),
                                           ("v0001-aaaaaaaa", -1), ("v0002-bbbbbbbb", None)]):
        record(store, f"rr{i}", "ann", "q", f"a{i}", rating=rating, adapter_version=adapter)
    record(store, "rr-agent", "ann", "q", "agent says", model_id="human", finish_reason="agent")
    rates = rating_rates(store)
    assert rates["base"] == {"turns": 2, "rated": 2, "up": 1, "down": 1, "like_rate": 0.5}
    assert rates["v0001"] == {"turns": 3, "rated": 3, "up": 2, "down": 1, "like_rate": 0.6667}
    assert rates["v0002"]["like_rate"] is None and rates["v0002"]["turns"] == 1
