"""Chatwoot end to end: Rapport under uvicorn, a stand-in Chatwoot API on 127.0.0.1 recording every call."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import httpx
import pytest

from bot.cli.serve import build_app
from dialogue.manager import Context
from bot.services import open_services
from test_api import LiveServer, recorder_app, wait_for

SECRET, TOKEN = "hook-secret-123", "bot-token-456"
OPERATOR = "operator-admin-key-0123456789"  # Chatwoot's users are a channel's: only an admin key rates their turns
ACCOUNT, CONVERSATION, CONTACT = 1, 42, 7
MESSAGES = f"/api/v1/accounts/{ACCOUNT}/conversations/{CONVERSATION}/messages"
TOGGLE = f"/api/v1/accounts/{ACCOUNT}/conversations/{CONVERSATION}/toggle_status"
KEY = f"chatwoot:{ACCOUNT}:{CONVERSATION}"


def message_event(message_id: int, content: str, *, message_type: str = "incoming", sender_type: str = "contact",
                  sender_id: int = CONTACT, private: bool = False, conversation: int = CONVERSATION) -> dict:
    """A `message_created` agent-bot payload shaped like Chatwoot's `Message#webhook_data`."""
    return {
        "event": "message_created", "id": message_id, "content": content, "created_at": "2026-11-25T10:00:00.000Z",
        "message_type": message_type, "content_type": "text", "content_attributes": {}, "source_id": None,
        "private": private, "additional_attributes": {},
        "sender": {"id": sender_id, "name": "Lena" if sender_type == "contact" else "Agent Ana", "type": sender_type},
        "inbox": {"id": 3, "name": "Website"},
        "conversation": {"id": conversation, "inbox_id": 3, "status": "pending", "channel": "Channel::WebWidget",
                         "can_reply": True, "contact_inbox": {"id": 9, "contact_id": CONTACT, "inbox_id": 3},
                         "meta": {"sender": {"id": CONTACT, "type": "contact"}, "assignee": None}, "messages": []},
        "account": {"id": ACCOUNT, "name": "Spokes & Co"},
    }


def status_event(status: str, event: str = "conversation_status_changed") -> dict:
    return {"event": event, "id": CONVERSATION, "account_id": ACCOUNT, "inbox_id": 3, "status": status,
            "meta": {"sender": {"id": CONTACT, "type": "contact"}}, "messages": []}


async def scripted(user_id: str, text: str) -> Context:
    """Recall that fixes the answer: the tiny random model only ever says blank lines, which Chatwoot
    could not show; the flow around the turn (recording, posting, handoff) is what these tests check."""
    return Context(answer=f"Happy to help with: {text}")


class Rig:
    """Rapport (with the Chatwoot channel) and the stand-in, both live on loopback."""

    def __init__(self, settings, standin_url: str, *, recall=scripted) -> None:
        self.services = open_services(settings.model_copy(update={
            "chatwoot_base_url": standin_url, "chatwoot_bot_token": TOKEN, "chatwoot_webhook_secret": SECRET,
            "admin_keys": [OPERATOR]}))
        self.services.backend.worker.wait_ready(60)
        self.services.manager.recall = recall
        self.app = build_app(self.services)
        self.server = LiveServer(self.app).__enter__()

    def post(self, payload: dict, token: str | None = SECRET) -> httpx.Response:
        """A delivery signed as Chatwoot signs it (HMAC-SHA256 of "<timestamp>.<body>"), with `token` as the key."""
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            stamp = str(int(time.time()))
            digest = hmac.new(token.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers |= {"X-Chatwoot-Signature": f"sha256={digest}", "X-Chatwoot-Timestamp": stamp}
        return httpx.post(self.server.url + "/integrations/chatwoot/webhook", content=body, headers=headers, timeout=30)

    def close(self) -> None:
        self.server.__exit__(None, None, None)
        self.services.close()


@pytest.fixture
def standin():
    app, calls = recorder_app()
    with LiveServer(app) as live:
        live.calls = calls
        yield live


@pytest.fixture
def rig(tiny_settings, standin):
    rig = Rig(tiny_settings, standin.url)
    yield rig
    rig.close()


def posts(calls, path=MESSAGES, private=None):
    return [c for c in calls if c["path"] == path and (private is None or c["json"].get("private") is private)]


def test_a_customer_message_gets_one_reply_even_when_delivered_twice(rig, standin):
    event = message_event(1001, "Hello! Do you repair bikes?")
    assert rig.post(event).json() == {"ok": True, "accepted": True}
    assert rig.post(event).json() == {"ok": True, "accepted": False}  # Chatwoot retried: same message id
    wait_for(lambda: len(posts(standin.calls)) == 1)
    call = posts(standin.calls)[0]
    assert call["headers"]["api_access_token"] == TOKEN
    assert call["json"]["private"] is False and call["json"]["message_type"] == "outgoing"
    turns = rig.services.store.history(conversation_id=KEY, user_id=f"chatwoot:{ACCOUNT}:{CONTACT}")
    assert len(turns) == 1 and turns[0].user_text == "Hello! Do you repair bikes?"
    assert call["json"]["content"] == turns[0].reply


def test_own_messages_private_notes_and_bad_tokens_never_get_replies(rig, standin):
    assert rig.post(message_event(2001, "Sure, we do!", message_type="outgoing", sender_type="agent_bot")).json()[
        "accepted"] is False
    assert rig.post(message_event(2002, "internal note", message_type="outgoing", sender_type="user",
                                  private=True)).json()["accepted"] is False
    assert rig.post({"event": "message_created", "id": 2003, "message_type": "activity", "content": "Assigned"}).json()[
        "accepted"] is False
    assert rig.post({"event": "webwidget_triggered"}).json()["accepted"] is False
    for token in (None, "wrong"):
        refused = rig.post(message_event(2004, "Hello?"), token=token)
        assert refused.status_code == 401 and "error" in refused.json()
    hook = rig.server.url + "/integrations/chatwoot/webhook"
    event = json.dumps(message_event(2006, "unsigned")).encode()
    stale = str(int(time.time()) - 3600)  # a replayed delivery from an hour ago, correctly signed
    signature = "sha256=" + hmac.new(SECRET.encode(), stale.encode() + b"." + event, hashlib.sha256).hexdigest()
    assert httpx.post(hook, content=event, headers={"X-Chatwoot-Signature": signature,
                                                    "X-Chatwoot-Timestamp": stale}).status_code == 401
    tampered = event.replace(b"unsigned", b"tampered")
    fresh = str(int(time.time()))
    signature = "sha256=" + hmac.new(SECRET.encode(), fresh.encode() + b"." + event, hashlib.sha256).hexdigest()
    assert httpx.post(hook, content=tampered, headers={"X-Chatwoot-Signature": signature,
                                                       "X-Chatwoot-Timestamp": fresh}).status_code == 401
    # the secret in the query string is refused unless RAPPORT_CHATWOOT_QUERY_TOKEN allows it (it shows in logs)
    assert httpx.post(hook + f"?token={SECRET}", content=event).status_code == 401
    header = {"X-Rapport-Token": SECRET, "content-type": "application/json"}
    bad = httpx.post(hook, content=b"\xff{", headers=header)
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.post(hook, json=[1], headers=header).status_code == 400
    assert rig.post(message_event(2005, "Hello there")).json()["accepted"] is True  # 2004 was never claimed
    wait_for(lambda: len(standin.calls) == 1)
    time.sleep(0.5)  # time enough for a stray reply to show up
    assert [c["path"] for c in standin.calls] == [MESSAGES]


def test_asking_for_a_human_hands_off_with_a_note_and_the_bot_stays_silent(rig, standin):
    rig.post(message_event(3001, "Hi, my gears are slipping"))
    wait_for(lambda: len(posts(standin.calls)) == 1)
    rig.post(message_event(3002, "Can I talk to a real person please?"))
    wait_for(lambda: len(posts(standin.calls, TOGGLE)) == 1)
    public, notes = posts(standin.calls, private=False), posts(standin.calls, private=True)
    assert len(public) == 2 and "colleague" in public[1]["json"]["content"]
    assert len(notes) == 1 and "asked for a person" in notes[0]["json"]["content"]
    assert "gears are slipping" in notes[0]["json"]["content"]
    assert posts(standin.calls, TOGGLE)[0]["json"] == {"status": "open"}
    assert rig.services.store.get_conversation(KEY).status == "human"

    rig.post(message_event(3003, "Hello? Anyone?"))  # the bot must not answer now
    rig.post(message_event(3004, "Hi Lena, Ana here. Bring it in today.", message_type="outgoing", sender_type="user",
                           sender_id=5))
    user = f"chatwoot:{ACCOUNT}:{CONTACT}"
    wait_for(lambda: any(t.model_id == "human" for t in rig.services.store.history(conversation_id=KEY, user_id=user)))
    turns = rig.services.store.history(conversation_id=KEY, user_id=user)
    waiting, agent = turns[-2], turns[-1]
    assert (waiting.user_text, waiting.reply, waiting.finish_reason) == ("Hello? Anyone?", "", "handoff")
    assert (agent.model_id, agent.finish_reason, agent.reply_to) == ("human", "agent", waiting.id)
    assert agent.reply == "Hi Lena, Ana here. Bring it in today." and agent.prompt == waiting.prompt
    assert len(posts(standin.calls, private=False)) == 2  # silence while a person has it

    assert rig.post(status_event("open")).json()["accepted"] is False
    assert rig.post(status_event("resolved")).json()["accepted"] is True
    wait_for(lambda: rig.services.store.get_conversation(KEY).status == "bot")
    rig.post(message_event(3005, "Thanks! One more question about brakes."))
    wait_for(lambda: len(posts(standin.calls, private=False)) == 3)


def test_low_confidence_turns_hand_off(rig, standin):
    async def unsure(user_id: str, text: str) -> Context:
        return Context(answer="I don't know that one; shall I connect you with a colleague?", handoff=True)

    rig.services.manager.recall = unsure
    rig.post(message_event(4001, "Do you sell hovercraft parts?"))
    wait_for(lambda: len(posts(standin.calls, TOGGLE)) == 1)
    public, notes = posts(standin.calls, private=False), posts(standin.calls, private=True)
    assert public[0]["json"]["content"].startswith("I don't know that one")
    assert "FAQ does not cover" in notes[0]["json"]["content"] and "hovercraft" in notes[0]["json"]["content"]


def test_the_handoff_survives_a_restart(tiny_settings, standin):
    first = Rig(tiny_settings, standin.url)
    try:
        first.post(message_event(5001, "I need a human"))
        wait_for(lambda: len(posts(standin.calls, TOGGLE)) == 1)
    finally:
        first.close()
    second = Rig(tiny_settings, standin.url)
    try:
        assert second.post(message_event(5001, "I need a human")).json()["accepted"] is False  # still deduplicated
        second.post(message_event(5002, "Is anyone there?"))
        user = f"chatwoot:{ACCOUNT}:{CONTACT}"
        wait_for(lambda: len(second.services.store.history(conversation_id=KEY, user_id=user)) == 2)
        assert len(posts(standin.calls, private=False)) == 1  # only the handover line, from before the restart
    finally:
        second.close()


def test_repeated_negative_ratings_hand_off_a_chatwoot_conversation(rig, standin):
    rig.post(message_event(6001, "Hello!"))
    rig.post(message_event(6002, "Can you help me plan a trip?"))
    wait_for(lambda: len(posts(standin.calls)) == 2)
    user = f"chatwoot:{ACCOUNT}:{CONTACT}"
    turns = rig.services.store.history(conversation_id=KEY, user_id=user)
    for turn in turns:
        response = httpx.post(rig.server.url + f"/v1/turns/{turn.id}/rating", json={"rating": -1},
                              headers={"Authorization": f"Bearer {OPERATOR}"})
        assert response.status_code == 200
    wait_for(lambda: len(posts(standin.calls, TOGGLE)) == 1)
    assert "unhelpful" in posts(standin.calls, private=True)[0]["json"]["content"]


def test_a_blank_model_reply_hands_off_instead_of_leaving_the_customer_unanswered(tiny_settings, standin):
    rig = Rig(tiny_settings, standin.url, recall=None)  # the real tiny model: it answers with blank lines
    try:
        rig.post(message_event(7001, "Hello! Do you repair bikes?"))
        wait_for(lambda: len(posts(standin.calls, TOGGLE)) == 1, timeout=30)
        assert posts(standin.calls, private=False) == []
        assert "could not produce an answer" in posts(standin.calls, private=True)[0]["json"]["content"]
        turn = rig.services.store.history(conversation_id=KEY, user_id=f"chatwoot:{ACCOUNT}:{CONTACT}")[0]
        assert turn.model_id == rig.services.backend.model_id and turn.completion_tokens > 0
    finally:
        rig.close()


def test_over_the_queue_cap_a_customer_message_is_kept_and_handed_to_a_person(tiny_settings, standin):
    rig = Rig(tiny_settings.model_copy(update={"max_queue": 1}), standin.url)
    try:
        busy = asyncio.run(rig.services.manager.respond(user_id="u2", conversation_id="w1", text="Hello!"))  # the cap
        event = message_event(8001, "Do you repair bikes?")
        assert rig.post(event).json() == {"ok": True, "accepted": True}  # Chatwoot would not send it again
        assert rig.post(event).json()["accepted"] is False
        wait_for(lambda: posts(standin.calls, TOGGLE))
        [told] = [c["json"]["content"] for c in posts(standin.calls, private=False)]
        [note] = [c["json"]["content"] for c in posts(standin.calls, private=True)]
        assert "busy" in told and "colleague" in told
        assert "busy" in note and "Do you repair bikes?" in note
        [turn] = rig.services.store.history(conversation_id=KEY, user_id=f"chatwoot:{ACCOUNT}:{CONTACT}")
        assert (turn.user_text, turn.reply, turn.handoff) == ("Do you repair bikes?", told, True)
        assert rig.services.store.get_conversation(KEY).status == "human"
        assert rig.services.manager.leases.held() == [busy.turn_id]
        asyncio.run(busy.complete())
    finally:
        rig.close()
