"""Who the user is and how to talk to them: a profile per user, set explicitly or learned from what they say.

Learning uses rules only where rules are reliable ("my name is…", "call me…", "keep it short", "I'm
vegetarian"); anything vaguer is left for the user to set with `/persona set key=value`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Text
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel

from memory.errors import InvalidInput
from memory.text import one_line

VERBOSITY = ("short", "normal", "detailed")
MAX_FIELD_CHARS = 200
MAX_LIST_ITEMS = 20


@dataclass
class Persona:
    """The profile that conditions every reply; empty fields are simply left out of the prompt."""

    name: str = ""
    address_as: str = ""
    language: str = ""
    tone: str = ""
    verbosity: str = ""
    interests: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def updated(self, changes: dict[str, Any]) -> Persona:
        """A copy with `changes` applied after validation; lists replace, "" or [] clears a field."""
        data = self.to_json()
        for key, value in changes.items():
            data[key] = validate_field(key, value)
        return Persona(**data)

    def remember(self, key: str, item: str) -> bool:
        """Add `item` to a list field unless already there (case-insensitive); True when added."""
        items: list[str] = getattr(self, key)
        if item.lower() in (existing.lower() for existing in items) or len(items) >= MAX_LIST_ITEMS:
            return False
        items.append(item)
        return True


def validate_field(key: str, value: Any) -> Any:
    """The value fit to store in `key`, or InvalidInput saying what is wrong."""
    if key not in Persona.keys():
        raise InvalidInput(f"unknown persona field {key!r}; known: {', '.join(Persona.keys())}")
    if key in ("interests", "facts"):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(";")]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"persona field {key!r} takes a list of strings")
        value = [clean(v) for v in value if v.strip()]
        if len(value) > MAX_LIST_ITEMS:
            raise InvalidInput(f"persona field {key!r} holds at most {MAX_LIST_ITEMS} items")
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"persona field {key!r} takes a string")
    value = clean(value)
    if key == "verbosity" and value and value.lower() not in VERBOSITY:
        raise InvalidInput(f"verbosity is one of {', '.join(VERBOSITY)}")
    return value.lower() if key == "verbosity" else value


def clean(value: str) -> str:
    value = one_line(value).strip()
    if len(value) > MAX_FIELD_CHARS:
        raise InvalidInput(f"a persona value is at most {MAX_FIELD_CHARS} characters")
    return value


# -- learning from what the user says -------------------------------------------------------------

NAME = r"([A-Z][a-zA-Z'\-]{1,30}(?: [A-Z][a-zA-Z'\-]{1,30})?)"
GREETING = (r"hi|hello|hey|hiya|howdy|greetings|good (?:morning|afternoon|evening)|bonjour|salut|hola|ciao|servus|hallo|"
            r"merhaba|namaste|ola|olá|hej|moin")
NOT_NAMES = {"Anyone", "Everyone", "Nobody", "Somebody", "Someone", "Who", "I", "I'm", "It", "It's", "That's", "This", "There", "We", "They", "You", "He", "She", "What", "Where", "Not", "Sure", "Fine", "Good", "Here", "Back", "Sorry", "Just", "Very", "So", "Glad", "Happy", "Also"}
RULES: list[tuple[str, re.Pattern[str]]] = [
    ("name", re.compile(r"\b(?i:my name is|my name's|i am called|i'm called|name's)\s+" + NAME)),
    ("name", re.compile(r"(?:^|[.!?]\s+)(?i:" + GREETING + r")(?i: there)?[,!.]?\s+(?i:i am|i'm|this is)\s+" + NAME + r"\b")),
    ("name", re.compile(r"^(?:(?i:" + GREETING + r")[,!.]?\s+)?" + NAME + r" here\b")),
    ("address_as", re.compile(r"\b(?i:call me)\s+" + NAME)),
    ("language", re.compile(r"\b(?:speak|answer|reply|talk to me|write)(?: to me)? in (English|German|French|Spanish|"
                            r"Portuguese|Italian|Dutch|Polish|Ukrainian|Russian|Turkish|Swedish|Danish|Norwegian|Finnish)\b", re.I)),
]
SHORT = re.compile(r"\b(keep it (short|brief)|be (brief|concise)|shorter (answers|replies)|short answers|less verbose|"
                   r"too long)\b", re.I)
DETAILED = re.compile(r"\b(more detail(ed)?|in detail|longer (answers|replies)|be more thorough|explain more)\b", re.I)
TONE = re.compile(r"\b(?:be|sound|stay|keep it) (more )?(formal|casual|friendly|playful|professional|warm|direct)\b", re.I)
# Where a fact's words end: a sentence mark, or a conjunction that starts a clause of its own ("I work as a nurse
# and I have a dog called Pico": the job is "nurse", not "nurse and I have a dog called Pico").
CLAUSE_END = r"(?=[.!,;?]|$|\s+(?:and|but|so|because)\s+(?:i|i'm|i've|i'd|my|we|we're)\b)"
FACTS = [
    re.compile(r"\bI(?: am|'m) (?:a )?(vegetarian|vegan|pescatarian|diabetic|lactose[- ]intolerant|gluten[- ]free)\b", re.I),
    re.compile(r"\bI(?: am|'m) allergic to ([a-z][a-z ,\-]{2,40}?)" + CLAUSE_END, re.I),
    re.compile(r"\bI live in ([A-Z][\w\-]+(?: [A-Z][\w\-]+)?)"),
    re.compile(r"\bI(?: am|'m) from ([A-Z][\w\-]+(?: [A-Z][\w\-]+)?)"),
    re.compile(r"\bI work as (?:an? )?([a-z][a-z \-]{2,40}?)(?= at | in |" + CLAUSE_END[3:], re.I),
]
FACT_LABELS = ["diet: {}", "allergic to {}", "lives in {}", "from {}", "works as {}"]
INTERESTS = re.compile(r"\bI (?:really )?(?:love|enjoy|like|am into|'m into) ([a-z][a-z \-]{2,60}?)" + CLAUSE_END, re.I)


def learn(persona: Persona, text: str) -> list[str]:
    """Update `persona` in place from one user message; returns the fields that changed."""
    changed: list[str] = []
    for key, pattern in RULES:
        match = pattern.search(text)
        if match:
            value = match.group(1).strip()
            if key in ("name", "address_as") and value.split()[0] in NOT_NAMES:
                continue
            if key == "language":
                value = value.capitalize()
            if getattr(persona, key) != value:
                setattr(persona, key, value)
                changed.append(key)
    if persona.name and not persona.address_as and "name" in changed:
        persona.address_as = persona.name.split()[0]
        changed.append("address_as")
    verbosity = "short" if SHORT.search(text) else "detailed" if DETAILED.search(text) else None
    if verbosity and persona.verbosity != verbosity:
        persona.verbosity = verbosity
        changed.append("verbosity")
    tone = TONE.search(text)
    if tone and persona.tone != tone.group(2).lower():
        persona.tone = tone.group(2).lower()
        changed.append("tone")
    for pattern, label in zip(FACTS, FACT_LABELS):
        match = pattern.search(text)
        if match and persona.remember("facts", label.format(match.group(1).strip().rstrip(","))):
            changed.append("facts")
    for match in INTERESTS.finditer(text):
        for interest in re.split(r",| and ", match.group(1)):
            interest = interest.strip().lower()
            if len(interest) > 2 and not interest.startswith(("to ", "it", "that", "this", "you")) \
                    and persona.remember("interests", interest):
                changed.append("interests")
    return sorted(set(changed))


# -- storage -------------------------------------------------------------------------------------


class PersonaRow(SQLModel, table=True):
    __tablename__ = "personas"
    user_id: str = Field(primary_key=True, max_length=128)
    data: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class PersonaStore:
    """Profiles in the transcript database (its migrations create the table); every call names its user."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, user_id: str, *, session: Session | None = None) -> Persona:
        if session is None:
            with Session(self.engine) as session:
                return self.get(user_id, session=session)
        row = session.get(PersonaRow, user_id)
        if row is None:
            return Persona()
        data = json.loads(row.data)
        return Persona(**{k: v for k, v in data.items() if k in Persona.keys()})

    def put(self, user_id: str, persona: Persona, *, session: Session | None = None) -> Persona:
        """Store the profile: one upsert, so first writes at once never collide on the key. Given a `session`, in
        its transaction (committed with it)."""
        values = {"user_id": user_id, "data": json.dumps(persona.to_json(), ensure_ascii=False),
                  "updated_at": datetime.now(UTC)}
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        statement = insert(PersonaRow).values(**values)
        statement = statement.on_conflict_do_update(index_elements=["user_id"], set_={
            "data": statement.excluded.data, "updated_at": statement.excluded.updated_at})
        if session is not None:
            session.execute(statement)
            return persona
        with Session(self.engine) as session:
            session.execute(statement)
            session.commit()
        return persona

    def update(self, user_id: str, changes: dict[str, Any]) -> Persona:
        """Apply validated `changes` (a partial profile) and store the result."""
        if not isinstance(changes, dict):
            raise InvalidInput("a persona is a JSON object of fields")
        return self.put(user_id, self.get(user_id).updated(changes))

    def learn(self, user_id: str, text: str, *, session: Session | None = None) -> list[str]:
        """Learn from one message; stores only when something changed. Given a `session` (the transaction that
        records the message's answered turn), in it: learned once, with the turn, or not at all."""
        persona = self.get(user_id, session=session)
        changed = learn(persona, text)
        if changed:
            self.put(user_id, persona, session=session)
        return changed

    def delete(self, user_id: str) -> int:
        with Session(self.engine) as session:
            row = session.get(PersonaRow, user_id)
            if row is None:
                return 0
            session.delete(row)
            session.commit()
        return 1


# -- questions about the profile itself --------------------------------------------------------------

ASKS_NAME = re.compile(r"^\s*(?:(?:and |so |hey,? )?(?:what(?:'s| is) my name|do you (?:know|remember) my name|"
                       r"who am i|what do you call me|what should you call me))\W*$", re.I)
ASKS_HOME = re.compile(r"^\s*(?:(?:and |so )?(?:where do i live|do you (?:know|remember) where i live|"
                       r"where am i from))\W*$", re.I)


def answer_from_profile(persona: Persona, text: str) -> str | None:
    """A reply from the profile for a plain question about it ("What is my name?"), or None.

    A small model confuses whose name is whose; the profile is the source of truth, like a FAQ entry.
    """
    if ASKS_NAME.match(text):
        if persona.name or persona.address_as:
            called = persona.address_as or persona.name
            if persona.name and called != persona.name:
                return f"Your name is {persona.name}, and you asked me to call you {called}."
            return f"Your name is {called}."
        return "You haven't told me your name yet. What should I call you?"
    if ASKS_HOME.match(text):
        for fact in persona.facts:
            if fact.startswith(("lives in ", "from ")):
                return f"You told me you {'live in' if fact.startswith('lives') else 'are from'} {fact.split(' ', 2)[-1]}."
        return "You haven't told me where you live yet."
    return None
