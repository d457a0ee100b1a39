"""The degeneration guard on written examples; those marked `smol` are real SmolLM2-135M replies (temperature
0.3, the issue's transcript and scripted users), the rest written to probe the thresholds from both sides."""

from __future__ import annotations

import pytest

from dialogue.guard import check_reply

LENA = "My name is Lena and I live in Porto."
BLOG = ("Hello, Lena! Welcome to my blog. I'm so glad you're here and happy to help you with your writing skills. "
        "What brings you to my blog today?")
KAI = "I'm Kai. I'm learning the cello and I have a dog called Biscuit."
BONJOUR = ("Bonjour, monsieur. I'm glad to hear that you're enjoying your new life in Lyon! It's a pleasure to have "
           "you as part of my family. I've been working here for a few years now, and I must say, it's a fantastic "
           "city with so many amazing people. How has your journey been? Have you had any exciting experiences or "
           "challenges along the way?")

# (reply, user message, earlier bot replies, recalled memories, user's name, expected kind)
CASES = [
    # echoes
    ("Hello! My name is Lena and I live in Porto.", "Hello! " + LENA, [], [], None, "echo"),  # the issue
    ("What is my name and where do I live?", "What is my name and where do I live?", [], [LENA], "Lena", "echo"),
    ("Can you suggest a weekend trip from my city? Sure!", "Can you suggest a weekend trip from my city?", [], [], None, "echo"),
    ("My name is Lena and I live in Porto. How can I help you today?", LENA, [], [], None, "echo"),
    ("I work as a freelance writer.", "I work as a freelance writer.", [], [], None, "echo"),
    # repeats
    ("Hello, Lena! Welcome to my blog. I'm so glad you're here and happy to help with your writing skills. "
     "What's your name?", "What is my name and where do I live?", [BLOG], [LENA], "Lena", "repeat"),  # smol
    ("Hello! My name is Lena and I live in Porto.", "Can you suggest a weekend trip from my city?",
     ["Hello! My name is Lena and I live in Porto."], [LENA], "Lena", "repeat"),  # the issue, third turn
    ("Bonjour, monsieur. It's a pleasure to have you as part of my family. I'm glad to hear that your birthday is "
     "approaching soon! How has your life been so far? Have you had any exciting experiences or challenges in the "
     "past few months?", "My birthday is on the 3rd of May.", [BONJOUR], [], None, None),  # smol: a rephrasing, 35% shared
    # role confusion
    ("I'm learning the cello.", "Which instrument am I learning?", [], [KAI], "Kai", "role_confusion"),
    ("I'm Kai, the cellist. I've been learning the violin and playing the cello for a while now.",
     "Which instrument am I learning?", [], [KAI], "Kai", "role_confusion"),  # smol
    ("I'm Kai, a freelance writer. I've recently been working on my own blog about creative writing.",
     "I work as a freelance writer.", [], [KAI], "Kai", "role_confusion"),  # smol
    ("I'm a freelance writer, and I love it.", "What do I do for a living?", [], ["I work as a freelance writer."],
     None, "role_confusion"),  # the issue
    ("My dog Biscuit loves long walks.", "What's my dog called?", [], [KAI], "Kai", "role_confusion"),
    ("Hi, I'm Lena! Nice to meet you.", "Hello!", [], [LENA], "Lena", "role_confusion"),
    ("Hello! My name is Elena, and I'm here to help with any questions you might have.", LENA, [], [], None,
     "role_confusion"),  # smol, behind the copy block: the user's introduction with the name slipped
    ("Hello! My name is Emma, and I'm a wonderful person with many amazing talents.", LENA, [], [], "Lena",
     "role_confusion"),  # smol, behind the copy block
    ("Hi, I'm Rapport, your assistant. How can I help?", LENA, [], [], "Lena", None),  # its own name: not the user's
    ("My name is Rapport, your assistant.", "Who are you?", [], [LENA], "Lena", None),  # its own name
    ("I live in Porto, it's a lovely city.", "Where do I live?", [], [LENA], "Lena", "role_confusion"),
    # a loop inside one reply
    ("Ingredients:\n- 1 teaspoon of salt\n- 1 teaspoon of black pepper\n- 1 cup of rice\n- 1 teaspoon of salt\n",
     "Can you suggest a quick dinner recipe?", [], [], None, "loop"),  # smol, make chat
    ("Ingredients:\n- 1 teaspoon of salt\n- 1 teaspoon of black pepper\n- 1 teaspoon of cumin\n",
     "Can you suggest a quick dinner recipe?", [], [], None, None),  # the same measure, other things: a list
    # answers and ordinary replies: not caught
    ("Your name is Lena and you live in Porto.", "What is my name and where do I live?", [], [LENA], "Lena", None),
    ("You're learning the cello.", "Which instrument am I learning?", [], [KAI], "Kai", None),
    ("I remember you're learning the cello!", "Which instrument am I learning?", [], [KAI], "Kai", None),
    ("Nice to meet you, Lena! Porto is a beautiful city. How can I help?", "Hello! " + LENA, [], [], None, None),
    ("Biscuit. He's a big, fluffy white dog with a wagging tail and a friendly face.", "What's my dog called?", [],
     [KAI], "Kai", None),  # smol
    ("Cher - Lyon, France.", "Which city did I move to?", [], ["I moved to Lyon last year with my husband Marco."],
     None, None),  # smol
    ("I'm so sorry for any confusion. I'd be happy to help you find your home or a place to live in Porto, which is "
     "a beautiful city located on the Iberian Peninsula in Europe.", "Remind me, what is my name and where do I live?",
     [], [LENA], "Lena", None),  # smol: unhelpful, but neither an echo nor the user's life as its own
    ("The capital of France is Paris.", "What's the capital of France?", [], [], None, None),
    ("To convert Celsius to Fahrenheit, multiply by 9/5 and add 32.", "How do I convert Celsius to Fahrenheit?",
     [], [], None, None),
    ("Hello! How can I help you today?", "Hello!", [], [], None, None),
    ("I'd be happy to help you plan a weekend trip from Porto: Braga and Guimarães are an hour away.",
     "Can you suggest a weekend trip from my city?", ["Nice to meet you, Lena!"], [LENA], "Lena", None),
    ("Sure! Here are three ideas for a birthday present: a book, a plant, a concert ticket.",
     "Give me three ideas for a birthday present.", ["Sure! Here are some recipes with chickpeas: hummus, falafel."],
     [], None, None),
    ("I'm an AI assistant, so I don't have a name of my own.", "Who are you?", [], [LENA], "Lena", None),
    ("", "Hello!", [], [], None, "empty"),
    (" ... ", "Hello!", [], [], None, "empty"),
]


@pytest.mark.parametrize("reply, user, earlier, memories, name, expected", CASES)
def test_the_guard_catches_echoes_repeats_and_role_confusion_not_answers(reply, user, earlier, memories, name, expected):
    verdict = check_reply(reply, user_text=user, earlier_replies=earlier, memories=memories, user_name=name)
    assert verdict.kind == expected, verdict


def test_a_prefix_of_an_echo_is_already_an_echo():
    """Streaming holds back the first words and checks them: the prefix must be enough."""
    full = "Hello! My name is Lena and I live in Porto. I love the river and the old town, and the food."
    prefix = " ".join(full.split()[:8])
    assert check_reply(prefix, user_text="Hello! " + LENA).kind == "echo"
    assert check_reply(" ".join(BLOG.split()[:12]), user_text="Where do I live?", earlier_replies=[BLOG]).kind == "repeat"


def test_a_link_address_or_phone_number_nothing_gave_is_invented():
    from dialogue.guard import invented_contact

    sleep = "You can read more on the National Sleep Foundation's website: www.sleepfoundation.org/en/pages/tips."
    assert check_reply(sleep, user_text="How do I sleep after a night shift?").kind == "invented_contact"
    assert invented_contact(sleep, "").copied == ("www",)  # the retry avoids starting a link
    assert invented_contact("Write to help@shop.com please.", "").kind == "invented_contact"
    assert invented_contact("Call us on +44 20 7946 0958.", "").kind == "invented_contact"
    # what the turn was given (the FAQ entry, the user's own message, a memory) is not invented
    given = "Opening hours are on www.bikeshop.example.com/hours; phone +44 (20) 7946-0958."
    assert check_reply("See www.bikeshop.example.com/hours.", user_text="When are you open?", given=given).ok
    assert check_reply("Call +44 20 7946 0958.", user_text="Your number?", given=given).ok
    assert check_reply("Your site is lena.io, you said.", user_text="Hi", memories=["My site is lena.io"]).ok
    assert check_reply("Your site is lena.io, you said.", user_text="Hi").kind == "invented_contact"
    assert check_reply("It was shop.com/returns.", user_text="The link again?", earlier_replies=["See shop.com/returns."]).ok
    # ordinary numbers and dotted names are not contact details
    assert check_reply("It costs 1,250.00 euros, 3.5 km away, since 2024; I like node.js.", user_text="Hi").ok
    assert check_reply("We met on 2024-12-07 10:30 and 300 000 000 people agree.", user_text="Hi").ok
    assert invented_contact("Ring 0800 123 4567 or (555) 123-4567.", "").kind == "invented_contact"
