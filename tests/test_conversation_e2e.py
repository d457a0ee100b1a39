"""The issue-14 transcript on the real model, through the piped REPL and through the HTTP API: no echo, no
repeat, the facts answered (in a new conversation and a new process too), questions not among the memories."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from dialogue.guard import check_reply

pytestmark = pytest.mark.e2e

TRANSCRIPT = [
    "Hello! My name is Lena and I live in Porto.",
    "What is my name and where do I live?",
    "Can you suggest a weekend trip from my city?",
]


def test_the_first_minute_holds_up(real_home):
    env = {**os.environ, "RAPPORT_HOME": str(real_home), "RAPPORT_MAX_NEW_TOKENS": "64"}
    stdin = ("\n".join(TRANSCRIPT) + "\n/memory\n").encode()
    done = subprocess.run([sys.executable, "-m", "bot.cli", "chat", "--user", "lena"], input=stdin,
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode()
    with sqlite3.connect(real_home / "rapport.db") as db:
        replies = [r for (r,) in db.execute("SELECT reply FROM turns WHERE user_id = 'lena' ORDER BY seq")]
    assert len(replies) == 3
    for i, (said, reply) in enumerate(zip(TRANSCRIPT, replies)):
        verdict = check_reply(reply, user_text=said, earlier_replies=replies[:i])
        assert verdict.kind not in ("echo", "repeat"), (said, reply, verdict)
    assert "Lena" in replies[1] and "Porto" in replies[1]
    memory = done.stdout.decode().split("What I remember")[1]
    assert "My name is Lena and I live in Porto." in memory
    assert "What is my name" not in memory and "weekend trip" not in memory
    new = subprocess.run([sys.executable, "-m", "bot.cli", "chat", "--user", "lena"],
                         input=b"Remind me, what is my name and where do I live?\n", capture_output=True, env=env,
                         timeout=300)
    assert b"Lena" in new.stdout and b"Porto" in new.stdout, new.stdout.decode()


def test_the_first_minute_holds_up_through_the_api(real_home):
    """The native endpoint, in-process over the real services (default settings but a shorter reply budget)."""
    from fastapi.testclient import TestClient

    from bot.http.app import create_app
    from bot.services import open_services
    from dialogue.settings import Settings

    services = open_services(Settings(home=real_home, max_new_tokens=64, admin_keys=["e2e-operator-key-0123"]))
    try:
        with TestClient(create_app(services), base_url="http://127.0.0.1",
                        headers={"Authorization": "Bearer e2e-operator-key-0123"}) as client:
            def say(text, conversation):
                response = client.post(f"/v1/conversations/{conversation}/messages",
                                       json={"user_id": "lena", "text": text})
                assert response.status_code == 200, response.text
                return response.json()

            answers = [say(text, "first") for text in TRANSCRIPT]
            replies = [a["reply"] for a in answers]
            for i, (said, reply) in enumerate(zip(TRANSCRIPT, replies)):
                verdict = check_reply(reply, user_text=said, earlier_replies=replies[:i])
                assert verdict.kind not in ("echo", "repeat", "empty"), (said, reply, verdict)
            assert len(set(replies)) == 3
            assert "Lena" in replies[1] and "Porto" in replies[1]
            assert {s["kind"] for s in answers[1]["sources"]} & {"persona", "memory"}

            again = say("Remind me, what is my name and where do I live?", "second")
            assert "Lena" in again["reply"] and "Porto" in again["reply"], again
            memories = [m["text"] for m in client.get("/v1/users/lena/export").json()["memories"]]
            assert memories == ["My name is Lena and I live in Porto."], memories  # the statement, not the greeting
    finally:
        services.close()
