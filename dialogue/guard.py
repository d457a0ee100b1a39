"""The degeneration guard: is a candidate reply an echo, a repeat, or the user's life told as the bot's own?

Pure functions of text, defined by word overlap and grammatical person (thresholds measured on
`tests/test_guard.py`'s examples, many of them real SmolLM2-135M outputs):

- **echo**: the reply copies the user's message: a shared run of at least 3 words that carries the user's
  person or question form (I/my/you… or the opening "what/can you…"), covering at least 60% of the user's
  words or making up at least 60% of the reply. "The capital of France is…" after "What's the capital of
  France?" shares words but no person or question form: an answer. "Your name is Lena" after "My name is
  Lena" changes the person: an answer.
- **repeat**: at least 60% of the reply's word trigrams appear in one earlier bot reply of the conversation (a
  reply too short for trigrams: the same words as an earlier reply).
- **role_confusion**: a sentence in the first person only (I/my, no you/your) shares at least half of a
  recalled memory clause's content words (two at least, or the single one of a one-word fact), or claims the
  user's name or a slip of it ("I'm Lena", "My name is Elena"), or gives the assistant a person's name ("My
  name is Emma": after "Hello! My name is Lena" a small model introduces itself the same way).
- **loop**: a sentence or line whose every word trigram the reply already said (it goes round in circles).
- **empty**: nothing but whitespace and punctuation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memory.lexical import tokenize

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
FIRST = frozenset("i i'm i've i'd i'll me my mine myself we we're our ours us".split())
SECOND = frozenset("you you're you've you'd you'll your yours yourself".split())
QUESTION_OPENERS = frozenset("what what's where when why how which who whose can could would will should do does "
                             "did is are am".split())
FACT_CLAUSE = re.compile(r"(?<=[.!?])\s+|\s*[,;]\s*|\s+(?:and|but|so)\s+", re.I)
MIN_RUN = 3
ECHO_SHARE = 0.6
REPEAT_SHARE = 0.6
ROLE_SHARE = 0.5


@dataclass(frozen=True)
class Verdict:
    """The guard's finding: `kind` None means the reply may be shown; `copied` is the copied words."""

    kind: str | None = None  # None | "echo" | "repeat" | "loop" | "role_confusion" | "invented_contact" | "empty"
    score: float = 0.0
    copied: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.kind is None


def words(text: str) -> list[str]:
    return WORD.findall(text.lower().replace("’", "'"))


def longest_run(a: list[str], b: list[str]) -> tuple[int, int]:
    """(length, start in `a`) of the longest run of consecutive words that `a` and `b` share."""
    best, start = 0, 0
    previous = [0] * (len(b) + 1)
    for i, word in enumerate(a):
        current = [0] * (len(b) + 1)
        for j, other in enumerate(b):
            if word == other:
                current[j + 1] = previous[j] + 1
                if current[j + 1] > best:
                    best, start = current[j + 1], i + 1 - current[j + 1]
        previous = current
    return best, start


def trigrams(tokens: list[str]) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)}


def echo(reply: list[str], user: list[str]) -> Verdict:
    if len(user) < MIN_RUN:
        return Verdict()
    length, start = longest_run(reply, user)
    if length < MIN_RUN:
        return Verdict()
    run = reply[start:start + length]
    asks = user[0] in QUESTION_OPENERS
    voiced = any(w in FIRST or w in SECOND for w in run) or (asks and run[0] == user[0])
    share = max(length / len(user), length / len(reply))
    if voiced and share >= ECHO_SHARE:
        return Verdict("echo", round(share, 3), tuple(run))
    return Verdict()


def loop(reply: str) -> Verdict:
    """A sentence or line every trigram of which the reply already said: the reply goes round in circles
    ("- 1 teaspoon of salt" a second time in one ingredient list)."""
    seen: set[tuple[str, ...]] = set()
    for sentence in SENTENCE.split(reply):
        grams = trigrams(words(sentence))
        if len(grams) >= 2 and grams <= seen:
            return Verdict("loop", 1.0, tuple(words(sentence)))
        seen |= grams
    return Verdict()


def repeat(reply: list[str], earlier: list[str]) -> Verdict:
    mine = trigrams(reply)
    if not mine:  # too short for trigrams ("Hello, Grace."): the very same words again
        if reply and any(words(text) == reply for text in earlier):
            return Verdict("repeat", 1.0, tuple(reply))
        return Verdict()
    best, copied = 0.0, ()
    for text in earlier:
        before = words(text)
        share = len(mine & trigrams(before)) / len(mine)
        if share > best:
            length, start = longest_run(reply, before)
            best, copied = share, tuple(reply[start:start + length])
    if best >= REPEAT_SHARE:
        return Verdict("repeat", round(best, 3), copied)
    return Verdict()


NAME_CLAIM = re.compile(r"\b(?:i'm|i am|my name is|my name's|call me)\s+([a-z]+)")
SELF_INTRO = re.compile(r"\bmy name(?: is|'s)\s+([a-z]+)")  # the assistant giving itself a person's name
OWN_NAMES = frozenset({"rapport"})


def near(a: str, b: str) -> bool:
    """The same name or a slip of it ("Elena" for "Lena"): at most one edit in four letters."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > max(1, len(b) // 4):
        return False
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1] <= max(1, len(b) // 4)


def role_confusion(reply: str, memories: list[str], user_name: str | None) -> Verdict:
    # a memory often holds several facts ("I'm learning the cello and I have a dog"): each clause is one
    facts = [set(tokenize(part)) for text in memories for part in FACT_CLAUSE.split(text)]
    # the user's name, known or introduced in what they said ("My name is Lena")
    names = {user_name.split()[0].lower()} if user_name and user_name.strip() else set()
    names |= {m.group(1) for text in memories for m in NAME_CLAIM.finditer(" ".join(words(text)))
              if m.group(1) not in FIRST and len(m.group(1)) > 2}
    for sentence in SENTENCE.split(reply):
        tokens = words(sentence)
        claimed = {m.group(1) for m in NAME_CLAIM.finditer(" ".join(tokens))}  # "you" beside it changes nothing
        if any(near(c, n) for c in claimed for n in names):
            return Verdict("role_confusion", 1.0, tuple(tokens))
        if len(tokens) == 1 and any(near(tokens[0], n) for n in names):  # "Best regards,\nMarta": signed as the user
            return Verdict("role_confusion", 1.0, tuple(tokens))
        if any(m.group(1) not in OWN_NAMES for m in SELF_INTRO.finditer(" ".join(tokens))):
            return Verdict("role_confusion", 0.9, tuple(tokens))  # "Hello! My name is Emma": role play
        if not any(w in FIRST for w in tokens) or any(w in SECOND for w in tokens):
            continue
        said = set(tokenize(sentence))
        for fact in facts:
            shared = len(said & fact)
            if fact and shared / len(fact) >= ROLE_SHARE and (shared >= 2 or len(fact) == 1):
                return Verdict("role_confusion", round(shared / len(fact), 3), tuple(tokens))
    return Verdict()


# A link, an e-mail address or a phone number: a small model makes them up ("www.sleepfoundation.org/en/pages/…",
# "call 0800 …"), and a made-up one sends a user somewhere nobody vouched for.
LINK = re.compile(r"(?i)\b(?:https?://[^\s<>\"]+|www\.[^\s<>\"]+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|"
                  r"[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|co|uk|gov|edu|info)\b(?:/[^\s<>\"]*)?)")
# how phone numbers are written (+44 …, 0800 …, (555) …); a date and time ("2024-12-07 10:30") is not one
PHONE = re.compile(r"(?<![\w.])(?:\+\d|\(\d|0\d)[\d ()./-]{6,}\d")


def invented_contact(reply: str, given: str | tuple[str, ...]) -> Verdict:
    """A link, address or phone number (9+ digits) in `reply` that `given` (what the turn was given) does not hold.
    Checked per sentence while a reply streams: `given` is only read when the sentence has a candidate."""
    links = [m.group(0).lower().rstrip(".,;:!?)'\"") for m in LINK.finditer(reply)]
    numbers = [n for n in (re.sub(r"\D", "", m.group(0)) for m in PHONE.finditer(reply)) if len(n) >= 9]
    if not links and not numbers:
        return Verdict()
    text = given if isinstance(given, str) else "\n".join(given)
    known = text.lower()
    for link in links:
        if link not in known:
            return Verdict("invented_contact", 1.0, tuple(w for w in words(link)[:1] if w in ("www", "http", "https")))
    digits = re.sub(r"\D", "", text)
    if any(n not in digits for n in numbers):
        return Verdict("invented_contact", 1.0)
    return Verdict()


def check_reply(reply: str, *, user_text: str, earlier_replies: list[str] = (), memories: list[str] = (),
                user_name: str | None = None, given: str = "") -> Verdict:
    """The first thing wrong with `reply` (empty, echo, repeat, role confusion, an invented link or number), or an
    ok Verdict. `given` is the rest of what the model was given (its FAQ entries, the profile)."""
    tokens = words(reply)
    if not tokens:
        return Verdict("empty", 1.0)
    # what the user says in this very message is their fact too ("I work as a writer" → "I'm a writer")
    for verdict in (echo(tokens, words(user_text)), repeat(tokens, list(earlier_replies)), loop(reply),
                    role_confusion(reply, [*memories, user_text], user_name),
                    invented_contact(reply, (user_text, *memories, *earlier_replies, given))):
        if not verdict.ok:
            return verdict
    return Verdict()
