"""Every REPL slash command on the real stores and the tiny model; each effect is checked where it lands."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from bot.repl import REPL_COMMANDS, ChatSession, run_piped

FAQ = Path(__file__).resolve().parent.parent / "examples" / "faq" / "bikeshop.jsonl"


async def say(session: ChatSession, text: str) -> str:
    shown: list[str] = []
    await session.reply(text, shown.append, shown.append)
    return "".join(shown)


async def test_help_lists_every_command_and_unknown_ones_are_named(services):
    session = ChatSession(services, "lena")
    shown = await session.command("/help")
    assert all(f"/{name}" in shown for name in REPL_COMMANDS)
    assert await session.command("/nonsense now") == "Unknown command /nonsense. Type /help for the list."
    assert await session.command("/quit") is None and await session.command("/EXIT") is None


async def test_rate_up_and_down_reach_the_store_and_two_downs_hand_off(services):
    session = ChatSession(services, "lena", conversation_id="c-lena")
    assert await session.command("/rate up") == "There is no reply of mine to rate yet."
    await say(session, "Hello!")
    first = session.last_reply.turn_id
    assert await session.command("/rate up really nice") == "Thanks, noted."
    [rating] = services.store.export_user("lena")["ratings"]
    assert (rating["turn_id"], rating["rating"], rating["comment"]) == (first, 1, "really nice")
    assert await session.command("/rate sideways") == "Usage: /rate up|down [comment]"

    assert await session.command("/rate down") == "Thanks, noted. I'll try to do better."
    assert [r["rating"] for r in services.store.export_user("lena")["ratings"]] == [-1]  # the latest verdict wins
    await say(session, "Can you help me plan a trip?")
    assert "handing this conversation to a colleague" in await session.command("/rate down")
    await services.desk.drain()
    assert services.store.get_conversation("c-lena").status == "human"  # two downs in a row: a person takes over


async def test_persona_shows_sets_and_refuses_unknown_fields(services):
    session = ChatSession(services, "lena")
    assert (await session.command("/persona")).startswith("I know nothing about you yet")
    shown = await session.command("/persona set name=Lena")
    assert shown.startswith("Saved name.") and "name: Lena" in shown
    assert services.personas.get("lena").name == "Lena"
    assert (await session.command("/persona set colour=blue")).startswith("unknown persona field 'colour'")
    assert (await session.command("/persona name Lena")).startswith("Usage: /persona [set key=value]")
    assert "name: Lena" in await session.command("/persona")
    await session.command("/persona set name=")  # an empty value clears the field
    assert services.personas.get("lena").name == ""


async def test_memory_lists_what_was_said_and_forget_erases_one_or_all(services):
    session = ChatSession(services, "lena")
    assert await session.command("/memory") == "I remember nothing about you yet."
    await say(session, "I am allergic to peanuts.")
    await say(session, "My bike is a green Gazelle.")
    memory = services.memory.for_user("lena")
    by_text = {m.text: m.id for m in memory.list()}
    assert set(by_text) == {"I am allergic to peanuts.", "My bike is a green Gazelle."}
    shown = await session.command("/memory")
    assert all(f"{mid}  {text}" in shown for text, mid in by_text.items())

    peanuts = by_text["I am allergic to peanuts."]
    assert await session.command(f"/forget {peanuts}") == f"Forgot {peanuts}."
    assert [m.text for m in memory.list()] == ["My bike is a green Gazelle."]
    assert await session.command(f"/forget {peanuts}") == f"no memory {peanuts!r}"  # gone already
    assert (await session.command("/forget")).startswith("Usage: /forget ID|all")
    assert await session.command("/forget all") == "Forgot everything I remembered (1 memories)."
    assert memory.list() == []


async def test_sources_name_the_faq_entry_behind_the_last_reply_and_new_starts_afresh(services):
    services.faq.import_file(FAQ)
    session = ChatSession(services, "lena")
    assert await session.command("/sources") == "There is no reply yet."
    answer = await say(session, "What are your opening hours?")
    assert answer == services.faq.get("hours").answer
    shown = await session.command("/sources")
    assert shown.startswith("My last reply came from:") and "faq:hours  score " in shown

    before = session.conversation_id
    assert (await session.command("/new")).startswith("Started a new conversation")
    assert session.conversation_id != before and await session.command("/sources") == "There is no reply yet."
    await say(session, "Hello!")
    assert {c["id"] for c in services.store.export_user("lena")["conversations"]} == {before, session.conversation_id}


async def test_export_is_everything_kept_about_the_user_as_json(services):
    session = ChatSession(services, "lena")
    await session.command("/persona set name=Lena")
    await say(session, "I am allergic to peanuts.")
    data = json.loads(await session.command("/export"))
    assert data["user_id"] == "lena" and data["persona"]["name"] == "Lena"
    assert [t["user_text"] for t in data["turns"]] == ["I am allergic to peanuts."]
    assert [m["text"] for m in data["memories"]] == ["I am allergic to peanuts."]


def test_piped_input_runs_commands_and_messages_in_order_and_stops_at_quit(tiny_settings, capsys):
    from bot.services import open_services

    services = open_services(tiny_settings)
    try:
        out = io.StringIO()
        stdin = io.BytesIO(b"/persona set name=Lena\nHello!\n/rate up\n" + b"x" * 9000 + b"\n/quit\nnever read\n")
        assert run_piped(ChatSession(services, "lena"), stdin=stdin, stdout=out) == 0
        shown = out.getvalue()
        assert "name: Lena" in shown and "Thanks, noted." in shown
        assert "error: the message is 9000 characters; the limit is 8000" in capsys.readouterr().err
        [turn] = services.store.export_user("lena")["turns"]  # the 9000-character line was refused, not cut
        assert turn["user_text"] == "Hello!"
        assert [r["rating"] for r in services.store.export_user("lena")["ratings"]] == [1]
    finally:
        services.close()


def test_a_new_repl_tells_its_user_of_the_message_a_dead_one_left_unanswered_and_only_theirs(tiny_settings, capsys):
    from bot.services import open_services
    from dialogue.store import Turn

    services = open_services(tiny_settings.model_copy(update={"turn_lease_s": 0.5}))
    try:
        store = services.store
        for user in ("lena", "max"):  # a terminal closed mid-reply: the turns are pending, nobody renews them
            store.ensure_conversation(conversation_id=f"c-{user}", user_id=user, channel="repl")
            store.record_turn(Turn(conversation_id=f"c-{user}", user_id=user, channel="repl", reply="",
                                   user_text=f"Where did I park, {user}?", finish_reason="pending"))
        time.sleep(1.0)
        out = io.StringIO()
        assert run_piped(ChatSession(services, "lena"), stdin=io.BytesIO(b"/quit\n"), stdout=out) == 0
        err = capsys.readouterr().err
        assert "I was interrupted while answering your message “Where did I park, lena?”" in err
        assert "max" not in err + out.getvalue()  # another user's words are never shown here
        assert [t["finish_reason"] for t in store.export_user("lena")["turns"]] == ["interrupted"]
        assert [t["finish_reason"] for t in store.export_user("max")["turns"]] == ["pending"]  # told in their REPL
        run_piped(ChatSession(services, "lena"), stdin=io.BytesIO(b"/quit\n"), stdout=io.StringIO())
        assert "interrupted" not in capsys.readouterr().err  # told once
    finally:
        services.close()


def test_an_answer_from_the_profile_does_not_wait_for_the_model_weights(tiny_settings, monkeypatch):
    import dialogue.model.backend as backend_module
    from bot.services import open_services

    loaded = backend_module.load_model

    def slow_load(*args, **kwargs):  # weights that take their time, as on a slow laptop's first start
        time.sleep(4)
        return loaded(*args, **kwargs)

    monkeypatch.setattr(backend_module, "load_model", slow_load)
    services = open_services(tiny_settings)
    try:
        services.personas.update("lena", {"name": "Lena"})
        started = time.perf_counter()
        out = io.StringIO()
        assert run_piped(ChatSession(services, "lena"), stdin=io.BytesIO(b"What is my name?\n"), stdout=out) == 0
        assert "Lena" in out.getvalue() and time.perf_counter() - started < 3.5
        assert not services.backend.is_ready()  # answered while the weights were still loading
        assert run_piped(ChatSession(services, "lena"), stdin=io.BytesIO(b"Hello!\n"), stdout=io.StringIO()) == 0
        assert services.backend.is_ready()  # a model reply waits for them
        assert [t["finish_reason"] in ("stop", "length") for t in services.store.export_user("lena")["turns"]] == [True] * 2
    finally:
        services.close()


def test_a_model_that_cannot_load_ends_a_piped_chat_with_one_error(home, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAPPORT_HOME": str(home), "RAPPORT_MODEL": str(tmp_path / "no-such-model")}
    done = subprocess.run([sys.executable, "-m", "bot.cli", "chat", "--user", "lena"], input=b"Hello!\nAgain?\n",
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.count(b"error:") == 1, done.stderr.decode()
    assert b"no-such-model" in done.stderr and b"Traceback" not in done.stderr
