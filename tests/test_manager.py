"""The turn pipeline on the tiny model: budgets, recording, retries, cancellation, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest

from dialogue.errors import GenerationError, InvalidInput
from dialogue.prompt import PromptParts, build_prompt, fit_history


async def say(services, text, user="u1", conversation="c1"):
    reply = await services.manager.respond(user_id=user, conversation_id=conversation, text=text, channel="test")
    await reply.complete()
    return reply


async def test_a_turn_is_recorded_with_what_the_model_saw(services):
    first = await say(services, "Hello!")
    second = await say(services, "Can you help me plan a trip?")
    stored = services.store.get_turn(second.turn_id)
    assert stored.reply == second.text and stored.user_text == "Can you help me plan a trip?"
    assert stored.completion_tokens > 0 and stored.prompt_tokens > 0 and stored.latency_ms >= 0
    parts = PromptParts.from_dict(json.loads(stored.prompt))
    assert parts.history == [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first.text}]
    assert build_prompt(parts)[-1] == {"role": "user", "content": "Can you help me plan a trip?"}
    assert stored.model_id == services.backend.model_id


async def test_history_is_windowed_to_the_token_budget(services):
    for i in range(12):
        await say(services, f"The shop opens at nine. Message number {i}.")
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="Thank you!")
    messages = build_prompt(reply.parts)
    used = sum(services.backend.count_tokens(m["content"]) + 4 for m in messages)
    assert used <= services.settings.context_budget - reply.params.max_new_tokens
    assert 0 < len(reply.parts.history) < 24
    assert reply.parts.history[0]["role"] == "user"


def test_fit_history_keeps_the_newest_whole_exchanges():
    history = [{"role": "user", "content": "a " * 10}, {"role": "assistant", "content": "b " * 10},
               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    kept = fit_history(history, budget=12, count_tokens=lambda s: len(s.split()))
    assert kept == history[2:]
    assert fit_history(history, budget=0, count_tokens=len) == []


async def test_a_message_too_long_for_the_context_budget_is_refused_not_cut(services):
    """Within RAPPORT_MAX_MESSAGE_CHARS but over half the context budget in tokens: refused with the limit."""
    text = "Hello there! " * 400  # 5200 characters, over 1000 tokens of a 512-token budget
    assert len(text) < services.settings.max_message_chars
    with pytest.raises(InvalidInput, match=r"too long to read at once: \d+ tokens, the limit is \d+"):
        await services.manager.respond(user_id="u1", conversation_id="c1", text=text)
    assert services.store.export_user("u1")["turns"] == []
    await say(services, "Hello!")  # a message that fits is answered as ever


@pytest.mark.parametrize("kwargs", [
    {"user_id": "", "conversation_id": "c1", "text": "hi"},
    {"user_id": "../../etc/passwd", "conversation_id": "c1", "text": "hi"},
    {"user_id": "u1", "conversation_id": "c" * 200, "text": "hi"},
    {"user_id": "u1", "conversation_id": "c1", "text": "   \x00\x1b  "},
    {"user_id": "u1", "conversation_id": "c1", "text": 42},
])
async def test_bad_input_is_refused_before_anything_is_stored(services, kwargs):
    with pytest.raises(InvalidInput):
        await services.manager.respond(**kwargs)
    assert services.store.export_user("u1")["turns"] == []


async def test_control_characters_never_reach_the_prompt(services):
    reply = await say(services, "hi\x1b[31m there\x00")
    assert reply.parts.user_text == "hi[31m there"


class FlakyBackend:
    """Wraps the real backend; its first `failures` generations fail."""

    def __init__(self, inner, failures):
        self.inner, self.failures = inner, failures

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise GenerationError("simulated failure")
        return await self.inner.generate(*args, **kwargs)


async def test_a_failed_generation_is_retried_once(services):
    services.manager.backend = FlakyBackend(services.backend, failures=1)
    reply = await say(services, "Hello!")
    assert reply.recorded and services.store.get_turn(reply.turn_id) is not None


async def test_a_generation_that_keeps_failing_keeps_the_message_as_an_error(services):
    services.manager.backend = FlakyBackend(services.backend, failures=2)
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="Hello!")
    with pytest.raises(GenerationError):
        await reply.complete()
    [turn] = services.store.export_user("u1")["turns"]
    assert (turn["user_text"], turn["reply"], turn["finish_reason"]) == ("Hello!", "", "error")
    assert services.manager.leases.held() == []


async def test_a_reply_stopped_midway_keeps_what_was_shown(services):
    services.manager.settings.max_new_tokens = 500
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="Hello!")
    shown = []

    async def consume():
        async for chunk in reply:
            shown.append(chunk)
            if len(shown) == 3:
                await asyncio.sleep(3600)  # the user presses Ctrl-C here

    task = asyncio.create_task(consume())
    while len(shown) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):  # the abandoned stream is closed by the loop's async-generator finaliser
        if reply.recorded:
            break
        await asyncio.sleep(0.02)
    stored = services.store.get_turn(reply.turn_id)
    assert stored.finish_reason == "cancelled" and stored.reply == "".join(shown)
    await asyncio.sleep(0.2)
    assert services.backend.worker.queue_depth == 0


async def test_two_users_at_once_get_their_own_turns(services):
    a, b = await asyncio.gather(say(services, "Hello!", user="alice", conversation="ca"),
                                say(services, "Hello!", user="bob", conversation="cb"))
    assert services.store.get_turn(a.turn_id).user_id == "alice"
    assert services.store.get_turn(b.turn_id).user_id == "bob"
    assert services.store.history(conversation_id="ca", user_id="bob") == []


async def test_a_checked_reply_is_shown_only_after_the_check(services):
    from dialogue.manager import Context

    async def recall(user_id, text):
        return Context(check=lambda reply: ("I don't know that one. Shall I get a colleague?", True))

    services.manager.recall = recall
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="When do you open?")
    chunks = [chunk async for chunk in reply]
    assert chunks == ["I don't know that one. Shall I get a colleague?"] and reply.handoff
    stored = services.store.get_turn(reply.turn_id)
    assert stored.reply == chunks[0] and stored.handoff


async def test_a_fixed_answer_skips_the_model_and_carries_its_sources(services):
    from dialogue.manager import Context, Source

    async def recall(user_id, text):
        return Context(answer="I don't know that one.", handoff=True, sources=[Source("faq", "hours", 0.4)])

    services.manager.recall = recall
    reply = await say(services, "Do you sell gift cards?")
    stored = services.store.get_turn(reply.turn_id)
    assert reply.text == stored.reply == "I don't know that one." and stored.handoff
    assert stored.completion_tokens == 0 and json.loads(stored.sources)[0]["id"] == "hours"


async def test_unanswered_messages_stay_out_of_the_history(services):
    from dialogue.store import Turn

    await say(services, "Hello!")  # creates the conversation
    for said, answer, reason in (("Hi again", "Hello to you", "stop"), ("Are you there?", "", "handoff")):
        services.store.record_turn(Turn(conversation_id="c1", user_id="u1", user_text=said, reply=answer,
                                        finish_reason=reason))
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="Thanks!")
    assert "Hi again" in [m["content"] for m in reply.parts.history]
    assert "Are you there?" not in [m["content"] for m in reply.parts.history]
