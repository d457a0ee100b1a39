"""Recall for one turn: the user's persona, their memories and the FAQ's verdict, as a `Context`.

The user id reaches the memory store only through `MemoryStore.for_user`, once, here; nothing else in a
turn can name another user's memories.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlmodel import Session

from dialogue.manager import Context, Source
from dialogue.settings import Settings
from dialogue.store import Turn
from memory.persona import Persona, PersonaStore, answer_from_profile
from memory.persona import learn as learn_rules
from memory.personal import answer_about_user, question_parts

if TYPE_CHECKING:
    from memory.faq import FaqIndex
    from memory.memories import MemoryStore

logger = logging.getLogger(__name__)

VERBOSITY_TOKENS = {"short": 0.35, "normal": 1.0, "detailed": 2.0}  # × max_new_tokens
MEMORY_BUDGET_TOKENS = 320  # of the prompt, for what the user told us before
GROUNDING_ENTRIES = 3
PART_HITS = 2  # memories recalled for each part of a compound question about the user, besides the whole's


@dataclass
class TurnRecall:
    """The dialogue manager's `recall` hook, what a recorded turn teaches the persona (`learn`) and the after-turn
    memory write, bound to one process's stores.

    The Chroma-backed stores are handed in as functions that open them, called on first use: a command
    that never talks never opens Chroma.
    """

    settings: Settings
    personas: PersonaStore
    memory: Callable[[], MemoryStore]
    faq: Callable[[], FaqIndex]
    count_tokens: Callable[[str], int]
    owed: Callable[[str], bool]  # turn id -> whether its memory write is still owed (`TranscriptStore.owes_memory`)

    async def __call__(self, user_id: str, text: str) -> Context:
        persona, memories, decision = await asyncio.gather(
            asyncio.to_thread(self._persona, user_id, text),
            asyncio.to_thread(self._memories, user_id, text),
            asyncio.to_thread(self._faq, text),
        )
        context = Context(persona=persona.to_json())
        if persona.verbosity in VERBOSITY_TOKENS and persona.verbosity != "normal":
            context.max_new_tokens = max(24, int(self.settings.max_new_tokens * VERBOSITY_TOKENS[persona.verbosity]))
        context.memories = [{"id": m.id, "text": m.text, "timestamp": m.timestamp} for m in memories]
        context.sources = [Source("memory", m.id, round(m.score, 4)) for m in memories]
        # "What's my name and where do I live?": the profile and memories, not the model (memory/personal.py)
        about = answer_about_user(persona, memories, text)
        if about is not None:
            context.answer, found = about
            used = [Source(f.kind, f.id, 1.0) for f in found if f.kind == "persona"]
            first = {f.id for f in found if f.kind == "memory"}
            context.sources = used + sorted(context.sources, key=lambda s: s.id not in first)
        else:
            context.answer = answer_from_profile(persona, text)
        if decision is not None and context.answer is None:
            self._apply_faq(context, decision)
        return context

    def _persona(self, user_id: str, text: str) -> Persona:
        persona = self.personas.get(user_id)
        learn_rules(persona, text)  # what the user just said counts for this very reply; stored with the turn (`learn`)
        return persona

    def learn(self, session: Session, turn: Turn) -> None:
        """In the transaction that records an answered turn: the persona learns from what the user said."""
        self.personas.learn(turn.user_id, turn.user_text, session=session)

    def _memories(self, user_id: str, text: str) -> list:
        memory = self.memory().for_user(user_id)
        hits = memory.recall(text)
        parts = question_parts(text)
        if parts and len(parts) > 1:  # "what's my son's name and what do I do?": each part finds its own statement
            seen = {hit.id for hit in hits}
            for part in parts:
                for hit in memory.recall(part, k=PART_HITS):
                    if hit.id not in seen:
                        seen.add(hit.id)
                        hits.append(hit)
        kept, used = [], 0
        for hit in hits:  # best first: keep what fits the budget
            cost = self.count_tokens(hit.text) + 4
            if used + cost > MEMORY_BUDGET_TOKENS:
                continue
            kept.append(hit)
            used += cost
        return kept

    def _faq(self, text: str):
        """The FAQ's verdict: the customer-service scope (`classify`) when the bot serves a business, else the
        personal assistant's policy (`decide`: only what the FAQ covers is answered from it)."""
        return self.faq().verdict(text, self.settings.scope)

    def _apply_faq(self, context: Context, decision) -> None:
        from memory.faq import checked_reply, grounded_reply

        if decision.level == "none":
            return
        if decision.level in ("smalltalk", "outside"):  # a fixed reply, no model: nothing outside the FAQ is made up
            context.answer = grounded_reply(decision)
            return
        hits = decision.hits[:GROUNDING_ENTRIES] if decision.level == "ground" else decision.hits[:1]
        context.sources = [Source("faq", h.id, round(h.score, 4)) for h in hits] + context.sources
        context.faq = [{"id": h.id, "question": h.question, "answer": h.answer} for h in hits]
        if decision.level in ("answer", "unknown"):
            context.answer = grounded_reply(decision)
            context.handoff = decision.level == "unknown"
            if context.handoff:
                context.faq, context.sources = [], [s for s in context.sources if s.kind != "faq"]
            return

        def check(reply: str) -> tuple[str, bool] | None:
            safe, invented = checked_reply(replace(decision, hits=hits), reply)  # the entries the model saw
            if not invented:
                return None
            # A number, price, date or phone found in no entry: the top entry may be the wrong one, so
            # say plainly that we do not know and offer a human.
            logger.info("grounded reply invented %s; falling back", invented)
            return safe, True

        context.check = check

    async def remember(self, turn: Turn) -> None:
        """After a turn: what the user said becomes evidence in their memory (the reply is context only)."""
        if turn.model_id == "human":  # an agent's words are not the user's
            return
        when = turn.created_at if turn.created_at.tzinfo else turn.created_at.replace(tzinfo=UTC)
        # asked again under the lock an erasure drops the memories under: a turn whose user's erasure began after
        # the manager's check (`after_turn`) writes nothing
        await asyncio.to_thread(self.memory().for_user(turn.user_id).remember_turn, turn_id=turn.id,
                                user_text=turn.user_text, reply=turn.reply, timestamp=when or datetime.now(UTC),
                                wanted=lambda: self.owed(turn.id))
