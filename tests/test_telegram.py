"""The Telegram bot against a stand-in Bot API on 127.0.0.1, driven by the real python-telegram-bot client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from telegram import Bot

from bot.telegram.handlers import COMMANDS, TelegramBot, Webhook, run_bot
from bot.telegram.net import RetryingRequest
from bot.telegram.format import MESSAGE_LIMIT, split_message, to_html, utf16_len
from bot.telegram.stream import ReplyStream
from dialogue.manager import Context
from bot.services import open_services
from tests.telegram_standin import ApiError, Standin, free_port, parse_html

pytestmark = pytest.mark.timeout(120)
TOKEN = "123:ABC"
ANN, BEN = 1001, 1002
GROUP = -100500


@pytest.fixture
def standin():
    server = Standin(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def operators() -> list:
    """The handoff events the operators are told of (what the handoff webhook or an operators' chat receives)."""
    return []


@pytest.fixture
async def services(tiny_settings, operators):
    tiny_settings.telegram_edit_interval = 0.3
    tiny_settings.telegram_group_edit_interval = 0.3
    tiny_settings.telegram_retry_budget = 20

    async def tell(event) -> None:
        operators.append(event)

    opened = open_services(tiny_settings, listeners=[tell])
    await opened.backend.ready()
    yield opened
    opened.close()


class Running:
    """A bot running as `rapport telegram` runs it, stopped at the end of the test."""

    def __init__(self, services, standin, **kwargs) -> None:
        self.bot = TelegramBot(services)
        self.standin = standin
        self.kwargs = kwargs
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Running:
        ready = asyncio.Event()
        self.task = asyncio.create_task(run_bot(self.bot, TOKEN, base_url=self.standin.base_url, stop=self.stop,
                                                ready=ready, **self.kwargs))
        done, _ = await asyncio.wait([self.task, asyncio.create_task(ready.wait())], timeout=20,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)


def replies(standin: Standin, chat_id: int, *, with_buttons: bool = True):
    """The bot's finished replies in a chat (those carrying rating buttons)."""
    return [m for m in standin.sent_to(chat_id) if not with_buttons or _has_rating(m)]


def _has_rating(message) -> bool:
    rows = (message.reply_markup or {}).get("inline_keyboard", [])
    return any(b.get("callback_data", "").startswith("rate:") for row in rows for b in row)


async def wait_replies(standin: Standin, chat_id: int, count: int = 1, timeout: float = 30):
    return await standin.wait_for(lambda: len(replies(standin, chat_id)) >= count and replies(standin, chat_id),
                                  timeout, f"{count} replies in chat {chat_id}")


def fixed_answer(text: str):
    """A recall that answers verbatim (as a FAQ hit does), so a test controls the reply's text."""
    async def recall(user_id: str, message: str) -> Context:
        return Context(answer=text)
    return recall


# -- commands ------------------------------------------------------------------------------------


async def test_start_registers_commands_and_greets_with_a_privacy_notice(services, standin):
    async with Running(services, standin):
        standin.message("/start", chat_id=ANN)
        greeting = await standin.wait_for(lambda: standin.sent_to(ANN), what="the greeting")
        help_ = standin.message("/help", chat_id=ANN)
        await standin.wait_for(lambda: len(standin.sent_to(ANN)) == 2, what="the help")
    commands = standin.calls_to("setMyCommands")[0].params["commands"]
    assert [c["command"] for c in commands] == [name for name, _ in COMMANDS]
    text = greeting[0].text
    assert text.startswith("Hi, Ann!") and "Privacy." in text and "/delete_me" in text and "/export" in text
    assert "/forget" in standin.sent_to(ANN)[1].text and help_


# -- talking -------------------------------------------------------------------------------------------


async def test_a_reply_is_streamed_with_typing_first_and_rating_buttons_last(services, standin):
    async with Running(services, standin):
        standin.message("Hello! How can I help you today?", chat_id=ANN)
        [reply] = await wait_replies(standin, ANN)
    typing = standin.calls_to("sendChatAction", ANN)[0]
    first_send = standin.calls_to("sendMessage", ANN)[0]
    assert typing.params["action"] == "typing" and typing.at <= first_send.at
    turn = services.store.export_user(f"telegram:{ANN}")["turns"][0]
    assert turn["conversation_id"] == f"telegram:{ANN}:1" and turn["channel"] == "telegram"
    assert reply.text.strip() == (turn["reply"].strip() or "(no reply)")
    buttons = reply.reply_markup["inline_keyboard"][0]
    assert [b["text"] for b in buttons] == ["👍", "👎"]
    assert buttons[0]["callback_data"] == f"rate:{turn['id']}:1"


async def test_a_long_stream_is_edited_about_once_a_second_and_split_past_4096(standin):
    async with Bot(TOKEN, base_url=standin.base_url) as bot:
        stream = ReplyStream(bot, ANN, interval=1.0)
        words = [f"word{i} " for i in range(900)]  # about 7 KB in 2.7 s
        started = time.monotonic()
        for word in words:
            await stream.add(word)
            await asyncio.sleep(0.003)
        await stream.finish()
        elapsed = time.monotonic() - started
    sends, edits = standin.calls_to("sendMessage", ANN), standin.calls_to("editMessageText", ANN)
    assert len(sends) == 2  # split in two messages
    assert edits and sends[0].at < edits[0].at  # shown early, then grown: not one send at the end
    assert len(sends) + len(edits) <= elapsed / 1.0 + 3  # ~1 update a second, plus the final one and the split
    shown = [m.text for m in standin.sent_to(ANN)]
    assert all(utf16_len(t) <= MESSAGE_LIMIT for t in shown)
    assert " ".join(shown).split() == "".join(words).split()


async def test_a_stream_whose_message_was_deleted_goes_on_in_a_new_one(standin):
    async with Bot(TOKEN, base_url=standin.base_url) as bot:
        stream = ReplyStream(bot, ANN, interval=0)
        await stream.add("The first words")
        standin.delete(stream.messages[0].message_id)
        await stream.add(" and the rest.")
        await stream.finish()
    [message] = standin.sent_to(ANN)
    assert message.text == "The first words and the rest." and len(stream.messages) == 1


async def test_a_10kb_message_is_refused_with_the_limit_and_the_chat_goes_on(services, standin):
    long = "The shop opens at nine and closes at six. " * 240  # ~10 KB
    async with Running(services, standin):
        standin.message(long, chat_id=ANN)
        told = await standin.wait_for(lambda: [m for m in standin.sent_to(ANN) if "limit" in m.text], what="refusal")
        standin.message("Hello!", chat_id=ANN)
        await wait_replies(standin, ANN)
    assert told[0].text == f"the message is {len(long.strip())} characters; the limit is 8000"
    [turn] = services.store.export_user(f"telegram:{ANN}")["turns"]  # nothing of the long one was kept
    assert turn["user_text"] == "Hello!"


async def test_over_the_queue_cap_a_message_is_refused_politely_and_sent_again_it_is_answered(services, standin):
    services.settings.max_queue = 1
    busy = await services.manager.respond(user_id="u2", conversation_id="w1", text="Hello!")  # the one turn it takes
    async with Running(services, standin):
        standin.message("Hello?", chat_id=ANN)
        told = await standin.wait_for(lambda: standin.sent_to(ANN), what="the refusal")
        assert services.store.export_user(f"telegram:{ANN}")["turns"] == []  # refused before anything was taken
        await busy.complete()
        standin.message("Hello?", chat_id=ANN)
        await wait_replies(standin, ANN)
    assert told[0].text == "Sorry, I'm answering a lot of messages right now. Please send that again in a moment."
    [turn] = services.store.export_user(f"telegram:{ANN}")["turns"]
    assert turn["user_text"] == "Hello?" and turn["finish_reason"] != "pending"


async def test_a_10kb_reply_is_split_cleanly_with_buttons_on_its_last_piece(services, standin):
    paragraph = "Bikes need care. " * 30 + "\n\n"
    code = "```python\n" + "\n".join(f"print({i})  # <tag> & co" for i in range(120)) + "\n```\n"
    answer = paragraph * 10 + code + paragraph * 4
    services.manager.recall = fixed_answer(answer)
    async with Running(services, standin):
        standin.message("Tell me everything", chat_id=ANN)
        await wait_replies(standin, ANN)
    messages = standin.sent_to(ANN)
    assert len(messages) >= 3
    assert all(utf16_len(m.text) <= MESSAGE_LIMIT for m in messages)
    assert [_has_rating(m) for m in messages] == [False] * (len(messages) - 1) + [True]
    visible = " ".join(m.text for m in messages)
    assert visible.split() == to_visible(answer).split()
    assert all(m.raw.count("<pre>") == m.raw.count("</pre>") for m in messages)


def to_visible(markdown: str) -> str:
    return parse_html(to_html(markdown))


async def test_markup_rejected_by_telegram_falls_back_to_plain_text(services, standin):
    standin.reject_html = True
    services.manager.recall = fixed_answer("Use **bold** & `code` <here>")
    async with Running(services, standin):
        standin.message("hi", chat_id=ANN)
        [reply] = await wait_replies(standin, ANN)
    assert reply.parse_mode is None and reply.text == "Use **bold** & `code` <here>"


async def test_hostile_text_is_shown_literally_never_as_markup(services, standin):
    hostile = '<b>not bold</b> <a href="javascript:alert(1)">x</a> &amp; [ok](https://example.com/?a=1&b=2) **yes**'
    services.manager.recall = fixed_answer(hostile)
    async with Running(services, standin):
        standin.message("hi", chat_id=ANN)
        [reply] = await wait_replies(standin, ANN)
    assert reply.parse_mode == "HTML"
    assert '<b>not bold</b> <a href="javascript:alert(1)">x</a> &amp; ok yes' == reply.text
    assert '<a href="https://example.com/?a=1&amp;b=2">ok</a>' in reply.raw and "<b>yes</b>" in reply.raw


# -- ratings ---------------------------------------------------------------------------------------------


async def test_a_button_press_is_stored_and_acknowledged_quietly(services, standin):
    async with Running(services, standin):
        standin.message("Hello!", chat_id=ANN)
        [reply] = await wait_replies(standin, ANN)
        turn_id = reply.reply_markup["inline_keyboard"][0][0]["callback_data"].split(":")[1]
        standin.press(reply.message_id, f"rate:{turn_id}:1", user_id=ANN)
        await standin.wait_for(lambda: not _has_rating(standin.messages[reply.message_id]), what="the ack")
        await standin.wait_for(lambda: standin.calls_to("answerCallbackQuery"), what="the answer")
    [rating] = services.store.export_user(f"telegram:{ANN}")["ratings"]
    assert rating["turn_id"] == turn_id and rating["rating"] == 1
    assert standin.messages[reply.message_id].reply_markup["inline_keyboard"][0][0]["text"] == "👍 Thanks!"


async def test_a_thumbs_down_asks_for_a_better_reply_and_keeps_it_as_a_correction(services, standin):
    async with Running(services, standin):
        standin.message("What is my name?", chat_id=ANN)
        [reply] = await wait_replies(standin, ANN)
        turn_id = reply.reply_markup["inline_keyboard"][0][1]["callback_data"].split(":")[1]
        standin.press(reply.message_id, f"rate:{turn_id}:-1", user_id=ANN)
        await standin.wait_for(lambda: any("better reply" in m.text for m in standin.sent_to(ANN)), what="the question")
        standin.message("Your name is Ann.", chat_id=ANN)
        await standin.wait_for(lambda: any("learn from that" in m.text for m in standin.sent_to(ANN)), what="thanks")
    data = services.store.export_user(f"telegram:{ANN}")
    assert [(r["rating"], r["correction"]) for r in data["ratings"]] == [(-1, "Your name is Ann.")]
    assert len(data["turns"]) == 1  # the correction was not answered as a new message


async def test_asking_for_a_person_hands_off_and_the_bot_stays_silent_until_handed_back(services, standin, operators):
    services.manager.recall = fixed_answer("Happy to help.")
    events = operators
    conversation = f"telegram:{ANN}:1"
    async with Running(services, standin):
        standin.message("Hi there", chat_id=ANN)
        await wait_replies(standin, ANN)
        standin.message("Can I talk to a real person please?", chat_id=ANN)
        told = await standin.wait_for(lambda: [m for m in standin.sent_to(ANN) if "colleague" in m.text], what="handover")
        assert not _has_rating(told[0])  # the handover line is not the bot's answer to rate
        await standin.wait_for(lambda: events, what="the handoff event")
        assert services.store.get_conversation(conversation).status == "human"
        sent = len(standin.sent_to(ANN))

        standin.message("Hello? Anyone?", chat_id=ANN)
        user = f"telegram:{ANN}"
        await standin.wait_for(lambda: len(services.store.history(conversation_id=conversation, user_id=user)) == 3,
                               what="the waiting turn")
        await asyncio.sleep(0.5)
        assert len(standin.sent_to(ANN)) == sent  # silent while a person has the conversation

        await services.desk.resume(conversation)
        standin.message("Thanks, back to you", chat_id=ANN)
        await wait_replies(standin, ANN, count=2)
    [event] = events
    assert (event.reason, event.channel, event.user_id) == ("customer_request", "telegram", f"telegram:{ANN}")
    turns = services.store.history(conversation_id=conversation, user_id=f"telegram:{ANN}")
    assert [t.finish_reason for t in turns] == ["stop", "stop", "handoff", "stop"]
    assert turns[2].reply == "" and turns[3].reply == "Happy to help."


async def test_two_thumbs_down_in_a_row_hand_the_conversation_to_a_person(services, standin):
    services.manager.recall = fixed_answer("Happy to help.")
    async with Running(services, standin):
        for n, text in enumerate(["First question", "Second question"], start=1):
            standin.message(text, chat_id=ANN)
            reply = (await wait_replies(standin, ANN))[-1]  # the one reply still carrying its buttons
            turn_id = reply.reply_markup["inline_keyboard"][0][1]["callback_data"].split(":")[1]
            standin.press(reply.message_id, f"rate:{turn_id}:-1", user_id=ANN)
            asked = await standin.wait_for(lambda: [m for m in standin.sent_to(ANN) if "better reply" in m.text][n - 1:],
                                           what="the question for a better reply")
            standin.press(asked[0].message_id, "skip", user_id=ANN)  # no correction: the next message is a question
            await standin.wait_for(lambda: len(services.store.export_user(f"telegram:{ANN}")["ratings"]) == n,
                                   what="the rating")
        await services.desk.drain()
    assert services.store.get_conversation(f"telegram:{ANN}:1").status == "human"


async def test_nobody_else_can_rate_my_reply_in_a_group(services, standin):
    async with Running(services, standin):
        standin.message(f"@{standin.username} hello", chat_id=GROUP, user_id=ANN, chat_type="supergroup")
        [reply] = await wait_replies(standin, GROUP)
        turn_id = reply.reply_markup["inline_keyboard"][0][0]["callback_data"].split(":")[1]
        standin.press(reply.message_id, f"rate:{turn_id}:-1", user_id=BEN, chat_type="supergroup")
        await standin.wait_for(lambda: standin.calls_to("answerCallbackQuery"), what="the refusal")
    assert "Only the person" in standin.calls_to("answerCallbackQuery")[0].params["text"]
    assert services.store.export_user(f"telegram:{ANN}")["ratings"] == []
    assert _has_rating(standin.messages[reply.message_id])


# -- groups, allowlist, bad input -----------------------------------------------------------------------


async def test_groups_answer_only_when_mentioned_or_replied_to(services, standin):
    async with Running(services, standin):
        standin.message("just chatting among ourselves", chat_id=GROUP, user_id=ANN, chat_type="supergroup")
        standin.message(f"hey @{standin.username.upper()} what time do you open?", chat_id=GROUP, user_id=BEN,
                        chat_type="supergroup")
        [first] = await wait_replies(standin, GROUP)
        standin.message("and on sundays?", chat_id=GROUP, user_id=BEN, chat_type="supergroup", reply_to=first.message_id)
        await wait_replies(standin, GROUP, 2)
        standin.message("@someone_else hi", chat_id=GROUP, user_id=ANN, chat_type="supergroup")
        await asyncio.sleep(1.0)
    assert len(replies(standin, GROUP)) == 2
    assert services.store.export_user(f"telegram:{ANN}")["turns"] == []
    assert services.store.export_user(f"telegram:{BEN}")["turns"] == []  # a group is a scope of its own
    ben = services.store.export_user(f"telegram:{BEN}@{GROUP}")["turns"]
    assert [t["user_text"] for t in ben] == ["hey  what time do you open?", "and on sundays?"]
    assert ben[0]["conversation_id"] == f"telegram:{BEN}@{GROUP}:1"
    assert first.reply_to is not None  # in a group the reply quotes the question


async def test_group_replies_never_use_private_memories_and_personal_commands_stay_private(services, standin):
    from memory.memories import MemoryItem

    services.memory.for_user(f"telegram:{ANN}").add([MemoryItem(text="My doctor says I have diabetes")])
    services.personas.update(f"telegram:{ANN}", {"name": "Ann Secret"})
    async with Running(services, standin):
        standin.message(f"@{standin.username} what do you know about my health?", chat_id=GROUP, user_id=ANN,
                        chat_type="supergroup")
        await wait_replies(standin, GROUP)
        for command in ("/memory", f"/export@{standin.username}", "/persona", "/forget all"):
            standin.message(command, chat_id=GROUP, user_id=ANN, chat_type="supergroup")
        await standin.wait_for(lambda: len([m for m in standin.sent_to(GROUP) if "private chat" in m.text]) == 4,
                               what="four pointers to the private chat")
        await asyncio.sleep(0.5)
    [turn] = services.store.export_user(f"telegram:{ANN}@{GROUP}")["turns"]
    assert "diabetes" not in turn["prompt"] and "Ann Secret" not in turn["prompt"]
    sent = " ".join(m.text for m in standin.sent_to(GROUP))
    assert "diabetes" not in sent and "Ann Secret" not in sent
    assert not any(m.document for m in standin.sent_to(GROUP))  # the export never goes to a group
    assert services.memory.for_user(f"telegram:{ANN}").list()  # and /forget all in a group forgot nothing


async def test_anonymous_admins_and_channel_posts_are_their_own_actor(services, standin):
    anonymous = {"id": 1087968824, "is_bot": True, "first_name": "Group", "username": "GroupAnonymousBot"}
    channel = {"id": -100777, "type": "channel", "title": "News"}
    async with Running(services, standin):
        standin.message(f"@{standin.username} hi from the admins", chat_id=GROUP, chat_type="supergroup",
                        extra={"from": anonymous, "sender_chat": standin.chat(GROUP, "supergroup")})
        standin.message(f"@{standin.username} hi from the channel", chat_id=GROUP, chat_type="supergroup",
                        extra={"from": anonymous, "sender_chat": channel})
        await wait_replies(standin, GROUP, 2)
    assert services.store.export_user(f"telegram:{anonymous['id']}@{GROUP}")["turns"] == []
    assert [t["user_text"] for t in services.store.export_user(f"telegram:chat:{GROUP}@{GROUP}")["turns"]] == [
        "hi from the admins"]
    assert [t["user_text"] for t in services.store.export_user(f"telegram:chat:-100777@{GROUP}")["turns"]] == [
        "hi from the channel"]


async def test_the_allowlist_keeps_strangers_out(services, standin):
    services.settings.telegram_allowed_ids = [str(ANN)]
    async with Running(services, standin):
        standin.message("hi, I am a stranger", chat_id=BEN)
        standin.message("hi", chat_id=ANN)
        await wait_replies(standin, ANN)
        await standin.wait_for(lambda: standin.sent_to(BEN), what="the refusal")
    assert standin.sent_to(BEN)[0].text == "Sorry, this assistant is private."
    assert services.store.export_user(f"telegram:{BEN}")["turns"] == []


async def test_bad_input_gets_a_polite_answer_and_nothing_breaks(services, standin):
    async with Running(services, standin):
        standin.message("\ud800 broken surrogate and \x00 nul", chat_id=ANN)
        await wait_replies(standin, ANN)
        standin.message(None, chat_id=ANN, extra={"sticker": {"file_id": "s", "file_unique_id": "s", "type": "regular",
                                                              "width": 1, "height": 1, "is_animated": False,
                                                              "is_video": False}})
        standin.message(f"@{standin.username}", chat_id=GROUP, user_id=ANN, chat_type="supergroup")
        standin.message("   \x1b\x07  ", chat_id=BEN)
        standin.message("/persona set colour=blue", chat_id=ANN)
        standin.message("/forget", chat_id=ANN)
        await standin.wait_for(lambda: len(standin.sent_to(ANN)) >= 4 and standin.sent_to(GROUP)
                               and standin.sent_to(BEN), what="four answers")
    texts = [m.text for m in standin.sent_to(ANN)]
    assert "I can only read text messages for now." in texts
    assert any(t.startswith("unknown persona field 'colour'") for t in texts)
    assert any(t.startswith("Usage: /forget") for t in texts)
    assert standin.sent_to(GROUP)[0].text == "Yes? Ask me anything."
    assert standin.sent_to(BEN)[0].text == "the message is empty"
    [turn] = services.store.export_user(f"telegram:{ANN}")["turns"]
    assert turn["user_text"] == "\ufffd broken surrogate and  nul"


# -- reliability -------------------------------------------------------------------------------------------


async def test_a_429_is_answered_by_waiting_retry_after(services, standin):
    standin.fail("sendMessage", 1, code=429, retry_after=1)
    async with Running(services, standin):
        standin.message("Hello!", chat_id=ANN)
        await wait_replies(standin, ANN)
    attempts = standin.calls_to("sendMessage", ANN, ok_only=False)
    assert [c.status for c in attempts[:2]] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 1.0
    assert len(replies(standin, ANN)) == 1


async def test_a_bot_api_outage_of_a_few_seconds_delays_replies_but_loses_none(services, standin):
    async with Running(services, standin):
        standin.outage(3.0)  # Telegram answers 502 to everything
        standin.message("Hello!", chat_id=ANN)
        await wait_replies(standin, ANN, 1, timeout=40)
        standin.fail("sendMessage", 2, code=502, chat_id=ANN)  # the reply itself fails twice
        standin.message("Can you help me plan a trip?", chat_id=ANN)
        await wait_replies(standin, ANN, 2, timeout=40)
        standin.down(1.5).join()  # the server is gone: connections are refused
        standin.message("Thank you, goodbye!", chat_id=ANN)
        await wait_replies(standin, ANN, 3, timeout=40)
    assert {c.method for c in standin.calls if c.status == 502} >= {"getUpdates", "sendMessage"}
    sends = standin.calls_to("sendMessage", ANN, ok_only=False)
    assert [c.status for c in sends].count(502) == 2
    assert len(services.store.export_user(f"telegram:{ANN}")["turns"]) == 3
    assert len(replies(standin, ANN)) == 3 and len(standin.calls_to("sendMessage", ANN)) == 3


async def test_a_call_is_retried_until_the_bot_api_is_reachable_again():
    standin = Standin(token=TOKEN)  # not listening yet: connections are refused
    threading.Timer(1.5, standin.start).start()
    try:
        started = time.monotonic()
        async with Bot(TOKEN, base_url=standin.base_url, request=RetryingRequest(retry_budget=20)) as bot:
            await bot.send_message(ANN, "hello")
        assert time.monotonic() - started >= 1.0
        assert [m.text for m in standin.sent_to(ANN)] == ["hello"]
    finally:
        await asyncio.sleep(0.1)
        standin.stop()


async def test_two_chats_are_served_at_once_and_one_chat_in_order(services, standin):
    standin.delay("sendMessage", 2.0, chat_id=ANN)  # Ann's reply is held up at its first message
    async with Running(services, standin):
        standin.message("Hello!", chat_id=ANN)
        standin.message("Hello!", chat_id=BEN)
        standin.message("Thank you, goodbye!", chat_id=BEN)
        await wait_replies(standin, ANN)
        await wait_replies(standin, BEN, 2)
    ann_first_shown = standin.calls_to("sendMessage", ANN)[0].done
    ben_calls = standin.calls_to("sendMessage", BEN) + standin.calls_to("editMessageText", BEN)
    assert max(c.done for c in ben_calls) < ann_first_shown  # both of Ben's replies went out while Ann waited
    ben_turns = services.store.export_user(f"telegram:{BEN}")["turns"]
    assert [t["user_text"] for t in ben_turns] == ["Hello!", "Thank you, goodbye!"]
    first, second = replies(standin, BEN)
    assert first.message_id < second.message_id
    first_done = max(c.done for c in ben_calls if c.message_id == first.message_id)
    second_began = min(c.at for c in ben_calls if c.message_id == second.message_id)
    assert first_done <= second_began  # Ben's second reply began after his first was complete


async def test_a_redelivered_update_is_answered_once_across_a_restart(services, standin):
    async with Running(services, standin):
        standin.message("Hello!", chat_id=ANN)
        await wait_replies(standin, ANN)
    standin.unconfirm()  # as if the process died before Telegram saw the offset: it sends the update again
    standin.message("Thank you, goodbye!", chat_id=ANN)
    async with Running(services, standin):
        await wait_replies(standin, ANN, 2)
        await asyncio.sleep(0.5)
    turns = services.store.export_user(f"telegram:{ANN}")["turns"]
    assert [t["user_text"] for t in turns] == ["Hello!", "Thank you, goodbye!"]
    assert len(replies(standin, ANN)) == 2
    assert {t["conversation_id"] for t in turns} == {f"telegram:{ANN}:1"}  # the conversation went on


# -- conversations and the user's data ---------------------------------------------------------------------


async def test_new_persona_export_and_delete_me(services, standin):
    async with Running(services, standin):
        standin.message("Hello!", chat_id=ANN)
        await wait_replies(standin, ANN)
        standin.message("/new", chat_id=ANN)
        standin.message("/persona set name=Ann Lee", chat_id=ANN)
        standin.message("Thank you, goodbye!", chat_id=ANN)
        await wait_replies(standin, ANN, 2)
        standin.message("/persona", chat_id=ANN)
        standin.message("/export", chat_id=ANN)
        await standin.wait_for(lambda: any(m.document for m in standin.sent_to(ANN)), what="the export")
        standin.message("/delete_me", chat_id=ANN)
        ask = await standin.wait_for(lambda: [m for m in standin.sent_to(ANN) if "cannot be undone" in m.text],
                                     what="the confirmation")
        standin.press(ask[0].message_id, f"erase:yes:{ANN}", user_id=BEN)  # someone else's press does nothing
        await standin.wait_for(lambda: standin.calls_to("answerCallbackQuery"), what="the refusal")
        assert services.store.export_user(f"telegram:{ANN}")["turns"]
        standin.press(ask[0].message_id, f"erase:yes:{ANN}", user_id=ANN)
        await standin.wait_for(lambda: "erased" in standin.messages[ask[0].message_id].text, what="the erasure")
    texts = [m.text for m in standin.sent_to(ANN)]
    assert any(t.startswith("Started a new conversation") for t in texts)
    assert any("name: Ann Lee" in t for t in texts)
    export = json.loads(next(m.document for m in standin.sent_to(ANN) if m.document)["content"])
    assert export["user_id"] == f"telegram:{ANN}"
    assert [t["conversation_id"] for t in export["turns"]] == [f"telegram:{ANN}:1", f"telegram:{ANN}:2"]
    after = services.store.export_user(f"telegram:{ANN}")
    assert after["turns"] == [] and after["conversations"] == []
    assert services.personas.get(f"telegram:{ANN}").name == ""


async def test_memory_forget_rate_and_sources_are_the_shared_commands(services, standin):
    async with Running(services, standin):
        standin.message("/rate up", chat_id=ANN)
        await standin.wait_for(lambda: standin.sent_to(ANN), what="the refusal")
        standin.message("I am allergic to peanuts.", chat_id=ANN)
        await wait_replies(standin, ANN)
        [memory] = services.memory.for_user(f"telegram:{ANN}").list()
        for command in ("/memory", "/sources", "/rate down too vague", f"/forget {memory.id}", "/memory"):
            count = len(standin.sent_to(ANN))
            standin.message(command, chat_id=ANN)
            await standin.wait_for(lambda: len(standin.sent_to(ANN)) > count, what=command)
    texts = [m.text for m in standin.sent_to(ANN) if not _has_rating(m)]
    assert texts[0] == "There is no reply of mine to rate yet."
    assert f"{memory.id}  I am allergic to peanuts." in texts[1]
    assert texts[2] == "My last reply used no FAQ entry, memory or profile field."
    assert texts[3] == "Thanks, noted. I'll try to do better."
    assert texts[4] == f"Forgot {memory.id}." and texts[5] == "I remember nothing about you yet."
    [rating] = services.store.export_user(f"telegram:{ANN}")["ratings"]
    assert (rating["rating"], rating["comment"]) == (-1, "too vague")
    assert services.memory.for_user(f"telegram:{ANN}").list() == []


# -- webhook mode and the command line ----------------------------------------------------------------------


async def test_webhook_mode_checks_the_secret_token(services, standin):
    port = free_port()
    hook = Webhook(url="https://bot.example.com/tg/hook", port=port, secret="s3cret-token")
    async with Running(services, standin, webhook=hook):
        assert standin.webhook["url"] == hook.url and standin.webhook["secret_token"] == "s3cret-token"
        update = {"update_id": 77, "message": {"message_id": 5, "date": int(time.time()), "text": "Hello!",
                                               "chat": standin.chat(ANN), "from": standin.user(ANN)}}
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{port}/tg/hook"
            wrong = await client.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "guess"})
            missing = await client.post(url, json=update)
            right = await client.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"})
            again = await client.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"})
        await wait_replies(standin, ANN)
        await asyncio.sleep(0.5)
    assert (wrong.status_code, missing.status_code, right.status_code, again.status_code) == (403, 403, 200, 200)
    assert len(replies(standin, ANN)) == 1
    assert not standin.calls_to("getUpdates")


@pytest.mark.timeout(300)  # a fresh process imports torch and loads the model and embedder: slow on a busy machine
def test_the_cli_runs_against_the_standin_and_never_logs_the_token(tiny_settings, standin):
    env = {**os.environ, "RAPPORT_HOME": str(tiny_settings.home), "RAPPORT_MODEL": tiny_settings.model,
           "RAPPORT_DTYPE": "float32", "RAPPORT_THREADS": "1", "RAPPORT_MAX_NEW_TOKENS": "8",
           "TELEGRAM_BOT_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "-v", "telegram", "--base-url", standin.base_url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        standin.message("Hello!", chat_id=ANN)
        asyncio.run(wait_replies(standin, ANN, timeout=240))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert TOKEN.encode() not in err and TOKEN.encode() not in out
    assert b"Traceback" not in err


@pytest.mark.timeout(300)
def test_serve_runs_the_bot_beside_the_api_in_one_process(tiny_settings, standin):
    import httpx

    port = free_port()
    env = {**os.environ, "RAPPORT_HOME": str(tiny_settings.home), "RAPPORT_MODEL": tiny_settings.model,
           "RAPPORT_DTYPE": "float32", "RAPPORT_THREADS": "1", "RAPPORT_MAX_NEW_TOKENS": "8",
           "TELEGRAM_BOT_TOKEN": TOKEN, "RAPPORT_TELEGRAM_BASE_URL": standin.base_url}
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--open", "--telegram", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        standin.message("Hello!", chat_id=ANN)
        asyncio.run(wait_replies(standin, ANN, timeout=240))
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/conversations/api-1/messages",
                            json={"user_id": "dev", "text": "Hello!"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["turn_id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit says SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM), err.decode()[-2000:]
    assert TOKEN.encode() not in err and TOKEN.encode() not in out and b"Traceback" not in err
    assert standin.calls_to("getUpdates"), "the bot polled in the serving process"


def test_the_cli_refuses_a_missing_or_malformed_token(home, monkeypatch):
    from click.testing import CliRunner

    from bot.cli.main import cli

    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    for args, expected in (([], "no bot token"), (["--token", "not a token"], "does not look like a bot token")):
        done = CliRunner().invoke(cli, ["telegram", *args])
        assert done.exit_code == 1 and expected in done.output and "not a token" not in done.output
    done = CliRunner().invoke(cli, ["serve", "--open", "--telegram"])  # before anything loads
    assert done.exit_code == 1 and "no bot token" in done.output


# -- formatting (pure functions) ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "", "plain", "a < b > c & d", "**bold** and `code`", "```\nunclosed code <x>", "```py\nx = 1\n```",
    "# Title\n- item\n* item", "**unclosed bold", "[x](javascript:alert(1))", "<script>alert(1)</script>",
    "&amp; &lt; &#123; &bogus;", "``` ``` ```", "`", "**", "[a](https://e.com/\"onmouseover=x)",
])
def test_any_text_becomes_html_telegram_accepts(text):
    visible = parse_html(to_html(text))
    assert utf16_len(visible) <= utf16_len(text)


def test_split_prefers_paragraphs_and_counts_utf16():
    text = ("😀" * 1500 + "\n\n") * 3
    pieces = split_message(text)
    assert len(pieces) == 3 and all(utf16_len(p) <= MESSAGE_LIMIT for p in pieces)
    assert all(p.strip() == "😀" * 1500 for p in pieces)
    assert split_message("short") == ["short"]
    unbroken = "x" * 9000
    assert "".join(split_message(unbroken)) == unbroken


def test_a_code_block_cut_in_two_is_closed_and_reopened():
    code = "```\n" + "\n".join("line %d" % i for i in range(900)) + "\n```"
    pieces = split_message(code)
    assert len(pieces) >= 2
    for piece in pieces:
        assert piece.startswith("```") and piece.rstrip().endswith("```")
        parse_html(to_html(piece))


def test_the_standin_rejects_what_telegram_rejects():
    for bad in ("<b>open", "<script>x</script>", "a < b", "&nbsp;", "</b>"):
        with pytest.raises(ApiError):
            parse_html(bad)


async def test_memory_lists_and_forgets_only_my_memories(services, standin):
    from memory.memories import MemoryItem

    ann = services.memory.for_user(f"telegram:{ANN}")
    ids = ann.add([MemoryItem(text="I live in Porto."), MemoryItem(text="My bike is a red Brompton. " * 40)])
    [ben_id] = services.memory.for_user(f"telegram:{BEN}").add([MemoryItem(text="I am Ben.")])
    async with Running(services, standin):
        standin.message("/memory", chat_id=ANN)
        listing = await standin.wait_for(lambda: standin.sent_to(ANN), what="the list")
        standin.message(f"/forget {ben_id}", chat_id=ANN)  # not Ann's: refused, Ben keeps it
        standin.message(f"/forget {ids[0]}", chat_id=ANN)
        standin.message("/forget all", chat_id=ANN)
        standin.message("/memory", chat_id=ANN)
        await standin.wait_for(lambda: len(standin.sent_to(ANN)) >= 5, what="five answers")
    texts = [m.text for m in standin.sent_to(ANN)]
    assert ids[0] in listing[0].text and "Porto" in listing[0].text and ben_id not in listing[0].text
    assert len(listing[0].text) < 1000  # a long memory is shortened in the list
    assert texts[1].startswith("no memory") and texts[2] == f"Forgot {ids[0]}."
    assert texts[3].startswith("Forgot everything") and texts[4] == "I remember nothing about you yet."
    assert [m.id for m in services.memory.for_user(f"telegram:{BEN}").list()] == [ben_id]


async def test_a_store_outage_gets_one_apology_and_no_crash(services, standin):
    from dialogue.errors import StoreUnavailable

    def unavailable(*args, **kwargs):
        raise StoreUnavailable("transcript store is unavailable: disk I/O error")

    async with Running(services, standin):
        services.store.record_turn = unavailable  # the database is gone for this one update (recorded as it arrives)
        standin.message("Hello!", chat_id=ANN)
        await standin.wait_for(lambda: standin.sent_to(ANN), what="the apology")
        del services.store.record_turn
        standin.message("Hello again!", chat_id=ANN)
        await wait_replies(standin, ANN)
    texts = [m.text for m in standin.sent_to(ANN)]
    assert texts[0] == "Sorry, I can't reach my memory right now. Please try again in a moment."
    assert len(services.store.export_user(f"telegram:{ANN}")["turns"]) == 1


@pytest.mark.e2e
@pytest.mark.timeout(600)  # the first e2e test of a session converts the real model (minutes on a busy machine)
async def test_the_real_model_streams_a_reply_into_a_growing_message(real_home, standin):
    from dialogue.settings import Settings

    # long enough to outlast a few edit intervals on a fast CPU (the embedded model writes ~150 tokens a second)
    settings = Settings(home=real_home, max_new_tokens=256, temperature=0.0, telegram_edit_interval=0.2)
    opened = open_services(settings)
    try:
        await opened.backend.ready()
        async with Running(opened, standin):
            pushed = time.monotonic()
            standin.message("Can you help me plan a week-long trip to Porto, day by day?", chat_id=ANN)
            [reply] = await wait_replies(standin, ANN, timeout=120)
            finished = time.monotonic()
    finally:
        opened.close()
    first = standin.calls_to("sendMessage", ANN)[0]
    edits = standin.calls_to("editMessageText", ANN)
    assert len(reply.text.split()) >= 5
    assert len(edits) >= 2 and first.at < edits[-1].at  # shown early, then grown
    print(f"\nfirst message after {first.at - pushed:.2f} s, {len(edits)} edits, complete after {finished - pushed:.2f} s")


async def test_malformed_button_data_is_answered_and_ignored(services, standin):
    async with Running(services, standin):
        standin.message("/delete_me", chat_id=ANN)
        [ask] = await standin.wait_for(lambda: standin.sent_to(ANN), what="the confirmation")
        for data in ("rate:bogus", "rate:a:b:c", f"rate:{'f' * 32}:1", "erase", "erase:yes", "whatever"):
            standin.press(ask.message_id, data, user_id=ANN)
        await standin.wait_for(lambda: len(standin.calls_to("answerCallbackQuery")) == 6, what="six answers")
    assert services.store.export_user(f"telegram:{ANN}")["ratings"] == []
    assert "cannot be undone" in standin.messages[ask.message_id].text  # nothing was erased
    assert not [c for c in standin.calls if c.status >= 400]


def test_an_interrupted_reply_is_told_in_the_chat_of_its_conversation():
    from bot.telegram.handlers import chat_of

    assert chat_of("telegram:42:3") == "42"  # a private chat
    assert chat_of("telegram:7@-100123:2") == "-100123"  # a group member's scope
    assert chat_of("telegram:chat:-1005@-100123:1") == "-100123"  # an anonymous admin (sender_chat) in a group
