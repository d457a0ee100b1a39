"""What becomes long-term memory: the classifier on its labelled set, and the after-turn write in a real turn."""

from __future__ import annotations

import pytest

from bench.memory_facts import evaluate, load
from memory.facts import memory_text


@pytest.mark.parametrize("split", ["heldout", "blind", None])
def test_kept_as_memory_meets_the_goal_on_messages_the_rules_were_not_fitted_to(split):
    # "heldout": a third of each kind, never used while writing the rules (but written by the same hand
    # before them); "blind": written after the rules were frozen, scored once (P 1.0, R 0.975: one mixed
    # message cut at an em dash was missed; the split then learned the dash). None: the whole set.
    report = evaluate(load(split))
    assert report["n"] >= (300 if split is None else 75)
    assert report["precision"] >= 0.9 and report["recall"] >= 0.9, report["errors"]
    assert report["mixed_part_ok"] >= 0.9 * report["mixed"], report["errors"]


@pytest.mark.parametrize("message", [
    "What is my name?", "what is my name and where do I live", "Can you suggest a weekend trip from my city?",
    "Tell me a joke.", "Thanks!", "I'm fine, thanks.", "ok", "/help", "I need a recipe for dinner tonight.",
    "The weather is nice today.", "Hello!",
])
def test_questions_requests_and_small_talk_are_not_kept(message):
    assert memory_text(message) is None


@pytest.mark.parametrize("message", [
    "My name is Lena and I live in Porto.", "I moved to Porto last year.", "My dog is called Biscuit.",
    "i like football", "We're moving to Lisbon in August.", "I'm looking for a new apartment because my lease ends.",
])
def test_statements_are_kept_as_written(message):
    assert memory_text(message) == message


@pytest.mark.parametrize("message, kept", [
    ("I'm Lena from Porto, what's the weather like?", "I'm Lena from Porto."),
    ("Hello! My name is Lena and I live in Porto.", "My name is Lena and I live in Porto."),
    ("I'm vegetarian, can you suggest a recipe?", "I'm vegetarian."),
    ("Thanks. Oh, and my cat is called Mochi.", "my cat is called Mochi."),
    ("I live in Berlin. Any good museums?", "I live in Berlin."),
])
def test_a_mixed_message_keeps_its_statement_and_drops_its_question(message, kept):
    assert memory_text(message) == kept


async def test_a_question_never_lands_in_memory_a_statement_does(services):
    async def say(text):
        reply = await services.manager.respond(user_id="lena", conversation_id="c1", text=text, channel="test")
        await reply.complete()

    await say("My name is Lena and I live in Porto.")
    await say("What is my name?")
    await say("I'm learning the cello, can you recommend an easy piece?")
    assert [m.text for m in services.memory.for_user("lena").list()] == [
        "I'm learning the cello.", "My name is Lena and I live in Porto."]
    # the transcript keeps every message
    assert len(services.store.export_user("lena")["turns"]) == 3


def test_imported_memories_are_kept_as_given(services):
    from memory.memories import MemoryItem

    memory = services.memory.for_user("imp")
    ids = memory.add([MemoryItem(text="What is my name?"), MemoryItem(text="Thanks!")])
    assert len(ids) == 2 and {m.text for m in memory.list()} == {"What is my name?", "Thanks!"}


# -- questions about the user, answered from what they said (memory/personal.py) --------------------------

async def test_questions_about_the_user_are_answered_from_profile_and_memories_in_a_new_conversation(services):
    async def say(text, conversation):
        reply = await services.manager.respond(user_id="mia", conversation_id=conversation, text=text, channel="test")
        await reply.complete()
        return reply

    for statement in ("Hello! My name is Mia and I live in Porto.", "I moved to Porto last year with my husband Marco.",
                      "I'm learning the cello and I have a dog called Biscuit.", "My birthday is on the 3rd of May."):
        await say(statement, "c-told")
    answers = {q: await say(q, "c-asked") for q in (
        "What's my name and where do I live?", "What's my dog called?", "When is my birthday?",
        "Which instrument am I learning?", "What's my husband's name?", "What do I do for a living?")}
    both = answers["What's my name and where do I live?"]
    assert "Mia" in both.text and "Porto" in both.text and both.sources[0].kind == "persona"
    assert "Biscuit" in answers["What's my dog called?"].text
    assert "3rd of May" in answers["When is my birthday?"].text
    assert answers["Which instrument am I learning?"].text == "You're learning the cello."
    assert "Marco" in answers["What's my husband's name?"].text
    assert answers["What do I do for a living?"].text == "You haven't told me what you do yet."
    again = await say("Hi again! What's my name?", "c-later")  # a greeting first: still a question about her
    assert "Mia" in again.text
    dog = answers["What's my dog called?"]
    assert dog.sources[0].kind == "memory" and "Biscuit" in services.memory.for_user("mia").list()[
        [m.id for m in services.memory.for_user("mia").list()].index(dog.sources[0].id)].text


@pytest.mark.parametrize("message", ["Can you suggest a weekend trip from my city?", "What is the capital of France?",
                                     "What should I cook tonight?", "I live in Porto.", "Hi! Can you suggest a trip?",
                                     "Thanks! I live in Porto."])
def test_other_messages_are_left_to_the_model(message):
    from memory.personal import answer_about_user
    from memory.persona import Persona

    assert answer_about_user(Persona(name="Lena"), [], message) is None


def test_a_bare_where_after_a_question_about_the_user_asks_where_of_it():
    from memory.memories import MemoryHit
    from memory.personal import answer_about_user, question_parts
    from memory.persona import Persona

    assert question_parts("Remind me: what do I do for work and where?") == ["what do I do for work", "where do I work"]
    assert question_parts("What's my name and where?") == ["What's my name", "where do I live"]
    assert question_parts("Where?") is None  # alone it asks nothing about the user
    persona = Persona(name="Amara", facts=["lives in Bristol"])
    told = [MemoryHit(id="m1", text="I work as a nurse on night shifts in Bristol.", score=0.9, meta={}, speaker="user", timestamp=None, turn_id=None)]
    reply, found = answer_about_user(persona, told, "Remind me: what do I do for work and where?")
    assert reply == "You work as a nurse on night shifts in Bristol." and found[0].id == "m1"


def test_what_the_user_does_for_a_living_answers_what_they_do_for_work():
    from memory.memories import MemoryHit
    from memory.personal import answer_about_user
    from memory.persona import Persona

    told = [MemoryHit(id="m1", text="Hi! I'm Jonas, I live in Ghent and I repair bicycles for a living.", score=0.9,
                      meta={}, speaker="user", timestamp=None, turn_id=None)]
    reply, found = answer_about_user(Persona(name="Jonas"), told, "What do I do for work?")
    assert "repair bicycles" in reply and found[0].id == "m1"


@pytest.mark.parametrize("message", ["Do you remember my name and what I do?", "Do you know where I work?",
                                     "Remind me who I am and what I do for work."])
def test_questions_put_as_embedded_ones_are_answered_from_what_the_user_said(message):
    """A new process, make chat: "Do you remember my name and what I do?" went to the model, which answered
    neither; "What's my name?" and "What do I do for a living?" were answered."""
    from memory.memories import MemoryHit
    from memory.personal import answer_about_user
    from memory.persona import Persona

    told = [MemoryHit(id="m1", text="I work as a nurse in Leeds and I have a cat called Biscuit.", score=0.9, meta={},
                      speaker="user", timestamp=None, turn_id=None)]
    reply, found = answer_about_user(Persona(name="Priya"), told, message)
    assert "nurse in Leeds" in reply and any(f.id == "m1" for f in found)
    assert ("Priya" in reply) == ("name" in message or "who I am" in message)


@pytest.mark.parametrize("message", ["Tell me what I do wrong when I bake bread?", "What I do next is up to me, right?",
                                     "Do you think where I work from matters?", "I don't know who I am anymore."])
def test_what_i_do_about_something_else_is_not_a_question_about_the_job(message):
    from memory.personal import answer_about_user
    from memory.persona import Persona

    assert answer_about_user(Persona(name="Lena", facts=["works as a nurse"]), [], message) is None


def test_where_i_live_after_only_a_place_of_work_says_what_was_said():
    """A new process, make chat, after "I'm a bike mechanic in Gdansk": "Do you remember my name and where I live?"
    → "Your name is Tomasz. You haven't told me where you live yet." (as if no place had been said)."""
    from memory.memories import MemoryHit
    from memory.personal import answer_about_user
    from memory.persona import Persona

    told = [MemoryHit(id="m1", text="Hi! I'm Tomasz, I'm a bike mechanic in Gdansk and I have a dog called Fig.",
                      score=0.9, meta={}, speaker="user", timestamp=None, turn_id=None)]
    reply, found = answer_about_user(Persona(name="Tomasz"), told, "Do you remember my name and where I live?")
    assert reply == ("Your name is Tomasz. You haven't told me where you live, but you mentioned you're a bike "
                     "mechanic in Gdansk.")
    assert [f.id for f in found if f.kind == "memory"] == ["m1"]
    reply, _ = answer_about_user(Persona(name="Tomasz"), [], "Where do I live?")
    assert reply == "You haven't told me where you live yet."


def test_a_bare_where_asks_where_of_the_verb_before_it():
    """make chat, after "I teach chemistry in Porto": "What do I teach, and where?" → "You haven't told me where you
    live, but you mentioned you teach chemistry in Porto." (the bare "where" was read as where I live)."""
    from memory.memories import MemoryHit
    from memory.personal import answer_about_user
    from memory.persona import Persona

    told = [MemoryHit(id="m1", text="Hi! I'm Marta, I teach chemistry in Porto and I have two cats.", score=0.9,
                      meta={}, speaker="user", timestamp=None, turn_id=None)]
    reply, found = answer_about_user(Persona(name="Marta"), told, "What do I teach, and where?")
    assert reply == "You teach chemistry in Porto."
    assert [f.id for f in found] == ["m1"]
    reply, _ = answer_about_user(Persona(name="Marta"), told, "What do I do, and where?")
    assert "haven't told me where you live" in reply and "teach chemistry in Porto" in reply


def test_a_question_with_the_users_own_verb_is_answered_by_their_statement():
    """API, after "Hi, I am Ana and I run a small bakery in Braga.": "What kind of shop do I run?" went to the model:
    'You mentioned "Brega." That's an Italian name, isn't it?'."""
    from memory.memories import MemoryHit
    from memory.personal import answer_about_user
    from memory.persona import Persona

    told = [MemoryHit(id="m1", text="Hi, I am Ana and I run a small bakery in Braga.", score=0.5, meta={},
                      speaker="user", timestamp=None, turn_id=None)]
    reply, found = answer_about_user(Persona(), told, "What kind of shop do I run?")
    assert reply == "You run a small bakery in Braga." and [f.id for f in found] == ["m1"]
    assert answer_about_user(Persona(), told, "What do I sell?") is None  # no "I sell": not guessed


def test_a_fact_that_answers_two_parts_is_told_once():
    """make chat: "What's my dog's name and where do I live?" → "You live in Turin with your dog Pepe. You live in
    Turin." (the second part's answer was inside the first's)."""
    from memory.memories import MemoryHit
    from memory.personal import answer_about_user
    from memory.persona import Persona

    told = [MemoryHit(id="m1", text="Hello! I'm Marco, I'm a carpenter and I live in Turin with my dog Pepe.",
                      score=0.9, meta={}, speaker="user", timestamp=None, turn_id=None)]
    persona = Persona(name="Marco", facts=["lives in Turin"])
    for message in ("What's my dog's name and where do I live?", "Where do I live and what's my dog called?"):
        reply, _ = answer_about_user(persona, told, message)
        assert "Pepe" in reply and reply.count("Turin") == 1, reply
