"""Bad input found by reading: lone surrogates reach no store, a hostile Chatwoot body gets a 400."""

from __future__ import annotations

import json

import httpx
import pytest

from dialogue.store import TranscriptStore, Turn
from memory.persona import PersonaStore, validate_field
from memory.text import clean_text, strip_controls
from test_chatwoot import SECRET, Rig, message_event, posts, standin  # noqa: F401  (fixture)
from test_api import wait_for


def test_lone_surrogates_are_dropped_by_the_one_cleaner():
    assert clean_text("hi \ud800there\udfff") == "hi there"
    assert strip_controls("a\udc80b") == "ab"
    assert clean_text("emoji 😀 stays") == "emoji 😀 stays"
    assert validate_field("name", "Le\ud800na") == "Lena"
    assert validate_field("facts", ["likes \udfff tea"]) == ["likes  tea"]


def test_a_cleaned_message_and_persona_are_stored(sqlite_url):
    store = TranscriptStore(sqlite_url)
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="test")
    text = clean_text("caf\ud83d\u00e9")
    store.record_turn(Turn(conversation_id="c1", user_id="u1", channel="test", user_text=text, reply="ok"))
    assert store.history(conversation_id="c1", user_id="u1")[0].user_text == "café"
    personas = PersonaStore(store.engine)
    personas.update("u1", {"name": "Lena\ud800"})
    assert personas.get("u1").name == "Lena"
    store.close()


@pytest.fixture
def rig(tiny_settings, standin):  # noqa: F811
    rig = Rig(tiny_settings, standin.url)
    yield rig
    rig.close()


def test_chatwoot_refuses_deep_or_odd_bodies_with_a_400(rig, standin):  # noqa: F811
    url = rig.server.url + "/integrations/chatwoot/webhook"
    token = {"X-Rapport-Token": SECRET, "content-type": "application/json"}
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"event": "message_created", "id": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        response = httpx.post(url, content=body, headers=token, timeout=30)
        assert response.status_code == 400 and "error" in response.json()
    odd = message_event(3001, "Hello")
    odd["sender"], odd["conversation"] = ["x"], "nope"
    assert rig.post(odd).json() == {"ok": True, "accepted": False}
    body = json.dumps(message_event(3002, "Hello\ud800 there"))  # ASCII: the surrogate travels as \ud800
    response = httpx.post(url, content=body, headers=token, timeout=30)
    assert response.json()["accepted"] is True
    wait_for(lambda: len(posts(standin.calls)) == 1)
    assert "\ud800" not in posts(standin.calls)[0]["json"]["content"]
