"""Pure checks on one reply's text, shared by data cleaning and the behaviour gate: no model, no I/O.

Each returns a number where higher means more of the named fault (or a count), so a caller compares a
candidate's figure with a reference's plus a tolerance.
"""

from __future__ import annotations

import re

WORD = re.compile(r"[a-z']+")
# The most frequent English words: ordinary prose is 35-55% these; random syllables or another script almost none.
COMMON = frozenset("""
a about after all also am an and any are as at be because been before but by can could do does don't for
from get give go good has have he her here him his how i i'm if in into is it it's its just keep know let like
make may me more most much my no not now of off on one only or other our out over please put same see she so
some such take than thank thanks that the their them then there these they this time to too try up us use very
want was way we well were what when where which while who why will with would yes you your you're
""".split())
PHONE = re.compile(r"(?<!\w)\+?\d[\d\s().-]{6,}\d(?!\w)")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
PLACEHOLDER = re.compile(r"\[(?:phone|email|card)\]")  # what training/redact.py leaves of one
INSULTS = frozenset("""
idiot idiots idiotic stupid moron morons dumb dumbest loser losers pathetic imbecile clueless fool foolish
incompetent ignorant lazy shut worthless dimwit halfwit brainless
""".split())
HANDOFF = ("don't know", "do not know", "not sure", "colleague", "human", "a person", "cannot help", "can't help",
           "unable to", "no information", "not able to", "don't have", "do not have")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the reply's word n-grams that already occurred earlier in it (0 = no loop)."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def echo_rate(reply: str, prompt: str, n: int = 4) -> float:
    """Share of the reply's word n-grams copied from the prompt (the user's message and context)."""
    grams = ngrams(words(reply), n)
    if not grams:
        return 0.0
    source = set(ngrams(words(prompt), n))
    return sum(gram in source for gram in grams) / len(grams)


def common_word_share(text: str) -> float | None:
    """Share of words among the most frequent English ones; None for a reply too short to tell (under 6 words)."""
    tokens = words(text)
    if len(tokens) < 6:
        return None
    return sum(token in COMMON for token in tokens) / len(tokens)


def contacts(text: str) -> set[str]:
    """Phone numbers, e-mail addresses, URLs (normalised: digits only for phones) and redaction placeholders."""
    found = {digits for m in PHONE.findall(text) if len(digits := re.sub(r"\D", "", m)) >= 7}  # not "20-20-20"
    found |= {m.lower().rstrip(".,") for m in EMAIL.findall(text) + URL.findall(text)}
    found |= set(PLACEHOLDER.findall(text))
    return {item for item in found if item}


def ungrounded_contacts(reply: str, prompt: str) -> set[str]:
    """Contact details in the reply that the prompt (FAQ, memories, the message) did not give."""
    given = contacts(prompt)
    return {item for item in contacts(reply) if item not in given}


def insult_count(text: str) -> int:
    return sum(token in INSULTS for token in words(text))


def offers_handoff(text: str) -> bool:
    """The reply admits not knowing or offers a person, as the FAQ prompt asks for questions it does not cover."""
    lowered = text.lower().replace("’", "'")
    return any(phrase in lowered for phrase in HANDOFF)
