"""The guard in the turn pipeline: queued replies (a stand-in generator) around the real stores and tokenizer,
and the banned-token sampling on the tiny model."""

from __future__ import annotations

import json

import torch

from dialogue.guarded import (FALLBACK_OTHER, FALLBACK_STATEMENT, FALLBACKS_OTHER, HOLD_WORDS, GuardInputs, copy_sources,
                              fallback_reply)
from dialogue.guard import check_reply
from dialogue.manager import TELLING_REPLY_TOKENS
from dialogue.model.worker import COPY_RUN, GenerationParams, sample_tokens

LENA = "Hello! My name is Lena and I live in Porto."


class QueuedGeneration:
    def __init__(self, text, finish_reason="stop"):
        self.chunks = [w + " " for w in text.split()]
        self.finish_reason, self.prompt_tokens, self.completion_tokens, self.ttft_s = None, 10, 0, 0.01
        self.yielded, self.ends = 0, finish_reason

    async def __aiter__(self):
        for chunk in self.chunks:
            self.yielded += 1
            self.completion_tokens += 1
            yield chunk
        self.finish_reason = self.ends

    async def text(self):
        return "".join([c async for c in self])


class QueuedBackend:
    """The real backend for tokens; `generate` hands out the queued replies and records the params asked for."""

    def __init__(self, inner, replies):
        self.inner, self.replies, self.params, self.made = inner, list(replies), [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, messages, params, adapter=None):
        self.params.append(params)
        reply = self.replies.pop(0)
        self.made.append(QueuedGeneration(*reply) if isinstance(reply, tuple) else QueuedGeneration(reply))
        return self.made[-1]


async def turn(services, text, conversation="c1", user="lena"):
    reply = await services.manager.respond(user_id=user, conversation_id=conversation, text=text, channel="test")
    chunks = [chunk async for chunk in reply]
    return reply, chunks


async def test_an_echo_is_never_shown_and_the_retry_avoids_the_copied_words(services):
    backend = QueuedBackend(services.backend, [LENA + " Nice to meet you all.", "Nice to meet you, Lena! Porto is lovely."])
    services.manager.backend = backend
    reply, chunks = await turn(services, LENA)
    assert "".join(chunks).strip() == "Nice to meet you, Lena! Porto is lovely." == reply.text.strip()
    retry = backend.params[1]
    assert retry.temperature >= 0.7 and retry.repetition_penalty >= 1.3 and retry.banned_token_ids
    lena_ids = set(services.backend.tokenizer.encode(" Lena", add_special_tokens=False))
    assert not lena_ids & set(retry.banned_token_ids), "the user's name stays sayable"
    stored = services.store.get_turn(reply.turn_id)
    assert stored.guard == "echo:regenerated" and stored.completion_tokens > 0
    assert backend.made[0].yielded <= HOLD_WORDS + 1, "the echo was stopped while held back"


async def test_a_second_failure_falls_back_and_stays_out_of_the_next_prompt(services):
    backend = QueuedBackend(services.backend, [LENA, LENA, "Sure, here is an idea for a weekend trip."])
    services.manager.backend = backend
    reply, chunks = await turn(services, LENA)
    told = "Noted: your name is Lena and you live in Porto."  # the statement told back, in the second person
    assert chunks == [told] and services.store.get_turn(reply.turn_id).guard == "echo:fallback"
    asked, _ = await turn(services, "What is my name and where do I live?")  # the facts again: a reminder
    assert asked.text == "As you told me, your name is Lena. You live in Porto."
    nxt, _ = await turn(services, "Can you suggest a weekend trip from my city?")
    contents = [m["content"] for m in nxt.parts.history]
    assert LENA in contents and told not in contents  # the user's words stay, the fallback does not
    assert len(backend.params) == 3, "never more than one retry"
    # a question gets the other honest fallback
    backend.replies += ["What is the capital of Peru?"] * 2
    asked, chunks = await turn(services, "What is the capital of Peru?")
    assert chunks == [FALLBACK_OTHER]


async def test_a_repeat_of_an_earlier_reply_is_regenerated(services):
    first = "Hello, Lena! Welcome to my blog. I'm so glad you're here and happy to help you."
    backend = QueuedBackend(services.backend, [first, first, "Your name is Lena and you live in Porto."])
    services.manager.backend = backend
    await turn(services, LENA)
    reply, _ = await turn(services, "Tell me more about Porto, please.")
    assert reply.text.strip() == "Your name is Lena and you live in Porto."
    assert services.store.get_turn(reply.turn_id).guard == "repeat:regenerated"


async def test_role_confusion_is_caught_from_recalled_memories(services):
    backend = QueuedBackend(services.backend, ["Great to meet you!", "I'm learning the cello.",
                                               "You're learning the cello."])
    services.manager.backend = backend
    await turn(services, "I'm learning the cello.", conversation="c-a")
    reply, _ = await turn(services, "What could I practise on the cello today?", conversation="c-b")
    assert reply.text.strip() == "You're learning the cello."
    stored = services.store.get_turn(reply.turn_id)
    assert stored.guard == "role_confusion:regenerated"
    assert any(s["kind"] == "memory" for s in json.loads(stored.sources))


async def test_a_bad_sentence_after_the_opening_is_never_shown(services):
    opening = " ".join(f"word{i}" for i in range(HOLD_WORDS + 2)) + "."
    backend = QueuedBackend(services.backend, [opening + " Porto is lovely. " + LENA + " Bye now.", "Fine."])
    services.manager.backend = backend
    reply, chunks = await turn(services, LENA)
    shown = "".join(chunks)
    assert "Porto is lovely." in shown and "My name is" not in shown and "Bye" not in shown
    stored = services.store.get_turn(reply.turn_id)
    assert stored.guard == "cut:echo" and stored.reply == shown and stored.finish_reason == "stop"
    assert backend.made[0].yielded < len(backend.made[0].chunks), "generation stopped at the bad sentence"
    nxt, _ = await turn(services, "Thanks!")
    assert [m["content"] for m in nxt.parts.history] == [LENA, shown]  # what was shown passed: it stays


async def test_a_made_up_link_after_the_opening_is_never_shown(services):
    opening = " ".join(f"word{i}" for i in range(HOLD_WORDS + 2)) + "."
    link = "More tips are on www.sleepfoundation.org/en/pages/tips for you."
    backend = QueuedBackend(services.backend, [opening + " Keep the room dark. " + link + " Good night."])
    services.manager.backend = backend
    reply, chunks = await turn(services, "How do I sleep during the day after a night shift?")
    shown = "".join(chunks)
    assert "Keep the room dark." in shown and "www" not in shown and "Good night" not in shown
    stored = services.store.get_turn(reply.turn_id)
    assert stored.guard == "cut:invented_contact" and stored.reply == shown


async def test_a_short_reply_said_again_is_a_repeat_and_no_fallback_repeats(services):
    backend = QueuedBackend(services.backend, ["Hello, Lena.", "Hello, Lena.", "Hello, Lena.",
                                               "Hello, Lena.", "Hello, Lena."])
    services.manager.backend = backend
    await turn(services, "Hi!")
    replies = [(await turn(services, text))[0].text for text in ("What is 2 and 2?", "What is 3 and 3?")]
    assert replies == list(FALLBACKS_OTHER[:2]), "each fallback in other words than the one before"


def test_fallback_wording():
    assert fallback_reply("I moved to Lyon last year.") == "Noted: you moved to Lyon last year."
    assert fallback_reply("Ciao! Call me Marco.") == FALLBACK_STATEMENT  # not an I/my statement: not told back
    assert fallback_reply("I moved to Lyon.", ("Noted: you moved to Lyon.",)) == FALLBACK_STATEMENT
    assert fallback_reply("What is 2 and 2?", (FALLBACK_OTHER,)) == FALLBACKS_OTHER[1]


def test_banned_tokens_are_never_sampled():
    logits = torch.zeros(2, 50)
    logits[:, 7] = 10.0  # the overwhelming favourite
    params = [GenerationParams(temperature=0.0, banned_token_ids=(7,)), GenerationParams(temperature=1.0, top_p=1.0,
                                                                                          banned_token_ids=(7, 8))]
    rngs = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    for _ in range(20):
        tokens = sample_tokens(logits, [[], []], params, rngs)
        assert tokens[0] != 7 and tokens[1] not in (7, 8)
    assert sample_tokens(logits, [[]], [GenerationParams(temperature=0.0)], rngs[:1]) == [7]


async def test_the_tiny_model_streams_through_the_guard(services):
    reply, chunks = await turn(services, "Can you help me plan a trip?")
    assert "".join(chunks) == reply.text and services.store.get_turn(reply.turn_id).reply == reply.text


def test_a_copied_run_is_never_completed_and_a_shorter_or_foreign_one_is():
    source = (11, 12, 13, 14, 15, 16, 17)
    logits = torch.zeros(1, 50)
    logits[0, 16] = logits[0, 17] = 10.0  # the model wants to go on copying
    params = GenerationParams(temperature=0.0, avoid_copying=(source,))
    rng = [torch.Generator().manual_seed(0)]
    copied = list(source[:COPY_RUN - 1])
    assert sample_tokens(logits, [copied], [params], rng) != [16], "the run's last token is withheld"
    assert sample_tokens(logits, [copied[1:]], [params], rng) == [16], "a shorter run may be said"
    assert sample_tokens(logits, [[1, 2, 3, 4, 5]], [params], rng) == [16], "other words are free"
    assert sample_tokens(logits, [[12, 13, 14, 15, 16]], [params], rng) == [16]  # 12..16 + 17 would copy; 16 not


def test_the_sources_are_the_users_voiced_runs_and_the_earlier_replies(services):
    tokenizer = services.backend.tokenizer
    sources = copy_sources(services.backend, GuardInputs(
        user_text="Last summer we finally moved to Porto with the two kids and the old dog.",
        earlier_replies=("Porto is a lovely city by the river.",)))
    reply = tuple(tokenizer.encode("Porto is a lovely city by the river.", add_special_tokens=False))
    assert reply in sources
    voiced = [s for s in sources if s != reply]
    assert voiced and all("we" in tokenizer.decode(list(s)).lower().split() for s in voiced)
    told_back = tokenizer.encode(" moved to Porto with the two kids", add_special_tokens=False)
    windows = {tuple(s[i:i + COPY_RUN]) for s in voiced for i in range(len(s) - COPY_RUN + 1)}
    assert tuple(told_back[1:1 + COPY_RUN]) not in windows, "the fact may be told back as an answer"
    assert copy_sources(object(), GuardInputs(user_text="hi")) == ()  # a backend without a tokenizer: nothing


async def test_the_first_try_already_avoids_copying(services):
    backend = QueuedBackend(services.backend, ["Nice to meet you, Lena!"])
    services.manager.backend = backend
    await turn(services, LENA)
    assert backend.params[0].avoid_copying, "the first try carries the user's voiced runs"


async def test_control_characters_a_model_writes_never_reach_the_user_or_the_database(tiny_settings, pg_url):
    """A NUL in a reply failed PostgreSQL's text column (a 500, the turn never finished); found by bench soak."""
    from bot.services import open_services

    services = open_services(tiny_settings.model_copy(update={"database_url": pg_url}))
    try:
        await services.backend.ready()
        services.manager.backend = QueuedBackend(services.backend, ["Hello\x00 there\x1b[2J friend"] * 3)
        reply, chunks = await turn(services, "Hi!")
        assert "".join(chunks) == reply.text and "\x00" not in reply.text and "\x1b" not in reply.text
        stored = services.store.get_turn(reply.turn_id)
        assert stored.finish_reason == "stop" and stored.reply == reply.text and "Hello" in stored.reply
    finally:
        services.close()


async def test_a_reply_cut_by_its_budget_ends_at_its_last_full_sentence(services):
    opening = " ".join(f"word{i}" for i in range(HOLD_WORDS + 2)) + "."
    backend = QueuedBackend(services.backend, [(opening + " A second sentence. And a third that never", "length")])
    services.manager.backend = backend
    reply, chunks = await turn(services, "Tell me about bikes.")
    assert "".join(chunks).strip() == opening + " A second sentence."
    stored = services.store.get_turn(reply.turn_id)
    assert stored.reply.strip() == opening + " A second sentence." and stored.finish_reason == "length"


async def test_a_message_that_only_tells_gets_a_short_reply_budget(services):
    backend = QueuedBackend(services.backend, ["Nice to meet you, Marta!", "Here is an idea.", "Hello!"])
    services.manager.backend = backend
    services.manager.settings = services.settings.model_copy(update={"max_new_tokens": 256})  # the default budget
    await turn(services, "Hi! I'm Marta, I work as a nurse and I have a dog called Pico.")
    await turn(services, "Suggest a quick dinner recipe.")
    await turn(services, "Hello!")
    assert [p.max_new_tokens for p in backend.params] == [TELLING_REPLY_TOKENS, 256, TELLING_REPLY_TOKENS]


def test_signing_a_reply_with_the_users_name_is_role_confusion():
    letter = "Take care of Pico, and I promise to do everything I can for him.\nBest regards,\nMarta"
    assert check_reply(letter, user_text="Hi! I'm Marta.", user_name="Marta").kind == "role_confusion"
    assert check_reply("Take care, Marta!", user_text="Hi! I'm Marta.", user_name="Marta").ok  # addressing her
