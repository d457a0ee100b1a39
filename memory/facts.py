"""What of a user's message is worth keeping as long-term memory: statements about them, not questions.

Questions, requests, commands and small talk stay in the transcript but tell nothing lasting about the user;
statements about the user, the people and things in their life, their preferences and plans do. A mixed
message ("I'm Lena from Porto, what's the weather like?") keeps its statement part.

Rules, not a model: a message is cut into sentences and each sentence into clauses (at commas, "so", "but"),
each clause is judged (question, request, small talk, or a statement that names the user), and the statement
clauses are kept with what continues them. Measured on `bench/data/memory_facts.jsonl` (see
`tests/test_facts.py` and `python -m bench.memory_facts`).
"""

from __future__ import annotations

import re

SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
# a clause boundary inside a sentence: a comma or semicolon, or "so"/"but" joining two clauses
CLAUSE = re.compile(r"\s*[,;:]\s+|\s+[—–-]+\s+|\s+(?=(?:so|but)\s)", re.I)
LEADING = re.compile(r"^(?:(?:and|so|but|oh|well|also|btw|by the way|anyway|ok|okay|please|hey|hi|hello)\b[,!]?\s*)+", re.I)

FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|ive|i'd|i'll|my|me|mine|myself|we|we're|we've|our|ours|us)\b", re.I)
# "Just got back from Greece", "Been living in Oslo": the subject left out is the user
SUBJECTLESS = re.compile(r"^(?:just (?:got|moved|started|finished|bought|had|came)|been \w+ing|got (?:a|my|married|back)|"
                         r"moved to|started (?:a|my)|bought (?:a|my))\b", re.I)
NAME_HERE = re.compile(r"^[A-Z][a-z]+ here\b")
CALL_ME = re.compile(r"^call me [A-Z]", re.I)

WH = r"(?:what|what's|whats|where|where's|when|why|how|how's)"
AUX = r"(?:is|are|am|was|were|do|does|did|can|could|would|will|should|shall|may|might|must|have|has|had|isn't|aren't|" \
      r"don't|doesn't|didn't|can't|won't)"
QUESTION = re.compile(rf"^(?:{WH}\s+(?:{AUX}|'s|'re|many|much|long|far|old|often|about|kind|sort|time|day|year|if|else|"
                      rf"to|a|an|the|i|you|we|my|your|it|this|that|there)\b|{WH}$|(?:who|whom|whose|which)\b|{AUX}\s+\w+|"
                      rf"(?:any|anything|ideas?|tips?|thoughts|suggestions?|recommendations?|advice)\b.*\?$)", re.I)
IMPERATIVE = re.compile(
    r"^(?:tell|give|suggest|recommend|write|explain|translate|help|make|find|draft|check|show|describe|name|list|"
    r"compare|convert|summari[sz]e|let's|lets|let us|pretend|act|imagine|remind|remember|forget|stop|start over|continue|go on|"
    r"try|say|repeat|answer|reply|respond|be|keep|don't|do not|use|send|book|plan|create|generate|calculate|define|"
    r"teach|search|look up|fix|rewrite|correct|proofread|think of|count|sing|draw|shorter|longer|speak|talk)\b", re.I)
REQUEST = re.compile(
    r"^i(?:'d| would)? (?:need|want|'d like|would like|like) (?:a |an |some |you\b|help|advice|ideas|suggestions|"
    r"recommendations|to know|to ask|to find out|to see|a list|your)|"
    r"^i (?:need|want) (?:a|an|some) (?:recipe|list|idea|ideas|summary|suggestion|recommendation|tip|tips|joke|poem)\b|"
    r"^i(?:'m| am) (?:looking for (?:a |an |some )?(?:good|nice|cheap|decent|great|best|recommendation|place)|"
    r"curious|wondering)|^i was wondering|^i want to ask|^i have a question", re.I)
SMALL_TALK = re.compile(
    r"^(?:hi|hello|hey|hiya|yo|good (?:morning|afternoon|evening|night|job)|thanks?|thank you|thx|ty|cheers|ok|okay|"
    r"cool|lol|haha\w*|nice|great|sure|yes|yeah|yep|no|nope|maybe|bye|goodbye|see you|later|wow|hmm+|oh|oops|sorry|"
    r"never mind|nevermind|interesting|awesome|perfect|exactly|right|fine|alright|indeed|welcome|have a (?:good|nice|great)|"
    r"nice to meet you|pleased to meet you|that's|that is|this is (?:great|funny|cool|wrong)|you're|you are|it's (?:ok|fine|alright)|"
    r"i'?m (?:fine|good|ok|okay|well|great|alright|back|not sure|sure|just testing\b.*|here|sorry|glad|happy to help|done)"
    r"(?:\W|$| thanks| thank you| and you| too)|"
    r"i (?:see|agree|understand|think so|don't think so|don't know|dunno|guess|didn't (?:understand|get)|"
    r"like talking|love talking|enjoy talking|hope so|mean|know right|don't understand|am not sure))(?:\W|$)", re.I)


def clauses(sentence: str) -> list[str]:
    return [part for part in CLAUSE.split(sentence) if part and part.strip()]


def kind_of(clause: str, *, asks: bool) -> str:
    """'question' | 'request' | 'smalltalk' | 'fact' (names the user) | 'other'; `asks`: the clause ends a '?'."""
    text = LEADING.sub("", clause.strip()).strip(" \t\"'")
    if not text:  # nothing but "Hi!", "ok", "please"
        return "smalltalk"
    if text.startswith("/"):
        return "request"
    bare = text.rstrip(".!?… ").lower()
    if SMALL_TALK.match(bare) and not re.search(r"\b(?:my|our)\b", bare):
        return "smalltalk"
    if asks or QUESTION.match(text):
        return "question"
    if IMPERATIVE.match(text) and not CALL_ME.match(text):
        return "request"
    if REQUEST.match(text):
        return "request"
    if FIRST_PERSON.search(text) or SUBJECTLESS.match(text) or NAME_HERE.match(text) or CALL_ME.match(text):
        return "fact"
    return "other"


def memory_text(message: str) -> str | None:
    """The statement part of a user's message worth keeping as long-term memory, or None (nothing is).

    A message that is all statement comes back as written; otherwise the kept clauses, joined."""
    kept_sentences, dropped = [], False
    for sentence in SENTENCE.split(message.strip()):
        if not sentence.strip():
            continue
        parts = clauses(sentence)
        asks = sentence.rstrip().endswith("?")
        kept: list[str] = []
        for i, part in enumerate(parts):
            kind = kind_of(part, asks=asks and i == len(parts) - 1)
            if kind == "fact" or (kind == "other" and kept):  # "…, so I'm on crutches", "…, it was amazing"
                kept.append(part.strip())
                continue
            dropped = True
            if kind in ("question", "request") and kept:
                dropped = True
                break  # what follows a question in the same sentence belongs to it
        if kept:
            if len(kept) < len(parts):
                dropped = True
            kept[0] = LEADING.sub("", kept[0]) or kept[0]
            kept_sentences.append(", ".join(kept).rstrip(",;: "))
    if not kept_sentences:
        return None
    if not dropped:
        return message.strip()
    return " ".join(s if s[-1:] in ".!" else s + "." for s in kept_sentences)


def only_tells(message: str) -> bool:
    """True when the message asks nothing and requests nothing: statements and small talk only ("Hi! I'm Marta, I
    work as a nurse"). Such a message wants a short reply; a small model left a long one role-plays."""
    for sentence in SENTENCE.split(message.strip()):
        parts = clauses(sentence)
        asks = sentence.rstrip().endswith("?")
        if any(kind_of(part, asks=asks and i == len(parts) - 1) in ("question", "request") for i, part in enumerate(parts)):
            return False
    return True


def is_memorable(message: str) -> bool:
    """True when some part of the message tells something lasting about the user."""
    return memory_text(message) is not None
