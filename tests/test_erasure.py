"""Erasure is one resumable job: a tombstone first, then vectors, files and rows; finished after a failure."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from bot.cli.main import cli
from bot.services import open_services
from dialogue.errors import InvalidInput, StoreUnavailable
from memory.persona import PersonaRow

pytestmark = pytest.mark.timeout(300)


async def test_an_erasure_that_fails_half_way_refuses_the_user_and_is_finished_later(tiny_settings, home):
    services = open_services(tiny_settings)
    await services.backend.ready()
    await (await services.manager.respond(user_id="u1", conversation_id="c1", text="I live in Porto.")).complete()
    in_flight = await services.manager.respond(user_id="u1", conversation_id="c1", text="I have a cat.")
    assert [m.text for m in services.memory.for_user("u1").list()] == ["I live in Porto."]
    services.history_file("u1").parent.mkdir(parents=True, exist_ok=True)
    services.history_file("u1").write_text("+I live in Porto.\n")

    real = services.store.delete_user

    def crash(user_id):
        raise StoreUnavailable("the database went away mid-erasure")

    services.store.delete_user = crash  # vectors and files are gone, the rows not yet
    with pytest.raises(StoreUnavailable):
        services.erase_user("u1")
    services.store.delete_user = real
    assert services.memory.for_user("u1").list() == [] and not services.history_file("u1").exists()
    with pytest.raises(InvalidInput, match="being erased"):  # refused from the tombstone on
        await services.manager.respond(user_id="u1", conversation_id="c1", text="Hello?")
    await in_flight.complete()  # a turn in flight when the erasure began writes no memory
    assert services.memory.for_user("u1").list() == []
    services.close()

    runner = CliRunner()
    report = json.loads((await asyncio.to_thread(runner.invoke, cli, ["doctor", "--json"])).stdout)
    assert report["unfinished_erasures"] == ["u1"]
    repaired = await asyncio.to_thread(runner.invoke, cli, ["doctor", "--repair", "--json"])  # the CLI's own loop
    assert repaired.exit_code == 0, repaired.output

    services = open_services(tiny_settings)
    try:
        assert services.export_user("u1")["turns"] == [] and services.store.unfinished_erasures() == []
        await services.backend.ready()
        reply = await services.manager.respond(user_id="u1", conversation_id="c2", text="Hello again!")
        await reply.complete()  # once erased, the id may start afresh
        assert reply.recorded
    finally:
        services.close()


def test_the_repl_history_is_per_user(tiny_settings):
    services = open_services(tiny_settings, load_model=False)
    try:
        assert services.history_file("ann") != services.history_file("ben")
        assert services.history_file("ann").parent == tiny_settings.home / "history"
        assert "ann" not in services.history_file("ann").name
    finally:
        services.close()


def test_the_shared_repl_history_of_earlier_versions_is_removed_at_start(tiny_settings):
    shared = tiny_settings.home / "repl_history"  # every user's input, before the history was per user
    shared.write_text("+I live in Porto.\n")
    open_services(tiny_settings, load_model=False).close()
    assert not shared.exists()


async def test_a_turn_answered_while_its_user_is_erased_leaves_no_persona(services):
    pending = await services.manager.receive(user_id="u1", conversation_id="c1", text="My name is Lena.")
    await asyncio.to_thread(services.erase_user, "u1")  # while the message is being answered
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="My name is Lena.", pending=pending)
    await reply.complete()
    assert not reply.recorded
    with services.store.session() as session:
        assert session.get(PersonaRow, "u1") is None


@pytest.mark.parametrize("erasure", ["finished", "failed after the vectors"])
async def test_a_memory_write_past_the_erasure_check_leaves_nothing_behind(services, erasure):
    passed, go_on = asyncio.Event(), asyncio.Event()
    write = services.manager.after_turn_hooks[0]

    async def late(turn):  # past after_turn's "being erased" check, not yet written
        passed.set()
        await go_on.wait()
        await write(turn)

    services.manager.after_turn_hooks = [late]
    reply = await services.manager.respond(user_id="u1", conversation_id="c1", text="I live in Porto.")
    answering = asyncio.create_task(reply.complete())
    await passed.wait()
    if erasure == "finished":
        await asyncio.to_thread(services.erase_user, "u1")
    else:
        real = services.store.delete_user
        services.store.delete_user = lambda user_id: (_ for _ in ()).throw(StoreUnavailable("the database went away"))
        with pytest.raises(StoreUnavailable):
            await asyncio.to_thread(services.erase_user, "u1")
        services.store.delete_user = real
    go_on.set()
    await answering
    assert reply.recorded and services.memory.for_user("u1").list() == []
    assert "u1" not in services.memory.owners().values()  # not even an empty collection in their name
    await asyncio.to_thread(services.resume_erasures)
    assert services.memory.for_user("u1").list() == [] and services.store.owed_memory() == []
