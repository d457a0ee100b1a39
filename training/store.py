"""The learning loop's reads of the transcript tables, in one store class: the SQL of datasets, reports and export.

The tables are the dialogue core's (`dialogue/store.py`); what training asks of them lives here, in its own room,
so that the core's store holds only what a turn needs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, func
from sqlmodel import select

from dialogue.store import Conversation, Rating, TranscriptStore, Turn, utcnow
from memory.errors import InvalidInput

SKIPPED_FINISH = ("cancelled", "error", "handoff", "pending", "interrupted")  # cut short, failed, or no bot reply
# An admin's decisions on what a rating teaches: a rating counts unless kept out; a correction once approved.
DECISIONS = {"rating": ("keep_out", "undo"), "correction": ("approve", "keep_out", "undo")}


class TrainingStore:
    """Queries over a `TranscriptStore`'s tables for the learning loop (and its one write: an admin's review)."""

    def __init__(self, transcripts: TranscriptStore) -> None:
        self.transcripts = transcripts

    def rated_turns(self) -> list[tuple[Turn, Rating | None]]:
        """Every turn that can teach something: rated turns and human agents' replies, oldest first."""
        with self.transcripts.session() as session:
            rows = session.exec(
                select(Turn, Rating).join(Rating, Rating.turn_id == Turn.id, isouter=True)
                .where((Rating.turn_id.is_not(None)) | (Turn.model_id == "human"))
                .order_by(Turn.created_at, Turn.seq)
            ).all()
        return [(turn, rating) for turn, rating in rows]

    def review(self, turn_id: str, part: str, decision: str) -> bool:
        """An admin's decision on the training data: a correction approved, a rating or correction kept out, or
        either undone (an approval withdrawn, a kept-out one back to where it was). False when the turn has no
        such rating or correction."""
        if decision not in DECISIONS.get(part, ()):
            raise InvalidInput(f"no such decision on a {part}: {decision}")
        with self.transcripts.session() as session:
            rating = session.get(Rating, turn_id)
            if rating is None or (part == "correction" and not (rating.correction or "").strip()):
                return False
            if part == "rating":
                rating.kept_out = decision == "keep_out"
            else:
                rating.correction_trusted = decision == "approve"
                rating.correction_kept_out = decision == "keep_out"
            rating.reviewed_at = utcnow()
            session.add(rating)
            session.commit()
            return True

    def approve_correction(self, turn_id: str) -> bool:
        """Trust the correction on this turn for training (an admin's decision); False when it has none."""
        return self.review(turn_id, "correction", "approve")

    def rating_counts(self) -> list[tuple[str | None, int, int, int]]:
        """Per adapter name of live bot turns: (adapter or None for the base model, turns, rated, rated up)."""
        with self.transcripts.session() as session:
            rows = session.exec(
                select(Turn.adapter_version, func.count(Turn.id), func.count(Rating.turn_id),
                       func.coalesce(func.sum(case((Rating.rating == 1, 1), else_=0)), 0))
                .join(Rating, Rating.turn_id == Turn.id, isouter=True)
                .where(Turn.model_id != "human", Turn.model_id != "import")
                .group_by(Turn.adapter_version)
            ).all()
        return [(name, int(turns), int(rated), int(up)) for name, turns, rated, up in rows]

    def examples_since(self, since: datetime | None) -> int:
        """How many training examples arrived since `since` (all of them for None), before deduplication and the
        per-user cap: ratings that enter the dataset (on a finished bot reply, not kept out) by when they were given,
        and approved corrections (not kept out) by when they were approved."""
        learned = (Turn.model_id != "human", Turn.finish_reason.notin_(SKIPPED_FINISH), Turn.reply != "")
        ratings = select(func.count()).select_from(Rating).join(Turn, Turn.id == Rating.turn_id).where(
            *learned, Rating.rating.in_((1, -1)), Rating.kept_out.is_(False))
        corrections = select(func.count()).select_from(Rating).join(Turn, Turn.id == Rating.turn_id).where(
            *learned, Rating.correction_trusted.is_(True), Rating.correction_kept_out.is_(False),
            func.coalesce(Rating.correction, "") != "")
        if since is not None:
            ratings = ratings.where(Rating.created_at >= since)
            corrections = corrections.where(func.coalesce(Rating.reviewed_at, Rating.created_at) >= since)
        with self.transcripts.session() as session:
            return int(session.exec(ratings).one()) + int(session.exec(corrections).one())

    def conversations(self) -> list[Conversation]:
        """Every conversation, oldest first."""
        with self.transcripts.session() as session:
            return list(session.exec(select(Conversation).order_by(Conversation.created_at, Conversation.id)).all())

    def conversation_turns(self, conversation_id: str) -> list[tuple[Turn, Rating | None]]:
        """One conversation's turns in order, each with its rating."""
        with self.transcripts.session() as session:
            rows = session.exec(
                select(Turn, Rating).join(Rating, Rating.turn_id == Turn.id, isouter=True)
                .where(Turn.conversation_id == conversation_id).order_by(Turn.seq)
            ).all()
        return [(turn, rating) for turn, rating in rows]
