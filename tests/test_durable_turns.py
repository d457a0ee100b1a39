"""Every channel records the message before it generates: pending turns, redeliveries, kill -9 mid-reply."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import IO

import pytest

from bot.services import open_services
from conftest import REPO
from dialogue.errors import AlreadyHandled, InvalidInput
from dialogue.leases import TurnLeases
from dialogue.manager import Context, interrupted_notice
from dialogue.store import TranscriptStore, Turn, utcnow
from test_concurrency import at_once
from test_chatwoot import standin as standin_chatwoot  # noqa: F401  (the Chatwoot stand-in fixture)
from test_telegram import TOKEN, Running, fixed_answer, replies
from tests.telegram_standin import Standin

pytestmark = pytest.mark.timeout(180)
ANN = 1001


async def test_the_message_is_on_disk_before_its_reply_is_made(services):
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="Hello!")
    row = services.store.get_turn(reply.turn_id)
    assert (row.user_text, row.reply, row.finish_reason) == ("Hello!", "", "pending")
    assert services.manager.leases.held() == [reply.turn_id]
    await reply.complete()
    row = services.store.get_turn(reply.turn_id)
    assert row.finish_reason in ("stop", "length") and row.reply == reply.text and row.seq == 1
    assert services.manager.leases.held() == []


async def test_a_redelivered_event_is_recognised_and_recorded_once(services):
    say = dict(user_id="u1", conversation_id="c1", channel="telegram")
    first = await services.manager.respond(text="Hello!", event_id="77", **say)
    with pytest.raises(AlreadyHandled):  # while the first delivery is still being answered
        await services.manager.respond(text="Hello!", event_id="77", **say)
    await first.complete()
    with pytest.raises(AlreadyHandled):  # and after
        await services.manager.respond(text="Hello!", event_id="77", **say)
    assert len(services.store.export_user("u1")["turns"]) == 1
    for expected in (InvalidInput, AlreadyHandled):  # a refused message is handled too: refused once
        with pytest.raises(expected):
            await services.manager.respond(text="x" * 100_000, event_id="78", **say)
    assert len(services.store.export_user("u1")["turns"]) == 1


async def test_a_reply_finished_after_its_user_was_erased_is_not_recorded(services):
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="Hello!")
    services.store.delete_user("u1")
    await reply.complete()
    assert not reply.recorded and services.store.export_user("u1")["turns"] == []


def test_a_channel_event_is_claimed_once_on_every_database(db_url):
    store = TranscriptStore(db_url)  # psycopg reports rowcount -1 for INSERT … ON CONFLICT: a claim must not use it
    try:
        store.ensure_conversation(conversation_id="c1", user_id="u1", channel="t")
        first = Turn(conversation_id="c1", user_id="u1", channel="t", user_text="hi", reply="", finish_reason="pending")
        store.record_turn(first, event=("t", "update-1"))
        with pytest.raises(AlreadyHandled):  # the same update delivered again writes nothing
            store.record_turn(Turn(conversation_id="c1", user_id="u1", channel="t", user_text="hi", reply="",
                                   finish_reason="pending"), event=("t", "update-1"))
        assert [t["id"] for t in store.export_user("u1")["turns"]] == [first.id]
        assert store.claim_event(channel="t", event_id="update-2") is True
        assert store.claim_event(channel="t", event_id="update-2") is False
        assert store.claim_event(channel="t", event_id="update-1") is False
    finally:
        store.close()


def test_abandoned_pending_turns_are_closed_once_and_live_ones_never(db_url):
    store = TranscriptStore(db_url)
    leases = TurnLeases(store, lease_s=0.6)
    try:
        store.ensure_conversation(conversation_id="c1", user_id="u1", channel="t")
        dead = store.record_turn(Turn(conversation_id="c1", user_id="u1", channel="t", user_text="lost?", reply="",
                                      finish_reason="pending"))  # its process died: nobody renews it
        live = store.record_turn(Turn(conversation_id="c1", user_id="u1", channel="t", user_text="busy", reply="",
                                      finish_reason="pending"))
        leases.hold(live.id)
        time.sleep(1.5)
        stale_before = utcnow() - timedelta(seconds=0.6)
        swept = at_once(4, lambda _: store.close_abandoned(stale_before=stale_before))  # four processes sweep
        assert [t.id for closed in swept for t in closed] == [dead.id]
        assert store.get_turn(dead.id).finish_reason == "interrupted"
        assert store.get_turn(live.id).finish_reason == "pending"
        assert store.close_abandoned(stale_before=utcnow(), exclude={"t"}) == []
    finally:
        leases.close()
        store.close()


# -- a real process killed mid-reply ---------------------------------------------------------------

BOT = """
import asyncio, logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from bot.services import open_services
from bot.telegram.handlers import TelegramBot, run_bot
from dialogue.manager import Context, interrupted_notice

async def recall(user_id, text):
    return Context(answer="Here is my answer to: " + text)

async def main():
    services = open_services()
    services.manager.recall = recall
    await run_bot(TelegramBot(services), sys.argv[1], base_url=sys.argv[2], stop=asyncio.Event())

asyncio.run(main())
"""


def start_bot(tiny_settings, home, standin: Standin) -> tuple[subprocess.Popen, IO]:
    """`BOT` in a process of its own, polling the stand-in; its log in the home."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAPPORT_HOME": str(home), "RAPPORT_MODEL": tiny_settings.model,
           "RAPPORT_DTYPE": "float32", "RAPPORT_THREADS": "1", "RAPPORT_TURN_LEASE_S": "8"}  # slack for a machine busy loading models
    log = open(home / "bot.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", BOT, TOKEN, standin.base_url], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, log


@contextlib.contextmanager
def killed_at_exit(tiny_settings, home, standin: Standin) -> Iterator[subprocess.Popen]:
    """The bot in a process of its own (`start_bot`), killed with SIGKILL when the block ends, however it ends."""
    proc, log = start_bot(tiny_settings, home, standin)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log.close()


async def hang_mid_reply(standin: Standin, text: str) -> None:
    """Ann sends `text` and the reply's first message hangs: the bot is mid-reply when this returns."""
    standin.delay("sendMessage", 600, chat_id=ANN)
    standin.message(text, chat_id=ANN)
    await standin.wait_for(lambda: standin.calls_to("sendMessage", ANN, ok_only=False), 120, "the reply")


@pytest.mark.timeout(300)
async def test_kill_9_mid_reply_then_restart_tells_the_user_once_and_never_answers_twice(tiny_settings, home):
    standin = Standin(token=TOKEN).start()
    with killed_at_exit(tiny_settings, home, standin):
        await hang_mid_reply(standin, "Where is my parcel?")
    try:
        settings = tiny_settings.model_copy(update={"turn_lease_s": 8.0})
        services = open_services(settings)
        [turn] = services.store.export_user(f"telegram:{ANN}")["turns"]
        assert (turn["user_text"], turn["finish_reason"]) == ("Where is my parcel?", "pending")  # never lost
        standin.undelay()
        standin.unconfirm()  # the dead process never confirmed the update: Telegram delivers it again
        services.manager.recall = fixed_answer("Here it is.")
        for _ in range(2):  # two restarts: the user is told once
            async with Running(services, standin):
                await standin.wait_for(lambda: [m for m in standin.sent_to(ANN) if "interrupted" in m.text], 60,
                                       "the notice")
                await asyncio.sleep(3)  # the redelivered update comes and goes unanswered
        notices = [m.text for m in standin.sent_to(ANN) if "interrupted" in m.text]
        assert notices == ["Sorry, I was interrupted while answering your message “Where is my parcel?”, and that "
                           "reply was lost. Please send it again."]
        assert replies(standin, ANN) == []  # the redelivered update was not answered a second time
        [turn] = services.store.export_user(f"telegram:{ANN}")["turns"]
        assert turn["finish_reason"] == "interrupted"
        async with Running(services, standin):  # the chat goes on
            standin.message("Where is my parcel?", chat_id=ANN)
            await standin.wait_for(lambda: replies(standin, ANN), 30, "the answer")
        services.close()
    finally:
        standin.stop()


@pytest.mark.timeout(300)
async def test_kill_9_mid_reply_loses_no_message_waiting_behind_it_in_the_chat(tiny_settings, home):
    standin = Standin(token=TOKEN).start()
    settings = tiny_settings.model_copy(update={"turn_lease_s": 8.0})
    with killed_at_exit(tiny_settings, home, standin):
        await hang_mid_reply(standin, "Where is my parcel?")
        second = standin.message("And my refund?", chat_id=ANN)  # waits for the first reply to be answered
        await standin.wait_for(lambda: standin.confirmed(second), 30, "the second message confirmed to Telegram")
        store = TranscriptStore(settings.db_url)
        with contextlib.suppress(AssertionError):  # a moment for the bot to write it down, if it does
            await standin.wait_for(lambda: len(store.export_user(f"telegram:{ANN}")["turns"]) == 2, 10)
        store.close()
    try:
        standin.undelay()
        services = open_services(settings)
        services.manager.recall = fixed_answer("Here it is.")

        def told() -> list[str]:
            return [m.text for m in standin.sent_to(ANN) if "interrupted" in m.text]

        for _ in range(2):  # two restarts: each message is told once (Telegram never sends them again)
            async with Running(services, standin):
                await standin.wait_for(told, 60, "the notices")
                await asyncio.sleep(2)
        assert sorted(told()) == sorted(interrupted_notice(t) for t in ("Where is my parcel?", "And my refund?"))
        assert replies(standin, ANN) == []
        turns = services.store.export_user(f"telegram:{ANN}")["turns"]
        assert [(t["user_text"], t["finish_reason"]) for t in turns] == [("Where is my parcel?", "interrupted"),
                                                                          ("And my refund?", "interrupted")]
        services.close()
    finally:
        standin.stop()


# -- Chatwoot --------------------------------------------------------------------------------------


def test_chatwoot_tells_customers_of_a_reply_a_dead_process_left_once(tiny_settings, standin_chatwoot):
    from test_chatwoot import ACCOUNT, CONTACT, KEY, MESSAGES, Rig, posts

    settings = tiny_settings.model_copy(update={"turn_lease_s": 0.5})
    store = TranscriptStore(settings.db_url)
    store.ensure_conversation(conversation_id=KEY, user_id=f"chatwoot:{ACCOUNT}:{CONTACT}", channel="chatwoot")
    store.record_turn(Turn(conversation_id=KEY, user_id=f"chatwoot:{ACCOUNT}:{CONTACT}", channel="chatwoot",
                           user_text="Do you repair bikes?", reply="", finish_reason="pending",
                           finished_at=utcnow() - timedelta(seconds=5)))  # as a killed process left it
    store.close()
    rig = Rig(settings, standin_chatwoot.url)
    try:
        from test_api import wait_for

        wait_for(lambda: posts(standin_chatwoot.calls), 20)
        time.sleep(1.5)  # more sweeps: still once
        [call] = posts(standin_chatwoot.calls, MESSAGES)
        assert "interrupted" in call["json"]["content"] and "Do you repair bikes?" in call["json"]["content"]
    finally:
        rig.close()


def test_chatwoot_shutdown_lets_replies_finish_then_tells_those_it_cut(tiny_settings, standin_chatwoot):
    from test_api import wait_for
    from test_chatwoot import ACCOUNT, CONTACT, KEY, MESSAGES, Rig, message_event, posts

    never = asyncio.Event()

    async def slow(user_id: str, text: str) -> Context:
        if "slow" in text:
            await never.wait()  # shutdown has to cut this one
        return Context(answer=f"Answer to: {text}")

    rig = Rig(tiny_settings, standin_chatwoot.url, recall=slow)
    try:
        rig.app.state.channels[0].drain_s = 1.0
        assert rig.post(message_event(501, "a slow question")).json()["accepted"]
        assert rig.post(message_event(502, "a quick question", conversation=43)).json()["accepted"]
        other = f"/api/v1/accounts/{ACCOUNT}/conversations/43/messages"
        wait_for(lambda: posts(standin_chatwoot.calls, other), 20)
    finally:
        rig.close()  # the server's shutdown: the slow reply is cut after drain_s
    texts = [c["json"]["content"] for c in posts(standin_chatwoot.calls, MESSAGES)]
    assert texts == ["Sorry, I was interrupted while answering your message “a slow question”, and that reply "
                     "was lost. Please send it again."]
    store = TranscriptStore(tiny_settings.db_url)
    [turn] = store.history(conversation_id=KEY, user_id=f"chatwoot:{ACCOUNT}:{CONTACT}")
    assert turn.finish_reason == "interrupted"
    store.close()


async def test_a_reply_given_up_before_it_was_read_is_closed_not_left_pending(services):
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="Hello!")
    reply.discard()  # e.g. Telegram could not send a notice first
    assert services.store.get_turn(reply.turn_id).finish_reason == "interrupted"
    assert services.manager.leases.held() == []
    with pytest.raises(RuntimeError):
        await reply.complete()
