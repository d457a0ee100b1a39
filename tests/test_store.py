"""The transcript store on SQLite (embedded default) and PostgreSQL (scale path)."""

from __future__ import annotations

import pytest

from dialogue.errors import InvalidInput, NotFound, StoreUnavailable
from dialogue.store import TranscriptStore, Turn


def turn(user="u1", conversation="c1", said="hi", reply="hello") -> Turn:
    return Turn(conversation_id=conversation, user_id=user, channel="test", user_text=said, reply=reply,
                prompt='{"system": "s"}', model_id="m", prompt_tokens=5, completion_tokens=3)


@pytest.fixture
def store(db_url):
    store = TranscriptStore(db_url)
    yield store
    store.close()


def test_turns_come_back_in_order_for_their_owner_only(store):
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="test")
    for i in range(5):
        store.record_turn(turn(said=f"q{i}", reply=f"a{i}"))
    history = store.history(conversation_id="c1", user_id="u1", limit=3)
    assert [t.user_text for t in history] == ["q2", "q3", "q4"]
    assert [t.seq for t in history] == [3, 4, 5]
    assert store.history(conversation_id="c1", user_id="intruder") == []


def test_a_conversation_belongs_to_one_user(store):
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="test")
    with pytest.raises(InvalidInput):
        store.ensure_conversation(conversation_id="c1", user_id="u2", channel="test")


def test_rating_upserts_and_checks_the_owner(store):
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="test")
    t = store.record_turn(turn())
    store.rate(turn_id=t.id, rating=1, user_id="u1", comment="nice")
    row = store.rate(turn_id=t.id, rating=-1, user_id="u1", correction="better")
    assert (row.rating, row.comment, row.correction) == (-1, "nice", "better")
    with pytest.raises(NotFound):
        store.rate(turn_id=t.id, rating=1, user_id="u2")
    with pytest.raises(NotFound):
        store.rate(turn_id="nope", rating=1)
    with pytest.raises(InvalidInput):
        store.rate(turn_id=t.id, rating=5)


def test_export_and_erasure_cover_every_table(store):
    for user in ("u1", "u2"):
        store.ensure_conversation(conversation_id=f"c-{user}", user_id=user, channel="test")
        t = store.record_turn(turn(user=user, conversation=f"c-{user}", said=f"secret of {user}"))
        store.rate(turn_id=t.id, rating=1)
    exported = store.export_user("u1")
    assert [t["user_text"] for t in exported["turns"]] == ["secret of u1"]
    assert len(exported["ratings"]) == 1 and len(exported["conversations"]) == 1
    counts = store.delete_user("u1")
    assert counts == {"ratings": 1, "turns": 1, "conversations": 1, "users": 1, "personas": 0}
    assert store.export_user("u1") == {"conversations": [], "turns": [], "ratings": []}
    assert len(store.export_user("u2")["turns"]) == 1


def test_erased_text_is_gone_from_the_sqlite_files(tmp_path):
    url = f"sqlite:///{tmp_path / 'rapport.db'}"
    store = TranscriptStore(url)
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="test")
    store.record_turn(turn(said="my passport number is ZX-9931-MARKER"))
    store.delete_user("u1")
    store.close()
    for path in tmp_path.glob("rapport.db*"):
        assert b"ZX-9931-MARKER" not in path.read_bytes(), path.name


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = TranscriptStore(f"sqlite:///{tmp_path / 'rapport.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_an_unreachable_database_is_a_clear_error():
    with pytest.raises(StoreUnavailable) as caught:
        TranscriptStore("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(caught.value)
