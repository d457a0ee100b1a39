"""The persona: rules that learn it from what the user says, validation, and its store on both databases."""

from __future__ import annotations

import pytest

from dialogue.store import TranscriptStore
from memory.errors import InvalidInput
from memory.persona import Persona, PersonaStore, learn


@pytest.mark.parametrize("said, expected", [
    ("Hi! My name is Lena and I live in Porto.", {"name": "Lena", "address_as": "Lena", "facts": ["lives in Porto"]}),
    ("hello, I'm Max", {"name": "Max", "address_as": "Max"}),
    ("Please call me Lee, and keep it short.", {"address_as": "Lee", "verbosity": "short"}),
    ("I'm vegetarian and I love hiking and jazz.", {"facts": ["diet: vegetarian"], "interests": ["hiking", "jazz"]}),
    ("Could you answer in German from now on?", {"language": "German"}),
    ("Please be more formal.", {"tone": "formal"}),
    ("Can you explain in detail?", {"verbosity": "detailed"}),
    # a fact ends where a new clause starts (it read "works as nurse and I have a dog called Pico")
    ("I work as a nurse and I have a dog called Pico.", {"facts": ["works as nurse"]}),
    ("I love hiking and I have a cat, and I'm allergic to cats but I cope.",
     {"facts": ["allergic to cats"], "interests": ["hiking"]}),
])
def test_rules_learn_what_is_said_plainly(said, expected):
    persona = Persona()
    learn(persona, said)
    assert {k: v for k, v in persona.to_json().items() if v} == expected


@pytest.mark.parametrize("said", ["I'm tired", "my name is not important", "What is my name?", "I like it when you are brief",
                                  "Hi! I'm Sure that works", "Call me maybe"])
def test_rules_do_not_guess(said):
    persona = Persona()
    learn(persona, said)
    assert persona == Persona()


def test_set_fields_are_validated():
    persona = Persona().updated({"name": "Ana", "interests": "chess; tea", "verbosity": "Short"})
    assert (persona.name, persona.interests, persona.verbosity) == ("Ana", ["chess", "tea"], "short")
    for bad in ({"nickname": "x"}, {"verbosity": "huge"}, {"name": 3}, {"name": "x" * 500}, {"facts": [1, 2]}):
        with pytest.raises(InvalidInput):
            Persona().updated(bad)
    assert Persona().updated({"name": "A\x1b[31mna\x00"}).name == "A[31mna"  # the one cleaner: controls go


def test_store_keeps_one_profile_per_user(db_url):
    store = TranscriptStore(db_url)
    personas = PersonaStore(store.engine)
    assert personas.get("lena") == Persona()
    assert personas.learn("lena", "My name is Lena.") == ["address_as", "name"]
    personas.update("lena", {"verbosity": "short"})
    personas.update("max", {"name": "Max"})
    assert personas.get("lena").name == "Lena" and personas.get("lena").verbosity == "short"
    assert personas.get("max").name == "Max" and personas.get("max").verbosity == ""
    assert store.delete_user("lena")["personas"] == 1
    assert personas.get("lena") == Persona() and personas.get("max").name == "Max"
    store.close()


def test_plain_questions_about_the_profile_are_answered_from_it():
    from memory.persona import answer_from_profile

    lena = Persona(name="Lena", address_as="Lee", facts=["lives in Porto"])
    assert answer_from_profile(lena, "What is my name?") == "Your name is Lena, and you asked me to call you Lee."
    assert answer_from_profile(lena, "where do I live?") == "You told me you live in Porto."
    assert "haven't told me your name" in answer_from_profile(Persona(), "What's my name?")
    assert answer_from_profile(lena, "What is my name and what does it mean?") is None  # not a plain question
