"""Questions about the user ("What's my name and where do I live?") answered from their profile and memories.

A 135M model tells the user's facts back as its own or misses them; like a FAQ entry, the stored statement is
the source of truth. Each part of a compound question is matched to one clause of the profile or of a
recalled memory (by what the part asks for, then by shared words), and that clause is told back in the
second person ("I moved to Lyon" → "You moved to Lyon."). A part that nothing answers is said to be unknown
when the question kind is clear; otherwise the whole message is left to the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memory.facts import SUBJECTLESS, kind_of
from memory.lexical import tokenize

PARTS = re.compile(r"\s*(?:,|;|\?|\band\b(?= (?:what|where|when|which|who|how|do|did|am|is|what's|my)\b))\s*", re.I)
PREFIX = re.compile(r"^(?:(?:remind me|tell me|so|and|also|ok|hey|please|can you tell me|do you (?:know|remember)|"
                    r"you know)\b[,:]?\s*)+", re.I)
# asking for help or advice, not about what the user said ("Can you suggest a trip from my city?")
# a greeting or thanks before the question ("Hi again! Remind me, what's my name?"): nothing to answer in it
GREETING = re.compile(r"^(?:(?:hi|hello|hey|hiya|howdy|good (?:morning|afternoon|evening)|thanks|thank you|ok(?:ay)?|"
                      r"great|cool|sorry)(?: again| there| so much)?\b[!.,]*\s*)+", re.I)
ADVICE = re.compile(r"^(?:can|could|would|will) you\b|^(?:what|how|where|which|when) (?:should|could|can|shall) i\b|"
                    r"^should i\b|^any\b", re.I)
ABOUT_ME = re.compile(r"\b(?:my|i|i'm|am i|me|mine)\b", re.I)
CLAUSE = re.compile(r"(?<=[.!?])\s+|\s*[,;]\s+|\s+(?:and|but)\s+(?=(?:i|i'm|i've|my|we|we're|our)\b)", re.I)
OWN = re.compile(r"\b(?:i|i'm|i've|my|we|we're|our)\b", re.I)
# "Who is Ada?": a name the user mentioned
WHO = re.compile(r"^\s*(?i:and |so )?(?i:who)(?:'s| is| was) ([A-Z][\w'-]+)\W*$")
PLAN_VERBS = "running|doing|getting|taking|starting|moving|visiting|travelling|traveling|training|flying|going|opening"
PEOPLE_PETS = ("husband|wife|partner|boyfriend|girlfriend|sister|brother|son|daughter|kids?|children|mum|mom|mother|"
               "dad|father|grandmother|grandma|grandfather|grandpa|aunt|uncle|cousin|friend|boss|roommate|neighbour|"
               "neighbor|dog|cat|pet|parrot|hamster|rabbit|horse|puppy|kitten")

# (kind, what the question asks, what an answering statement says)
ASKS: list[tuple[str, re.Pattern[str], re.Pattern[str]]] = [
    ("name", re.compile(r"\bmy name\b|\bwho (?:am i|i am)\b|\bcall me\b", re.I),
     re.compile(r"\bmy name(?: is|'s)\b|\bi(?:'m| am) called\b|\bcall me\b|^(?:\w+(?: there)?[,!.]?\s+)?i(?:'m| am) (?-i:[A-Z])|"
                r"^(?-i:[A-Z][a-z]+) here\b", re.I)),
    ("home", re.compile(r"\bwhere (?:do|did) i (?:live|move)|\bwhere am i from\b|\b(?:which|what) (?:city|town|country)\b|"
                        r"\bmy (?:city|town|hometown)\b|\bwhere i live\b|\bmove to\b", re.I),
     re.compile(r"\b(?:i|we) (?:live|moved|grew up|am from|'m from)\b|\bi(?:'m| am) from\b|\bmy hometown\b|\bliving in\b|"
                r"\bmoved to\b|\b(?:lives in|from) (?-i:[A-Z])", re.I)),
    ("birthday", re.compile(r"\bbirthday\b|\bwhen was i born\b|\bhow old am i\b|\bmy age\b", re.I),
     re.compile(r"\bbirthday\b|\bborn\b|\byears old\b|\bi(?:'m| am) \d+\b", re.I)),
    # also as an embedded question ("Do you remember my name and what I do?")
    ("job", re.compile(r"\bfor a living\b|\bmy (?:job|work|profession|occupation)\b|\bwhere (?:do i|i) work\b(?! (?:from|on|with|best)\b)|"
                       r"\bwhat (?:do i|i) (?:do|teach|study)\b(?! (?:on|at|in|for fun|with|after|before|when|wrong|next|"
                       r"now|about|if|to)\b)|\bwhat is my job\b", re.I),
     # "I'm a/an <anything>" that is not a liking ("I'm a huge fan of…")
     re.compile(r"\bi work\b|\bworks as\b|\bmy job\b|\bi teach\b|\bi study\b|\bfor a living\b|"
                r"\bi(?:'m| am) an? (?!(?:big|huge|great|real|bit|little|fan|lot)\b)[a-z]+\b", re.I)),
    ("instrument", re.compile(r"\binstrument\b|\bwhat do i play\b", re.I),
     re.compile(r"\b(?:play|playing|learning|learn)\b (?:the )?(?:cello|guitar|piano|violin|drums|flute|bass|"
                r"saxophone|trumpet|ukulele|harp|clarinet|viola)\b", re.I)),
    ("hobby", re.compile(r"\bhobb(?:y|ies)\b|\bfor fun\b|\b(?:free|spare) time\b|\bwhat do i do (?:on|at|in|after)\b|"
                         r"\bwhat do i (?:love|enjoy|like) doing\b", re.I),
     re.compile(r"\bi (?:really )?(?:love|enjoy|like|adore)\b|\bi(?:'m| am) into\b|\bmy hobb|\bi play\b|\bon weekends\b|"
                r"\bin my (?:free|spare) time\b", re.I)),
    ("plan", re.compile(r"\bplan(?:s|ning|ned)?\b|\btraining for\b|\bpreparing for\b|\bam i (?:going|about) to\b|"
                        r"\bwhat am i doing (?:next|this|in)\b", re.I),
     re.compile(rf"\bplan(?:s|ning|ned)?\b|\bgoing to\b|\bi(?:'m| am) (?:{PLAN_VERBS})\b|\bi(?:'ll| will)\b", re.I)),
]
RELATION = re.compile(rf"\bmy ({PEOPLE_PETS})(?:'s)?\b", re.I)
SECOND_PERSON = {"i": "you", "i'm": "you're", "im": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll",
                 "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "am": "are", "was": "were",
                 "we": "you", "we're": "you're", "we've": "you've", "our": "your", "ours": "yours", "us": "you"}


@dataclass(frozen=True)
class Found:
    """One part's answer: the statement told back, and where it came from ("persona", field) or ("memory", id)."""

    text: str
    kind: str
    id: str


def second_person(clause: str) -> str:
    """"I moved to Lyon with my husband" → "You moved to Lyon with your husband" (sentence-initial capital)."""
    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        return SECOND_PERSON.get(word.lower().replace("’", "'"), word)

    text = re.sub(r"\b[A-Za-z]+(?:['’][a-z]+)?\b", swap, clause.strip().rstrip(".!"))
    text = re.sub(r"\bare\b(?= \w+ years old)", "are", text)
    text = re.sub(r"\byou (?:was|is)\b", "you were", text)
    return text[:1].upper() + text[1:] + "."


def question_parts(text: str) -> list[str] | None:
    """The parts of a message that asks only about the user, or None when it asks (or says) anything else."""
    body = PREFIX.sub("", GREETING.sub("", text.strip()))
    parts = [PREFIX.sub("", p).strip() for p in PARTS.split(body)]
    parts = [p for p in parts if p and re.search(r"\w", p)]
    for i in range(1, len(parts)):  # "what do I do for work and where?": a bare "where" asks where, of that
        if re.fullmatch(r"(?i)where", parts[i]):
            verb = asked_verb(parts[i - 1])  # "What do I teach, and where?": where I teach
            parts[i] = ("where do I work" if re.search(r"(?i)\bwork|\bjob\b", parts[i - 1])
                        else f"where do I {verb}" if verb and verb.lower() != "live" else "where do I live")
    if not parts or not text.rstrip().endswith("?") and not re.match(r"(?i)(?:what|where|when|which|who|how)\b", body):
        return None
    for part in parts:
        if not ABOUT_ME.search(part) or ADVICE.match(part) or kind_of(part, asks=True) != "question":
            return None
    return parts


def asked_verb(part: str) -> str | None:
    """The verb of "... do I <verb>" ("What kind of shop do I run?" → "run"), not "do" itself."""
    match = re.search(r"(?i)\bdo i (\w+)", part)
    return match.group(1) if match and match.group(1).lower() != "do" else None


def terms(text: str) -> set[str]:
    """Content terms, with a final "e" dropped so that "move" meets "moved" (stemmed to "mov")."""
    return {t.rstrip("e") or t for t in tokenize(text)}


def clauses(text: str) -> list[str]:
    return [c.strip() for c in CLAUSE.split(text) if c and c.strip()]


def answer_part(part: str, persona, memories: list) -> tuple[Found | None, str | None]:
    """(the answer, the kind asked for) for one question part; kind None when the part is not understood."""
    kind = next((k for k, asks, _ in ASKS if asks.search(part)), None)
    relation = RELATION.search(part)
    called = getattr(persona, "name", "") or getattr(persona, "address_as", "")
    if kind == "name" and called:
        return Found(f"Your name is {called}.", "persona", "name" if persona.name else "address_as"), kind
    if kind == "home":
        for fact in getattr(persona, "facts", []):
            if fact.startswith("lives in "):
                return Found(f"You live in {fact[9:]}.", "persona", "facts"), kind
    says = next((s for k, _, s in ASKS if k == kind), None)
    asked = terms(part) - {"name", "call", "kind", "sort", "typ"}
    # "What kind of shop do I run?" is answered by the user's own "I run ...", whatever the shop is called there
    verb = asked_verb(part)
    own_verb = re.compile(rf"(?i)\bi (?:\w+ )?{verb}\b") if verb else None
    best, best_score = None, 0.0
    for memory in memories:
        for clause in clauses(memory.text):
            subjectless = SUBJECTLESS.match(clause)  # "Just moved to Lisbon": the user is the subject
            if not OWN.search(clause) and not subjectless:
                continue
            score = 0.0
            if says is not None and says.search(clause):
                score += 2
            if relation and re.search(rf"\b{relation.group(1)}\b", clause, re.I):
                score += 2
            if own_verb is not None and own_verb.search(clause):
                score += 2
            shared = len(asked & terms(clause))
            score += 0.5 * shared
            if kind is None and not relation and (shared >= 2 or shared == len(asked) == 1):
                score += 2  # a question of no known kind, answered by the clause that has its words
            if score > best_score:
                told = second_person(clause) if not subjectless else "You " + clause[:1].lower() + second_person(clause)[1:]
                best, best_score = Found(told, "memory", memory.id), score
    if best is not None and best_score >= 2:
        return best, kind or ("relation" if relation else "other")
    if kind == "home":
        for fact in getattr(persona, "facts", []):
            if fact.startswith("from "):
                return Found(f"You're from {fact[5:]}.", "persona", "facts"), kind
        mentioned = place_mentioned(memories)
        if mentioned is not None:
            return mentioned, kind
    return None, kind or ("relation" if relation else None)


PLACE = re.compile(r"\b(?:in|near|outside) [A-Z][\w'-]+")


def place_mentioned(memories: list) -> Found | None:
    """Never said where they live, but "I'm a bike mechanic in Gdansk": say so, rather than "you haven't told me"
    as if they had said nothing about a place."""
    for memory in memories:
        for clause in clauses(memory.text):
            if OWN.search(clause) and PLACE.search(clause):
                told = second_person(clause).rstrip(" .!")
                return Found(f"You haven't told me where you live, but you mentioned {told[:1].lower() + told[1:]}.",
                             "memory", memory.id)
    return None


def answer_who(memories: list, text: str) -> tuple[str, list[Found]] | None:
    """"Who is Ada?" answered by the user's own statement naming Ada ("My sister is called Ada.")."""
    match = WHO.match(text)
    if not match:
        return None
    for memory in memories:
        for clause in clauses(memory.text):
            if OWN.search(clause) and re.search(rf"\b{re.escape(match.group(1))}\b", clause):
                found = Found(second_person(clause), "memory", memory.id)
                return found.text, [found]
    return None


UNKNOWN = {"name": "your name", "home": "where you live", "birthday": "your birthday", "job": "what you do",
           "instrument": "which instrument you play", "hobby": "what you do for fun", "plan": "your plans",
           "relation": "that"}


def bare(text: str) -> str:
    """A told-back statement without its case and closing stop, to see one inside another."""
    return text.lower().rstrip(" .!")


def answer_about_user(persona, memories: list, text: str) -> tuple[str, list[Found]] | None:
    """(reply, its sources) for a message that only asks about the user, or None to leave it to the model."""
    parts = question_parts(text)
    if not parts:
        return answer_who(memories, text)
    found: list[Found] = []
    missing: list[str] = []
    for part in parts:
        answer, kind = answer_part(part, persona, memories)
        if answer is not None:
            said = [bare(f.text) for f in found]
            if not any(bare(answer.text) in text for text in said):  # nothing told twice ("You live in Turin.")
                found = [f for f, text in zip(found, said) if text not in bare(answer.text)] + [answer]
        elif kind is None or kind == "other":
            return None  # a part we do not understand: the model (with the memories in its prompt) answers
        else:
            missing.append(UNKNOWN[kind])
    if not found and not missing:
        return None
    lines = [f.text for f in found]
    if missing:
        lines.append(f"You haven't told me {' or '.join(missing)} yet.")
    return " ".join(lines), found
