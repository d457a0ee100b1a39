"""Concurrent first messages and turns, on SQLite and PostgreSQL: no IntegrityError, no shared sequence number."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dialogue.store import TranscriptStore, Turn
from memory.persona import PersonaStore


@pytest.fixture
def store(db_url):
    store = TranscriptStore(db_url)
    yield store
    store.close()


def at_once(n: int, work) -> list:
    """Run `work(i)` on `n` threads released together; the results (or the first error raised)."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(run, i) for i in range(n)]]


def test_a_new_users_first_messages_at_once_make_one_user_and_one_conversation(store):
    for round_ in range(15):
        user, conversation = f"new-{round_}", f"c-{round_}"
        made = at_once(4, lambda _: store.ensure_conversation(conversation_id=conversation, user_id=user, channel="t"))
        assert {c.id for c in made} == {conversation} and {c.user_id for c in made} == {user}
    assert len(store.export_user("new-3")["conversations"]) == 1


def test_a_conversation_still_belongs_to_its_first_user_when_two_race_for_it(store):
    from dialogue.errors import InvalidInput

    outcomes = []

    def claim(i):
        try:
            store.ensure_conversation(conversation_id="contested", user_id=f"u{i}", channel="t")
            outcomes.append(f"u{i}")
        except InvalidInput:
            outcomes.append("refused")

    at_once(4, claim)
    owner = store.get_conversation("contested").user_id
    assert sorted(outcomes) == sorted([owner] + ["refused"] * 3)


def test_first_persona_writes_at_once_keep_one_row(store):
    personas = PersonaStore(store.engine)
    for round_ in range(10):
        at_once(4, lambda i: personas.update(f"p-{round_}", {"tone": f"tone {i}"}))
        assert personas.get(f"p-{round_}").tone.startswith("tone ")


def test_concurrent_turns_in_one_conversation_get_distinct_sequence_numbers(store):
    store.ensure_conversation(conversation_id="busy", user_id="u1", channel="t")
    at_once(8, lambda i: [store.record_turn(Turn(conversation_id="busy", user_id="u1", channel="t",
                                                 user_text=f"q{i}.{k}", reply="a")) for k in range(5)])
    seqs = [t.seq for t in store.history(conversation_id="busy", user_id="u1", limit=100)]
    assert sorted(seqs) == list(range(1, 41))
