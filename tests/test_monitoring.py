"""Monitoring: the store's activity buckets (SQLite and PostgreSQL) and the turn metrics of every channel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dialogue.store import TranscriptStore, Turn

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(minute: float, *, version=None, latency=100, handoff=False, finish="stop", model="m", conversation="c1") -> Turn:
    return Turn(conversation_id=conversation, user_id="u1", channel="api", user_text="q", reply="a", model_id=model,
                adapter_version=version, latency_ms=latency, handoff=handoff, finish_reason=finish,
                created_at=T0 + timedelta(minutes=minute), finished_at=T0 + timedelta(minutes=minute))


@pytest.fixture
def store(db_url):
    store = TranscriptStore(db_url)
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="api")
    yield store
    store.close()


def test_activity_buckets_turns_latency_ratings_and_handoffs_per_version(store):
    rated = []
    for i in range(20):  # minute 0, base model: latencies 10..200 ms
        rated.append(store.record_turn(at(0.01 * i, latency=10 * (i + 1))))
    store.record_turn(at(0.5, latency=0, handoff=True, finish="handoff", model="rule"))  # the gate asked for a person
    store.record_turn(at(1.2, version="v0001", latency=300))
    store.record_turn(at(1.3, version="v0001", latency=500))
    store.record_turn(at(1.4, model="human", finish="agent"))  # an agent's reply: not the bot's
    store.record_turn(at(-5))  # before the window
    for t in rated[:3]:
        store.rate(turn_id=t.id, rating=1)
    store.rate(turn_id=rated[3].id, rating=-1)

    buckets = store.activity(since=T0, bucket_s=60)
    by = {(b.start, b.version): b for b in buckets}
    assert list(by) == [(T0, ""), (T0 + timedelta(minutes=1), "v0001")]
    base = by[(T0, "")]
    assert (base.turns, base.handoffs, base.up, base.down) == (21, 1, 3, 1)
    assert base.latency_p95_ms == 190 and base.latency_p50_ms == 100  # the gate's answer is not a latency
    b = by[(T0 + timedelta(minutes=1), "v0001")]
    assert (b.turns, b.handoffs, b.latency_p95_ms) == (2, 0, 500)
    # a window's end, and a bucket of the whole hour
    assert [x.turns for x in store.activity(since=T0, until=T0 + timedelta(minutes=1))] == [21]
    assert sorted((x.version, x.turns) for x in store.activity(since=T0, bucket_s=3600)) == [("", 21), ("v0001", 2)]
