"""Memory and SQL never drift: a recorded turn's memory write is owed until done, across a restart; `rapport doctor`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bot.cli.main import cli
from bot.services import open_services
from memory.memories import MemoryItem

pytestmark = pytest.mark.timeout(300)


class FailingOnce:
    """The memory write fails the first `times` times (Chroma unreachable), then works."""

    def __init__(self, hook, times: int = 1) -> None:
        self.hook, self.times = hook, times

    async def __call__(self, turn) -> None:
        if self.times:
            self.times -= 1
            raise ConnectionError("chroma is unreachable")
        await self.hook(turn)


async def test_a_failed_memory_write_is_owed_and_done_after_a_restart(tiny_settings):
    services = open_services(tiny_settings)
    await services.backend.ready()
    services.manager.after_turn_hooks = [FailingOnce(services.manager.after_turn_hooks[0])]
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="I live in Porto.")
    await reply.complete()
    assert reply.recorded
    [(owed, turn)] = services.store.owed_memory()
    assert (owed.turn_id, owed.attempts, turn.user_text) == (reply.turn_id, 1, "I live in Porto.")
    assert "ConnectionError" in owed.last_error
    assert services.memory.for_user("u1").list() == []
    services.close()

    restarted = open_services(tiny_settings)  # a new process: the outbox is on disk
    try:
        assert await restarted.manager.flush_outbox() == {"done": 1, "failed": 0, "dropped": 0}
        [memory] = restarted.memory.for_user("u1").list()
        assert "Porto" in memory.text and memory.turn_id == reply.turn_id
        assert restarted.store.owed_memory() == []
        assert await restarted.manager.flush_outbox() == {"done": 0, "failed": 0, "dropped": 0}
    finally:
        restarted.close()


async def test_an_erased_users_owed_writes_are_dropped(services):
    services.manager.after_turn_hooks = [FailingOnce(services.manager.after_turn_hooks[0])]
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="I live in Porto.")
    await reply.complete()
    services.store.delete_user("u1")
    assert services.store.owed_memory() == []
    assert await services.manager.flush_outbox() == {"done": 0, "failed": 0, "dropped": 0}


def test_doctor_finds_drift_between_sql_and_chroma_and_repairs_it(tiny_settings, home):
    import asyncio

    services = open_services(tiny_settings, load_model=False)
    store = services.store
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="api")
    from dialogue.store import Turn

    kept = store.record_turn(Turn(conversation_id="c1", user_id="u1", channel="api", user_text="I live in Porto.",
                                  reply="", finish_reason="pending"))
    kept.reply, kept.finish_reason = "Nice!", "stop"
    store.finish_turn(kept, owe_memory=True)  # recorded, but the process died before its memory write
    memories = services.memory.for_user("u1")
    memories.add([MemoryItem(text="I have a cat called Tom", speaker="user", turn_id="gone-turn")])  # turn erased
    memories.add([MemoryItem(text="I was imported", speaker="user")])  # imported: no turn, nothing wrong
    services.chroma.client.create_collection("mem-" + "0" * 48, embedding_function=None)  # no owner
    services.close()

    runner = CliRunner()
    found = runner.invoke(cli, ["doctor", "--json"])
    assert found.exit_code == 1, found.output
    report = json.loads(found.stdout)
    assert report["drift"] == 3
    assert report["unfinished_memory_writes"] == [kept.id]
    assert len(report["memories_without_turns"]) == 1 and report["vectors_without_owners"] == ["mem-" + "0" * 48]

    repaired = runner.invoke(cli, ["doctor", "--repair", "--json"])
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["repaired"] == 3
    again = runner.invoke(cli, ["doctor", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["drift"] == 0

    services = open_services(tiny_settings, load_model=False)
    texts = sorted(m.text for m in services.memory.for_user("u1").list())
    assert texts == ["I live in Porto.", "I was imported"]
    services.close()
    asyncio.run(asyncio.sleep(0))


async def test_the_persona_learns_from_an_answered_turn_as_it_is_recorded(services):
    from memory.persona import Persona

    unanswered = await services.manager.respond(user_id="u1", conversation_id="c1", text="My name is Lena.")
    unanswered.discard()  # the channel failed before the reply: the message teaches nothing
    assert services.personas.get("u1") == Persona()

    services.manager.after_turn_hooks = [FailingOnce(services.manager.after_turn_hooks[0])]
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="My name is Lena.")
    assert reply.parts.persona["name"] == "Lena"  # this very reply knows it, before anything is stored
    assert services.personas.get("u1") == Persona()
    await reply.complete()
    assert services.personas.get("u1").name == "Lena"  # with the turn's record, its memory write still owed
    newer = await services.manager.respond(user_id="u1", conversation_id="c1", text="My name is Mia.")
    await newer.complete()
    assert await services.manager.flush_outbox() == {"done": 1, "failed": 0, "dropped": 0}
    assert services.personas.get("u1").name == "Mia"  # the older turn's retried write does not set it back
