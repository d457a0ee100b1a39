"""The native HTTP API on the tiny model: replies, streaming, auth, limits, hostile input, handoff, metrics."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from bot.http.app import create_app
from bot.services import open_services

ADMIN, PLAIN = "admin-key-0123456789", "plain-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """An ASGI app under a real uvicorn on 127.0.0.1 in a thread, stopped on exit."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def recorder_app() -> tuple[FastAPI, list[dict]]:
    """A stand-in receiver that records every request it gets."""
    calls: list[dict] = []
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def record(path: str, request: Request) -> dict:
        body = await request.body()
        calls.append({"path": "/" + path, "headers": dict(request.headers), "body": body,
                      "json": json.loads(body) if body else None})
        return {"id": len(calls)}

    return app, calls


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.fixture
def services(tiny_settings):
    opened = open_services(tiny_settings)
    opened.backend.worker.wait_ready(60)
    yield opened
    opened.close()


@pytest.fixture
def client(services):
    """The app with an operator's key (legacy admin: ids as given; tests/test_attacks.py has integrations' keys)."""
    services.settings.admin_keys = [ADMIN]
    with TestClient(create_app(services), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        yield c


def say(client, text, *, user="u1", conversation="c1", **extra):
    return client.post(f"/v1/conversations/{conversation}/messages", json={"user_id": user, "text": text, **extra})


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines.get("event", "message"), json.loads(lines["data"])))
    return events


def test_a_message_gets_a_recorded_reply_with_sources_and_version(client, services):
    response = say(client, "Hello! My name is Lena.")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"turn_id", "reply", "sources", "handoff", "adapter_version"}
    assert body["handoff"] is False and body["sources"] == [] and body["status"] == "bot"
    stored = services.store.get_turn(body["turn_id"])
    assert stored.reply == body["reply"] and stored.user_text == "Hello! My name is Lena." and stored.channel == "api"
    assert response.headers["x-request-id"]


def test_streaming_by_flag_or_accept_header_ends_with_the_full_reply(client, services):
    for kwargs in ({"json_extra": {"stream": True}, "headers": {}},
                   {"json_extra": {}, "headers": {"Accept": "text/event-stream"}}):
        response = client.post("/v1/conversations/c2/messages", headers=kwargs["headers"],
                               json={"user_id": "u1", "text": "Can you help me plan a trip?", **kwargs["json_extra"]})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)
        assert events[-1][0] == "done" and all(name == "delta" for name, _ in events[:-1])
        done = events[-1][1]
        assert "".join(e["text"] for _, e in events[:-1]) == done["reply"]
        assert services.store.get_turn(done["turn_id"]).reply == done["reply"]


def test_ratings_are_stored_and_unknown_turns_are_404(client, services):
    turn_id = say(client, "Hello!").json()["turn_id"]
    response = client.post(f"/v1/turns/{turn_id}/rating", json={"rating": 1, "comment": "nice"})
    assert response.status_code == 200 and response.json()["handoff"] is False
    assert client.post("/v1/turns/0123456789abcdef/rating", json={"rating": 1}).status_code == 404
    assert client.post(f"/v1/turns/{turn_id}/rating", json={"rating": 5}).status_code == 422
    assert client.post(f"/v1/turns/{turn_id}/rating", json={"rating": -1, "user_id": "someone-else"}).status_code == 404
    assert "rapport_ratings_total" in client.get("/metrics").text


def test_keys_401_admin_403_and_open_health(tiny_settings):
    settings = tiny_settings.model_copy(update={"api_keys": [PLAIN], "admin_keys": [ADMIN]})
    opened = open_services(settings)
    try:
        with TestClient(create_app(opened), base_url="http://127.0.0.1") as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/v1/users/u1/persona").status_code == 401
            assert c.get("/v1/users/u1/persona", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get("/v1/users/u1/persona", headers={"Authorization": PLAIN}).status_code == 401
            plain, admin = ({"Authorization": f"Bearer {k}"} for k in (PLAIN, ADMIN))
            assert c.get("/v1/users/u1/persona", headers=plain).status_code == 200
            assert c.get("/v1/users/u1/persona", headers=admin).status_code == 200
            refused = c.get("/v1/users/u1/export", headers=plain)
            assert refused.status_code == 403 and refused.json() == {"error": "this route needs an admin key"}
            assert c.get("/v1/users/u1/export", headers=admin).status_code == 200
            assert c.delete("/v1/users/u1", headers=plain).status_code == 403
            # the key is judged before the body: a caller without the scope learns nothing about its shape
            refused = c.post("/v1/faq", headers=plain, json={"entries": []})
            assert refused.status_code == 403 and refused.json() == {"error": "this route needs an admin key"}
    finally:
        opened.close()


def test_keys_are_never_logged(tiny_settings, caplog):
    settings = tiny_settings.model_copy(update={"api_keys": [PLAIN]})
    opened = open_services(settings)
    try:
        with caplog.at_level("DEBUG"), TestClient(create_app(opened), base_url="http://127.0.0.1") as c:
            c.get("/v1/users/u1/persona", headers={"Authorization": f"Bearer {PLAIN}"})
            c.get("/v1/users/u1/persona", headers={"Authorization": "Bearer wrong-key-xyz"})
        assert PLAIN not in caplog.text and "wrong-key-xyz" not in caplog.text
    finally:
        opened.close()


def test_rate_limit_answers_429_with_retry_after(tiny_settings):
    settings = tiny_settings.model_copy(update={"api_keys": [PLAIN], "api_rate_per_minute": 6, "api_rate_burst": 3})
    opened = open_services(settings)
    try:
        with TestClient(create_app(opened), base_url="http://127.0.0.1") as c:
            headers = {"Authorization": f"Bearer {PLAIN}"}
            codes = [c.get("/v1/users/u1/persona", headers=headers).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429]
            limited = c.get("/v1/users/u1/persona", headers=headers)
            assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 10
            assert "error" in limited.json()
            assert c.get("/healthz").status_code == 200  # health is never limited
    finally:
        opened.close()


HOSTILE = [
    ("post", "/v1/conversations/c1/messages", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("post", "/v1/conversations/c1/messages", {"content": b'{"user_id": "u1", "text": "\xff\xfe\xfd"}',
                                               "headers": {"content-type": "application/json"}}),
    ("post", "/v1/conversations/c1/messages", {"content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}}),
    ("post", "/v1/conversations/c1/messages", {"json": {"user_id": 5, "text": ["a"]}}),
    ("post", "/v1/conversations/c1/messages", {"json": ["not", "an", "object"]}),
    ("post", "/v1/conversations/c1/messages", {"json": {"user_id": "u1", "text": "\x00\x1b\x07\x00 \x7f"}}),
    ("post", "/v1/conversations/c1/messages", {"json": {"user_id": "../../etc/passwd", "text": "hi"}}),
    ("post", "/v1/conversations/..%2F..%2Fetc%2Fpasswd/messages", {"json": {"user_id": "u1", "text": "hi"}}),
    ("post", "/v1/conversations/c1/messages", {"json": {"user_id": "u2", "text": "hi"}}),  # u1's conversation
    ("get", "/v1/users/..%2F..%2Fetc/persona", {}),
    ("get", "/v1/users/u1/memories/search?q=x&k=100000000000000000000", {}),
    ("get", "/v1/users/u1/memories/search?q=x&k=-1", {}),
    ("get", "/v1/faq/search?q=&k=3", {}),
    ("post", "/v1/turns/does-not-exist/rating", {"json": {"rating": -1}}),
    ("post", "/v1/turns/..%2F..%2Fx/rating", {"json": {"rating": -1}}),
    ("put", "/v1/users/u1/persona", {"json": {"no_such_field": "x"}}),
    ("put", "/v1/users/u1/persona", {"json": {"name": {"nested": True}}}),
    ("post", "/v1/chat/completions", {"json": {"messages": []}}),
    ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}], "user": "a/../b"}}),
    ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "assistant", "content": "only me"}]}}),
    ("delete", "/v1/users/u1/memories/..%2F..", {}),
    ("get", "/no/such/route", {}),
    ("patch", "/v1/users/u1/persona", {"json": {}}),
]


def test_hostile_requests_get_json_4xx_and_keep_earlier_data(client, services):
    first = say(client, "Hello! My name is Lena.").json()
    for method, path, kwargs in HOSTILE:
        response = client.request(method.upper(), path, **kwargs)
        assert 400 <= response.status_code < 500, (method, path, response.status_code, response.text[:200])
        assert isinstance(response.json().get("error"), str), (path, response.text[:200])
    assert client.get("/healthz").json() == {"ok": True}
    assert services.store.get_turn(first["turn_id"]).reply == first["reply"]
    assert say(client, "Still there?").status_code == 200


def test_a_message_over_the_length_limit_is_refused_whole_as_in_every_channel(client, services):
    """One length rule in the core: longer than RAPPORT_MAX_MESSAGE_CHARS (8000) is a 400 naming the limit, and
    nothing of it is stored; the conversation goes on."""
    refused = say(client, "a" * 9000)
    assert refused.status_code == 400
    assert refused.json() == {"error": "the message is 9000 characters; the limit is 8000"}
    assert services.store.export_user("u1")["turns"] == []
    assert say(client, "Hello!").status_code == 200


def test_control_characters_are_stripped_not_stored(client, services):
    response = say(client, "hi\x00 there\x1b[31m")
    assert response.status_code == 200
    stored = services.store.get_turn(response.json()["turn_id"]).user_text
    assert "\x00" not in stored and "\x1b" not in stored and stored.startswith("hi there")


def test_asking_for_a_human_hands_off_and_the_bot_stays_silent(tiny_settings):
    """The handoff webhook of the settings hears of the handoff; the bot is silent until the conversation is resumed."""
    webhook_app, calls = recorder_app()
    with LiveServer(webhook_app) as hook:
        services = open_services(tiny_settings.model_copy(update={"handoff_webhook_url": hook.url + "/hook",
                                                                  "handoff_webhook_secret": "s3cret"}))
        try:
            services.settings.admin_keys = [ADMIN]
            with TestClient(create_app(services), base_url="http://127.0.0.1",
                            headers={"Authorization": f"Bearer {ADMIN}"}) as client:
                say(client, "Hello!", conversation="h1")
                handed = say(client, "I want to talk to a human please", conversation="h1").json()
                assert handed["handoff"] is True and handed["status"] == "human" and handed["reply"]
                wait_for(lambda: len(calls) == 1)
                event = calls[0]["json"]
                assert event["event"] == "conversation.handoff" and event["reason"] == "customer_request"
                assert event["conversation_id"] == "h1" and event["user_id"] == "u1" and event["turn_id"] == handed["turn_id"]
                assert "human" in event["summary"] and event["transcript"][-1]["role"] == "bot"
                expected = hmac.new(b"s3cret", calls[0]["body"], hashlib.sha256).hexdigest()
                assert calls[0]["headers"]["x-rapport-signature"] == f"sha256={expected}"
                # Standard Webhooks: an id and a timestamp signed with the body (replays and duplicates are seen)
                hook_id, stamp = calls[0]["headers"]["webhook-id"], calls[0]["headers"]["webhook-timestamp"]
                assert hook_id.startswith("msg_") and abs(int(stamp) - time.time()) < 60
                signed = hmac.new(b"s3cret", f"{hook_id}.{stamp}.".encode() + calls[0]["body"], hashlib.sha256).digest()
                assert calls[0]["headers"]["webhook-signature"] == "v1," + base64.b64encode(signed).decode()

                waiting = say(client, "My order 123 never arrived", conversation="h1").json()
                assert waiting["reply"] == "" and waiting["status"] == "human"
                agent = client.post("/v1/conversations/h1/agent_messages", json={"text": "Sorry! I'll resend it today."})
                assert agent.status_code == 200 and agent.json()["reply_to"] == waiting["turn_id"]
                turn = services.store.get_turn(agent.json()["turn_id"])
                assert (turn.model_id, turn.finish_reason, turn.user_text) == ("human", "agent", "My order 123 never arrived")
                assert turn.prompt == services.store.get_turn(waiting["turn_id"]).prompt
                assert client.get("/v1/conversations/h1").json()["status"] == "human"

                assert client.post("/v1/conversations/h1/resume").json()["status"] == "bot"
                back = say(client, "Thanks, one more question", conversation="h1").json()
                assert back["status"] == "bot" and back["finish_reason"] in ("stop", "length")
                assert len(calls) == 1
        finally:
            services.close()


def test_repeated_negative_ratings_hand_off(client, services):
    first = say(client, "Hello!", conversation="r1").json()["turn_id"]
    second = say(client, "Can you help me plan a trip?", conversation="r1").json()["turn_id"]
    assert client.post(f"/v1/turns/{first}/rating", json={"rating": -1}).json()["handoff"] is False
    assert client.post(f"/v1/turns/{second}/rating", json={"rating": -1}).json()["handoff"] is True
    assert services.store.get_conversation("r1").status == "human"
    assert 'rapport_handoffs_total{reason="negative_ratings"} 1.0' in client.get("/metrics").text


def test_readyz_and_metrics(client):
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout=60)
    say(client, "Hello!")
    text = client.get("/metrics").text
    for name in ("rapport_turns_total", "rapport_turn_seconds_bucket", "rapport_tokens_total", "rapport_queue_depth",
                 "rapport_http_requests_total"):
        assert name in text


def test_memories_routes_are_isolated_per_user(client):
    pytest.importorskip("memory.memories")
    added = client.post("/v1/users/alice/memories", json={"items": [
        {"text": "I am allergic to peanuts", "meta": {"source": "intake", "n": 1}},
        {"text": "My sister lives in Lisbon"}]})
    assert added.status_code == 200, added.text
    ids = added.json()["ids"]
    assert len(ids) == 2
    hits = client.get("/v1/users/alice/memories/search", params={"q": "food allergy", "k": 5}).json()
    assert hits[0]["text"] == "I am allergic to peanuts" and hits[0]["meta"] == {"source": "intake", "n": 1}
    assert set(hits[0]) >= {"id", "text", "score", "meta"}
    assert client.get("/v1/users/bob/memories/search", params={"q": "peanuts allergy", "k": 5}).json() == []
    assert client.delete(f"/v1/users/bob/memories/{ids[0]}").status_code == 404
    assert client.delete(f"/v1/users/alice/memories/{ids[0]}").status_code == 200
    texts = [h["text"] for h in client.get("/v1/users/alice/memories/search", params={"q": "allergy"}).json()]
    assert "I am allergic to peanuts" not in texts
    bad = client.post("/v1/users/alice/memories", json={"items": [{"text": ""}]})
    assert bad.status_code == 400 and "item 1" in bad.json()["error"]


def test_persona_round_trip_and_user_export_erasure(client):
    put = client.put("/v1/users/u9/persona", json={"name": "Lena", "verbosity": "short"})
    assert put.status_code == 200 and put.json()["name"] == "Lena"
    assert client.get("/v1/users/u9/persona").json()["verbosity"] == "short"
    say(client, "Hello!", user="u9", conversation="c9")
    exported = client.get("/v1/users/u9/export").json()
    assert exported["user_id"] == "u9" and exported["turns"]
    erased = client.delete("/v1/users/u9").json()["erased"]
    assert erased["turns"] >= 1
    assert client.get("/v1/users/u9/export").json()["turns"] == []


def test_a_turn_that_asks_for_a_person_hands_off_and_reports_its_sources(client, services):
    from dialogue.manager import Context, Source

    async def unsure(user_id: str, text: str) -> Context:
        return Context(answer="I don't know that one; shall I connect you with a colleague?", handoff=True,
                       sources=[Source(kind="faq", id="returns", score=0.31)])

    services.manager.recall = unsure
    body = say(client, "Do you sell hovercraft parts?", conversation="lc1").json()
    assert body["handoff"] is True and body["status"] == "human"
    assert body["sources"] == [{"kind": "faq", "id": "returns", "score": 0.31}]
    wait_for(lambda: services.store.get_conversation("lc1").status == "human")
    assert say(client, "Hello?", conversation="lc1").json()["reply"] == ""


def test_a_retried_message_id_gets_its_first_answer_never_a_second(client, services):
    from dialogue.store import Turn

    first = say(client, "Hello there!", message_id="msg-1").json()
    again = say(client, "Hello there!", message_id="msg-1")  # the client lost the first response and retries
    assert again.status_code == 200 and again.json() == first
    assert sse_events(say(client, "Hello there!", message_id="msg-1", stream=True).text)[-1] == ("done", first)
    other = say(client, "Hello there!", message_id="msg-2").json()  # another message, another answer
    assert other["turn_id"] != first["turn_id"]
    assert [t["user_text"] for t in services.store.export_user("u1")["turns"]] == ["Hello there!"] * 2
    assert say(client, "Hi", user="u2", conversation="c2", message_id="msg-1").json()["turn_id"] != first["turn_id"]

    def mark(turn_id: str, finish_reason: str) -> None:
        with services.store.session() as session:
            row = session.get(Turn, turn_id)
            row.finish_reason = finish_reason
            session.add(row)
            session.commit()

    slow = say(client, "Slow one", message_id="msg-3").json()
    mark(slow["turn_id"], "pending")  # its first try still being answered: the retry waits, not answered twice
    busy = say(client, "Slow one", message_id="msg-3")
    assert busy.status_code == 503 and busy.headers["Retry-After"]
    assert say(client, "Hi", message_id="not an id!").status_code == 422


def test_every_try_of_a_message_id_is_one_turn_answered_at_most_once(client, services):
    from dialogue.store import Turn

    def mark(turn_id: str, finish_reason: str) -> None:
        with services.store.session() as session:
            row = session.get(Turn, turn_id)
            row.finish_reason, row.reply = finish_reason, ""
            session.add(row)
            session.commit()

    first = say(client, "Slow one", message_id="msg-3").json()
    mark(first["turn_id"], "interrupted")  # the first try died unanswered
    second = say(client, "Slow one", message_id="msg-3")  # the retry answers that same turn
    assert second.status_code == 200 and second.json()["turn_id"] == first["turn_id"]
    third = say(client, "Slow one", message_id="msg-3")  # the retry's answer was lost on the way: not answered again
    assert third.status_code == 200 and third.json() == second.json()
    mark(first["turn_id"], "error")  # a retry that died too (its generation failed)
    fourth = say(client, "Slow one", message_id="msg-3")
    assert fourth.status_code == 200 and fourth.json()["turn_id"] == first["turn_id"]
    turns = [t for t in services.store.export_user("u1")["turns"] if t["user_text"] == "Slow one"]
    assert [(t["id"], t["finish_reason"]) for t in turns] == [(first["turn_id"], fourth.json()["finish_reason"])]
    services.erase_user("u1")  # the turn is gone, its message id still taken: a retry is one new turn, once
    again = say(client, "Slow one", message_id="msg-3").json()
    assert again["turn_id"] == first["turn_id"] and say(client, "Slow one", message_id="msg-3").json() == again
