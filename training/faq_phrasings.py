"""Learning the FAQ from resolved conversations: a customer message that a human agent answered with an FAQ
entry's answer becomes, once an operator approves it, a new phrasing (`alternates`) of that entry.

A candidate is every agent reply (`finish_reason == "agent"`) to a customer message that is not a phrasing of
any entry yet; its suggested entry is the one whose answer the agent's reply is closest to (cosine of the
sentence vectors, `MATCH_FROM` and up), and an operator may map it to another entry when approving. Approving
upserts the entry, which refits the FAQ (memory/faq_fit.py); rejected candidates are remembered in
`$RAPPORT_HOME/faq_candidates_rejected.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from sqlmodel import select

from dialogue.store import Turn, TranscriptStore
from memory.errors import InvalidInput, NotFound
from memory.faq import FaqIndex

MATCH_FROM = 0.75  # agent reply ↔ entry answer cosine for a suggestion
MAX_CANDIDATES = 500


@dataclass(frozen=True)
class PhrasingCandidate:
    """A customer message an agent answered, and the entry it looks like a phrasing of."""

    turn_id: str
    customer_text: str
    agent_reply: str
    entry_id: str | None  # suggested entry, None when no answer is close enough
    score: float

    def to_json(self) -> dict:
        return asdict(self)


def rejected_path(home: Path) -> Path:
    return Path(home) / "faq_candidates_rejected.json"


def read_rejected(home: Path) -> set[str]:
    try:
        return set(json.loads(rejected_path(home).read_text()))
    except FileNotFoundError:
        return set()


def agent_turns(store: TranscriptStore) -> list[Turn]:
    with store.session() as session:
        return list(session.exec(select(Turn).where(Turn.finish_reason == "agent")
                                 .order_by(Turn.created_at.desc()).limit(MAX_CANDIDATES)).all())


def candidates(store: TranscriptStore, faq: FaqIndex, home: Path) -> list[PhrasingCandidate]:
    """Agent-answered customer messages that are not yet a phrasing of any entry, newest first."""
    snap = faq.snapshot()
    known = {p.casefold() for e in snap.entries for p in (e.question, *e.alternates)}
    rejected = read_rejected(home)
    turns = [t for t in agent_turns(store) if t.user_text.strip() and t.user_text.casefold() not in known
             and t.id not in rejected]
    if not turns:
        return []
    answers = snap.raw[snap.kinds == "answer"]  # (E, 384), one answer vector per entry, in entry order
    owners = snap.owner[snap.kinds == "answer"]
    sims = faq.embedder.embed([t.reply for t in turns]) @ answers.T if len(answers) else np.zeros((len(turns), 0))
    out = []
    for turn, row in zip(turns, sims):
        best = int(np.argmax(row)) if len(row) else -1
        score = float(row[best]) if best >= 0 else 0.0
        entry = snap.entries[owners[best]].id if best >= 0 and score >= MATCH_FROM else None
        out.append(PhrasingCandidate(turn.id, turn.user_text, turn.reply, entry, round(score, 4)))
    return out


def approve(store: TranscriptStore, faq: FaqIndex, home: Path, turn_id: str, entry_id: str | None = None) -> dict:
    """Add the customer message of agent turn `turn_id` to an entry's alternates (the suggested one unless
    `entry_id` says which); returns the upsert's counts and the entry id."""
    found = next((c for c in candidates(store, faq, home) if c.turn_id == turn_id), None)
    if found is None:
        raise NotFound(f"no phrasing candidate {turn_id!r} (see `rapport faq candidates`)")
    target = entry_id or found.entry_id
    if target is None:
        raise InvalidInput(f"no entry's answer matches the agent's reply to {turn_id!r}: name one with --entry")
    entry = faq.get(target)
    result = faq.upsert([replace(entry, alternates=[*entry.alternates, found.customer_text])])
    return {"entry_id": target, "alternate": found.customer_text, **result}


def reject(store: TranscriptStore, faq: FaqIndex, home: Path, turn_id: str) -> None:
    if not any(c.turn_id == turn_id for c in candidates(store, faq, home)):
        raise NotFound(f"no phrasing candidate {turn_id!r}")
    path = rejected_path(home)
    path.write_text(json.dumps(sorted(read_rejected(home) | {turn_id})))
