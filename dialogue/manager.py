"""The turn pipeline: gate → recall → prompt → generate → record. Channels call `DialogueManager.respond`.

The gate is the one place that decides whether the bot speaks at all: a conversation a person has taken
over gets no bot reply, "let me talk to a human" hands it over, and a reply that says `handoff` (the FAQ
does not cover the question) hands it over once it is recorded. Every channel passes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dialogue.model.backend import Backend
from dialogue.errors import GenerationError, InvalidInput
from dialogue.guarded import GuardedGeneration, GuardInputs, history_messages, statements
from dialogue.handoff import HandoffDesk, wants_human
from dialogue.prompt import PromptParts, build_prompt, context_message, fit_history, system_message
from dialogue.model.worker import AdapterRef, Generation, GenerationParams
from dialogue.settings import Settings
from dialogue.store import Turn, TranscriptStore, new_id, utcnow
from memory.text import clean_text, validate_id

logger = logging.getLogger(__name__)

CHAT_MARKUP_TOKENS = 20  # per-message role markers (up to two system messages) and the assistant header, with margin


@dataclass(frozen=True)
class Source:
    kind: str  # "faq" | "memory"
    id: str
    score: float


@dataclass
class Context:
    """What recall found for a turn; a fixed `answer` skips the model (a verbatim FAQ answer, a refusal)."""

    persona: dict[str, Any] = field(default_factory=dict)
    memories: list[dict[str, Any]] = field(default_factory=list)
    faq: list[dict[str, Any]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    answer: str | None = None
    handoff: bool = False
    max_new_tokens: int | None = None
    # Given the whole generated reply, a safer (text, handoff) to show instead, or None to keep it. When
    # set, the reply is generated in full and checked before anything is shown: grounding beats streaming.
    check: Callable[[str], tuple[str, bool] | None] | None = None


Recall = Callable[[str, str], Awaitable[Context]]  # (user_id, text) -> Context
AfterTurn = Callable[[Turn], Awaitable[None]]
AdapterChooser = Callable[[str], AdapterRef | None]  # user_id -> adapter version to serve, or base


class Reply:
    """A reply in the making: async-iterate it for text deltas; the turn is on disk when iteration ends."""

    def __init__(self, manager: DialogueManager, turn: Turn, parts: PromptParts, *, context: Context,
                 params: GenerationParams, adapter: AdapterRef | None, notices: list[str],
                 guard: GuardInputs | None = None) -> None:
        self._manager = manager
        self._guard = guard or GuardInputs(user_text=parts.user_text)
        self._turn = turn
        self.parts = parts
        self.sources = context.sources
        self.handoff = context.handoff
        self._answer = context.answer
        self._check = context.check
        self.params = params
        self.adapter = adapter
        self.notices = notices
        self.text = ""
        self.finish_reason: str | None = None
        self.recorded = False
        self._consumed = False

    @property
    def turn_id(self) -> str:
        return self._turn.id

    @property
    def status(self) -> str:
        """"human" when a person has (or is now asked to take) the conversation."""
        return "human" if self.handoff else "bot"

    @property
    def conversation_id(self) -> str:
        return self._turn.conversation_id

    @property
    def adapter_version(self) -> str | None:
        return self.adapter.name if self.adapter else None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self._turn.prompt_tokens, "completion_tokens": self._turn.completion_tokens}

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._consumed:
            raise RuntimeError("a reply can be streamed once")
        self._consumed = True
        started = time.perf_counter()
        pieces: list[str] = []
        generation: Generation | None = None
        guarded: GuardedGeneration | None = None
        try:
            if self._answer is not None:
                pieces.append(self._answer)
                yield self._answer
                self.finish_reason = "stop"
            else:
                for attempt in (1, 2):
                    try:
                        # every generated reply passes the degeneration guard (dialogue/guarded.py)
                        guarded = GuardedGeneration(self._manager.backend, build_prompt(self.parts), self.params,
                                                    self.adapter, self._guard)
                        if self._check is not None:
                            text = await guarded.text()
                            replacement = self._check(text)
                            if replacement is not None:
                                text, self.handoff = replacement
                                self._turn.handoff = self.handoff
                            pieces.append(text)
                            yield text
                            break
                        async for chunk in guarded:
                            pieces.append(chunk)
                            yield chunk
                        break
                    except GenerationError:
                        if pieces or attempt == 2:
                            raise
                        logger.warning("generation failed; retrying once")
                generation, self._turn.guard = guarded.generation, guarded.outcome
                self.finish_reason = guarded.finish_reason
            self.text = "".join(pieces)
            self._fill_turn(generation, started, guarded)
            await asyncio.to_thread(self._manager.store.record_turn, self._turn)
            self.recorded = True
            self._manager.observe(self._turn)
            await self._manager.after_turn(self._turn)
            if self.handoff and self._manager.desk is not None:  # the gate's last word: hand over what we can't answer
                await self._manager.desk.hand_off(conversation_id=self.conversation_id, user_id=self._turn.user_id,
                                                  reason="low_confidence", turn_id=self.turn_id, background=True)
        except (asyncio.CancelledError, GeneratorExit):
            # Stopped by the user mid-reply: what was shown is kept, marked as cut short.
            if pieces and not self.recorded:
                self.text, self.finish_reason = "".join(pieces), "cancelled"
                self._fill_turn(guarded.generation if guarded else generation, started, guarded)
                self._manager.store.record_turn(self._turn)
                self.recorded = True
                self._manager.observe(self._turn)
            raise

    async def complete(self) -> str:
        """Consume the whole reply and return its text."""
        async for _ in self:
            pass
        return self.text

    def _fill_turn(self, generation: Generation | None, started: float, guarded: GuardedGeneration | None = None) -> None:
        turn = self._turn
        turn.reply = self.text
        turn.finish_reason = self.finish_reason or "stop"
        turn.latency_ms = int((time.perf_counter() - started) * 1000)
        turn.finished_at = utcnow()
        if generation is not None:
            turn.prompt_tokens = generation.prompt_tokens
            turn.completion_tokens = guarded.total_completion_tokens if guarded else generation.completion_tokens
            turn.ttft_ms = int(generation.ttft_s * 1000) if generation.ttft_s is not None else None


class HandedOff(Reply):
    """A turn the gate answered without the model, already recorded: a person has, or was just asked to take,
    the conversation. Its text is the handover line, or empty while a person has it."""

    def __init__(self, turn: Turn, notices: list[str]) -> None:
        self._turn = turn
        self.parts = None
        self.sources = []
        self.handoff = True
        self.params = None
        self.adapter = None
        self.notices = notices
        self.text = turn.reply
        self.finish_reason = turn.finish_reason
        self.recorded = True
        self._consumed = False

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": 0, "completion_tokens": 0}

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._consumed:
            raise RuntimeError("a reply can be streamed once")
        self._consumed = True
        if self.text:
            yield self.text


class DialogueManager:
    """Owns a turn: builds the prompt within the token budget, streams the reply, records it."""

    def __init__(self, settings: Settings, backend: Backend, store: TranscriptStore, *, recall: Recall | None = None,
                 after_turn: list[AfterTurn] | None = None, adapter_for: AdapterChooser | None = None,
                 desk: HandoffDesk | None = None) -> None:
        self.settings = settings
        self.desk = desk
        self.backend = backend
        self.store = store
        self.recall = recall
        self.adapter_for = adapter_for
        self.after_turn_hooks: list[AfterTurn] = list(after_turn or [])
        self.observers: list[Callable[[Turn], None]] = []  # told of every recorded reply, e.g. the metrics

    def observe(self, turn: Turn) -> None:
        """Tell the observers of a recorded reply (cut short ones too); a failing observer never loses it."""
        for observer in self.observers:
            try:
                observer(turn)
            except Exception:
                logger.exception("turn observer %s failed", observer)

    def default_params(self) -> GenerationParams:
        s = self.settings
        return GenerationParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                repetition_penalty=s.repetition_penalty)

    async def respond(self, *, user_id: str, conversation_id: str, text: str, channel: str = "api") -> Reply:
        """Prepare the reply to `text`; iterate the returned `Reply` to generate and record it."""
        user_id = validate_id(user_id, "user_id")
        conversation_id = validate_id(conversation_id, "conversation_id")
        # The one length rule, for every channel: a message that is too long is refused whole, never cut.
        text = clean_text(text, "the message", max_chars=self.settings.max_message_chars)
        notices: list[str] = []
        if self.desk is not None and (gated := await self._gate(user_id, conversation_id, text, channel, notices)):
            return gated
        await self.backend.ready()
        await asyncio.to_thread(self.store.ensure_conversation, conversation_id=conversation_id, user_id=user_id,
                                channel=channel)
        context = await self.recall(user_id, text) if self.recall else Context()
        params = self.default_params()
        if context.max_new_tokens:  # the persona's verbosity
            params = replace(params, max_new_tokens=context.max_new_tokens)

        parts = PromptParts(system=self.settings.system_prompt, user_text=text, persona=context.persona,
                            memories=context.memories, faq=context.faq)
        budget = self.settings.context_budget - params.max_new_tokens - CHAT_MARKUP_TOKENS
        budget -= self.backend.count_tokens(system_message(parts)) + self.backend.count_tokens(context_message(parts))
        user_tokens = self.backend.count_tokens(text)
        max_user_tokens = max(budget // 2, 32)
        if user_tokens > max_user_tokens:  # the same rule, where the context budget is the tighter limit
            raise InvalidInput(f"the message is too long to read at once: {user_tokens} tokens, the limit is "
                               f"{max_user_tokens} (about {max_user_tokens * 4} characters); please send it in parts")
        turns = await asyncio.to_thread(self.store.history, conversation_id=conversation_id, user_id=user_id)
        # Without unanswered messages (a handoff) and without replies the guard caught (dialogue/guarded.py).
        history = history_messages(turns)
        parts.history = fit_history(history, budget=budget - user_tokens, count_tokens=self.backend.count_tokens)
        persona = context.persona or {}
        guard = GuardInputs(user_text=parts.user_text, earlier_replies=tuple(t.reply for t in turns if t.reply),
                            memories=tuple(m["text"] for m in context.memories) + tuple(persona.get("facts") or ())
                            + statements(turns),
                            user_name=persona.get("name") or persona.get("address_as") or None)

        adapter = self.adapter_for(user_id) if self.adapter_for else None
        turn = Turn(
            id=new_id(), conversation_id=conversation_id, user_id=user_id, channel=channel, user_text=parts.user_text,
            reply="", prompt=json.dumps(parts.to_dict(), ensure_ascii=False),
            sources=json.dumps([asdict(s) for s in context.sources]), handoff=context.handoff,
            model_id=self.backend.model_id, adapter_version=adapter.name if adapter else None,
        )
        return Reply(self, turn, parts, context=context, params=params, adapter=adapter, notices=notices, guard=guard)

    async def _gate(self, user_id: str, conversation_id: str, text: str, channel: str,
                    notices: list[str]) -> HandedOff | None:
        """A reply without the model when a person has the conversation or is asked for; else None."""
        desk = self.desk
        if await desk.is_handed_off(conversation_id):
            turn = await desk.record_waiting(conversation_id=conversation_id, user_id=user_id, channel=channel, text=text)
            return HandedOff(turn, notices)
        if wants_human(text):
            turn = await desk.answer_request(conversation_id=conversation_id, user_id=user_id, channel=channel, text=text)
            await desk.hand_off(conversation_id=conversation_id, user_id=user_id, reason="customer_request",
                                turn_id=turn.id, background=True)
            return HandedOff(turn, notices)
        return None

    async def after_turn(self, turn: Turn) -> None:
        for hook in self.after_turn_hooks:
            try:
                await hook(turn)
            except Exception:  # a failing side effect (memory write) must not lose the reply
                logger.exception("after-turn hook %s failed", getattr(hook, "__name__", hook))

    async def rate(self, *, turn_id: str, rating: int, user_id: str | None = None, comment: str | None = None,
                   correction: str | None = None) -> bool:
        """Store a rating; True when it handed the conversation to a person (repeated thumbs-down)."""
        await asyncio.to_thread(self.store.rate, turn_id=turn_id, rating=rating, user_id=user_id,
                                comment=comment, correction=correction)
        if self.desk is None:
            return False
        return await self.desk.after_rating(turn_id=turn_id, rating=rating) is not None
