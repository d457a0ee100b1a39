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

from sqlmodel import Session

from dialogue.model.backend import Backend
from dialogue.errors import AlreadyHandled, GenerationError, InvalidInput, Overloaded
from dialogue.guarded import GuardedGeneration, GuardInputs, history_messages, statements, told_again
from dialogue.handoff import BUSY_REPLY, HANDOFF_REPLY, HandoffDesk, wants_human
from dialogue.prompt import PromptParts, build_prompt, context_message, fit_history, system_message
from dialogue.model.worker import AdapterRef, Generation, GenerationParams
from dialogue.settings import Settings
from dialogue.leases import TurnLeases
from dialogue.store import PENDING, Turn, TranscriptStore, new_id, utcnow
from memory.facts import only_tells
from memory.text import clean_text, strip_controls, validate_id

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what an overloaded process asks a client to wait


def interrupted_notice(user_text: str) -> str:
    """What a channel tells a user whose message a dead process left unanswered (`close_abandoned`)."""
    snippet = user_text if len(user_text) <= 80 else user_text[:79] + "…"
    return (f"Sorry, I was interrupted while answering your message “{snippet}”, and that reply was lost. "
            "Please send it again.")
TELLING_REPLY_TOKENS = 48  # the budget of a reply to a message that asks and requests nothing
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
Learn = Callable[[Session, Turn], None]  # in the transaction that records an answered turn (the persona learns)
AdapterChooser = Callable[[str], AdapterRef | None]  # user_id -> adapter version to serve, or base


class Reply:
    """A reply in the making: async-iterate it for text deltas; the turn is on disk when iteration ends."""

    # True: the caller shows each delta as it comes, so a reply stopped midway keeps what was shown; False
    # (`complete()`, a JSON answer): shown whole at the end, so one cut short showed nothing
    streamed = True

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
    def needs_model(self) -> bool:
        """False for a fixed answer (the user's facts told back, the FAQ's words, a handoff notice)."""
        return self._answer is None

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
                            text = strip_controls(await guarded.text())
                            replacement = self._check(text)
                            if replacement is not None:
                                text, self.handoff = replacement
                                self._turn.handoff = self.handoff
                            pieces.append(text)
                            yield text
                            break
                        async for chunk in guarded:
                            # a model can write any byte; a NUL fails PostgreSQL's text columns (a 500, the
                            # reply lost) and no control character is meant for the user
                            chunk = strip_controls(chunk)
                            if chunk:
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
            # The message's row (pending since it came in) gets its reply; not when the user was erased meanwhile.
            self.recorded = await asyncio.to_thread(self._manager.finish, self._turn)
            if not self.recorded:
                return
            await self._manager.after_turn(self._turn)
            if self.handoff and self._manager.desk is not None:  # the gate's last word: hand over what we can't answer
                await self._manager.desk.hand_off(conversation_id=self.conversation_id, user_id=self._turn.user_id,
                                                  reason="low_confidence", turn_id=self.turn_id, background=True)
        except (asyncio.CancelledError, GeneratorExit):
            # Stopped mid-reply: what was streamed is kept, marked as cut short; nothing streamed, interrupted.
            if not self.recorded:
                self.text = "".join(pieces) if self.streamed else ""
                self.finish_reason = "cancelled" if self.text else "interrupted"
                self._fill_turn(guarded.generation if guarded else generation, started, guarded)
                self.recorded = self._manager.finish(self._turn)
            raise
        except Exception:
            if not self.recorded:  # the message stays on record, honestly unanswered
                self.text, self.finish_reason = "", "error"
                self._fill_turn(guarded.generation if guarded else generation, started, guarded)
                self._manager.finish(self._turn)
            raise

    def discard(self) -> None:
        """Give up a reply that was never iterated (the channel failed first): its turn is closed as interrupted,
        not left pending for the life of the process."""
        if self._consumed or self.recorded:
            return
        self._consumed = True
        self.finish_reason = self._turn.finish_reason = "interrupted"
        self._turn.finished_at = utcnow()
        self._manager.finish(self._turn)

    async def complete(self) -> str:
        """Consume the whole reply and return its text (shown only now: cut short, nothing of it was shown)."""
        self.streamed = False
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
                 after_turn: list[AfterTurn] | None = None, learn: Learn | None = None,
                 adapter_for: AdapterChooser | None = None, desk: HandoffDesk | None = None) -> None:
        self.settings = settings
        self.desk = desk
        self.backend = backend
        self.store = store
        self.recall = recall
        self.adapter_for = adapter_for
        self.after_turn_hooks: list[AfterTurn] = list(after_turn or [])
        self.learn = learn
        # Pending turns this process is writing; their leases are renewed while it lives (dialogue/leases.py).
        self.leases = TurnLeases(store, settings.turn_lease_s)
        self.observers: list[Callable[[Turn], None]] = []  # told of every recorded reply, e.g. the metrics
        self._beyond_cap: set[str] = set()  # pending turns taken beyond `max_queue`: the gate hands them to a person

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

    async def receive(self, *, user_id: str, conversation_id: str, text: str, channel: str = "api",
                      event_id: str | None = None, turn_id: str | None = None, again: bool = False,
                      refuse_when_busy: bool = True) -> Turn:
        """Put the user's message on disk as a pending turn, before anything else happens to it.

        `event_id` (the channel's id of the delivery: a Telegram update, a Chatwoot message) is claimed in the
        same transaction, so a redelivery raises `AlreadyHandled`; a message refused here claims it too. `again`:
        another try of the message whose turn is `turn_id`, whose earlier tries died unanswered; that turn is
        reopened (or recorded afresh when its row is gone), so all tries are one turn, answered at most once; a
        try that finds it taken up by another raises `AlreadyHandled`. Beyond `max_queue` turns in flight a
        message is refused (`Overloaded`), unless `refuse_when_busy` is False and there is a desk: then it is
        taken, and the gate hands it to a person without the model."""
        event = (channel, event_id) if event_id is not None else None
        busy = len(self.leases.held())
        beyond_cap = busy >= self.settings.max_queue
        if beyond_cap and (refuse_when_busy or self.desk is None):  # refused before anything is taken: a clean retry
            raise Overloaded(f"busy: {busy} replies under way; please try again in a few seconds",
                             retry_after=RETRY_AFTER_S)
        try:
            user_id = validate_id(user_id, "user_id")
            conversation_id = validate_id(conversation_id, "conversation_id")
            # The one length rule, for every channel: a message that is too long is refused whole, never cut.
            text = clean_text(text, "the message", max_chars=self.settings.max_message_chars)
            if await asyncio.to_thread(self.store.being_erased, user_id):
                raise InvalidInput("this user's data is being erased; nothing new is taken until that is done")
            await asyncio.to_thread(self.store.ensure_conversation, conversation_id=conversation_id,
                                    user_id=user_id, channel=channel)
        except InvalidInput:
            await self._claim_refused(event)
            raise
        if again and (reopened := await asyncio.to_thread(self.store.reopen_turn, turn_id)) is not None:
            self.leases.hold(reopened.id)
            return reopened
        turn = Turn(id=turn_id or new_id(), conversation_id=conversation_id, user_id=user_id, channel=channel, user_text=text,
                    reply="", model_id=self.backend.model_id, finish_reason=PENDING)
        self.leases.hold(turn.id)
        try:
            turn = await asyncio.to_thread(self.store.record_turn, turn, event=event)
        except BaseException:
            self.leases.release(turn.id)
            raise
        if beyond_cap:
            self._beyond_cap.add(turn.id)
        return turn

    async def respond(self, *, user_id: str, conversation_id: str, text: str, channel: str = "api",
                      event_id: str | None = None, pending: Turn | None = None, turn_id: str | None = None,
                      again: bool = False) -> Reply:
        """Prepare the reply to `text`; iterate the returned `Reply` to generate and record it.

        The message is recorded first (`receive`, unless the caller did and passes its `pending` turn); if the
        reply cannot be prepared the turn is closed as an error (or "interrupted" when cancelled), never left."""
        turn = pending or await self.receive(user_id=user_id, conversation_id=conversation_id, text=text,
                                             channel=channel, event_id=event_id, turn_id=turn_id, again=again)
        try:
            return await self._prepare(turn)
        except InvalidInput:  # refused whole (too long for the budget): not kept, as if never sent
            self.leases.release(turn.id)
            await asyncio.to_thread(self.store.discard_pending, turn.id)
            raise
        except asyncio.CancelledError:
            if turn.finish_reason == PENDING:
                turn.finish_reason = "interrupted"
                self.finish(turn)
            raise
        except BaseException:
            if turn.finish_reason == PENDING:
                turn.finish_reason = "error"
                await asyncio.to_thread(self.finish, turn)
            raise

    async def _prepare(self, turn: Turn) -> Reply:
        user_id, conversation_id, text = turn.user_id, turn.conversation_id, turn.user_text
        notices: list[str] = []
        if self.desk is not None and (gated := await self._gate(turn, notices)):
            return gated
        await self.backend.can_count()  # not ready(): an answer from the profile or the FAQ needs no weights
        context = await self.recall(user_id, text) if self.recall else Context()
        params = self.default_params()
        if context.max_new_tokens:  # the persona's verbosity
            params = replace(params, max_new_tokens=context.max_new_tokens)
        if only_tells(text):  # "Hi! I'm Marta, I'm a nurse": a short reply; left long, a small model role-plays
            params = replace(params, max_new_tokens=min(params.max_new_tokens, TELLING_REPLY_TOKENS))

        parts = PromptParts(system=self.settings.system_prompt, user_text=text, persona=context.persona,
                            memories=context.memories, faq=context.faq)
        budget = self.settings.context_budget - params.max_new_tokens - CHAT_MARKUP_TOKENS
        system, recalled = system_message(parts), context_message(parts)
        budget -= self.backend.count_tokens(system) + self.backend.count_tokens(recalled)
        user_tokens = self.backend.count_tokens(text)
        max_user_tokens = max(budget // 2, 32)
        if user_tokens > max_user_tokens:  # the same rule, where the context budget is the tighter limit
            raise InvalidInput(f"the message is too long to read at once: {user_tokens} tokens, the limit is "
                               f"{max_user_tokens} (about {max_user_tokens * 4} characters); please send it in parts")
        turns = await asyncio.to_thread(self.store.history, conversation_id=conversation_id, user_id=user_id, limit=21)
        turns = [t for t in turns if t.id != turn.id][-20:]  # this message's own row is pending among them
        # Without unanswered messages (a handoff) and without replies the guard caught (dialogue/guarded.py).
        history = history_messages(turns)
        parts.history = fit_history(history, budget=budget - user_tokens, count_tokens=self.backend.count_tokens)
        persona = context.persona or {}
        guard = GuardInputs(user_text=parts.user_text, earlier_replies=tuple(t.reply for t in turns if t.reply),
                            memories=tuple(m["text"] for m in context.memories) + tuple(persona.get("facts") or ())
                            + statements(turns),
                            user_name=persona.get("name") or persona.get("address_as") or None,
                            given=system + "\n" + recalled)

        told = {s.kind for s in context.sources}
        if context.answer is not None and told and told <= {"persona", "memory"}:  # the user's facts told back
            context.answer = told_again(context.answer, guard.earlier_replies)  # never read as a repeat
        adapter = self.adapter_for(user_id) if self.adapter_for else None
        turn.prompt = json.dumps(parts.to_dict(), ensure_ascii=False)
        turn.sources = json.dumps([asdict(s) for s in context.sources])
        turn.handoff, turn.model_id = context.handoff, self.backend.model_id
        turn.adapter_version = adapter.name if adapter else None
        return Reply(self, turn, parts, context=context, params=params, adapter=adapter, notices=notices, guard=guard)

    def finish(self, turn: Turn) -> bool:
        """Write a pending turn's outcome, let its lease go and tell the observers; False when its row is gone or
        closed. A turn with a reply owes its after-turn work (the memory write), kept in the outbox until done,
        and teaches what it says (`learn`) as it is recorded: once, in order, never for a user erased meanwhile."""
        answered = turn.finish_reason not in ("error", "interrupted", PENDING)
        learn = self.learn if answered else None
        try:
            recorded = self.store.finish_turn(turn, owe_memory=answered and bool(self.after_turn_hooks),
                                              then=(lambda session: learn(session, turn)) if learn else None)
        finally:
            self.leases.release(turn.id)
        if recorded:
            self.observe(turn)
        return recorded

    def close_abandoned(self, *, channels: set[str] | None = None, exclude: set[str] = frozenset(),
                        user_id: str | None = None) -> list[Turn]:
        """Close as interrupted the pending turns of processes that died (their lease ran out), of one user when
        given; the channel then tells each user once (`interrupted_notice`). Live processes' turns are left alone."""
        return self.store.close_abandoned(stale_before=self.leases.stale_before(), channels=channels, exclude=exclude,
                                          user_id=user_id)

    async def _claim_refused(self, event: tuple[str, str] | None) -> None:
        """A refused delivery is handled too (a redelivery is not refused twice)."""
        if event is not None and not await asyncio.to_thread(self.store.claim_event, channel=event[0],
                                                             event_id=event[1]):
            raise AlreadyHandled(f"{event[0]} event {event[1]} was handled before")

    def close(self) -> None:
        self.leases.close()

    async def _gate(self, pending: Turn, notices: list[str]) -> HandedOff | None:
        """A reply without the model when a person has the conversation, is asked for, or is to answer a message
        taken beyond the cap; else None."""
        desk = self.desk
        conversation_id, user_id, text = pending.conversation_id, pending.user_id, pending.user_text
        ids = {"conversation_id": conversation_id, "user_id": user_id, "channel": pending.channel, "text": text}
        beyond_cap = pending.id in self._beyond_cap
        self._beyond_cap.discard(pending.id)
        if await desk.is_handed_off(conversation_id):
            turn = await desk.record_waiting(**ids, pending=pending)
            self.leases.release(pending.id)
            return HandedOff(turn, notices)
        if beyond_cap or wants_human(text):
            reason, line = ("busy", BUSY_REPLY) if beyond_cap else ("customer_request", HANDOFF_REPLY)
            turn = await desk.answer_request(**ids, pending=pending, reply=line)
            self.leases.release(pending.id)
            await desk.hand_off(conversation_id=conversation_id, user_id=user_id, reason=reason,
                                turn_id=turn.id, background=True)
            return HandedOff(turn, notices)
        return None

    async def after_turn(self, turn: Turn) -> bool:
        """Run the after-turn hooks (the memory write); done, the turn leaves the outbox, else it stays owed
        and is retried (`flush_outbox`). True when all succeeded (or the user is being erased: nothing owed)."""
        if await asyncio.to_thread(self.store.being_erased, turn.user_id):  # in flight when the erasure began
            await asyncio.to_thread(self.store.memory_written, turn.id)
            return True
        for hook in self.after_turn_hooks:
            try:
                await hook(turn)
            except Exception as exc:  # a failing side effect (memory write) must not lose the reply
                logger.warning("after-turn hook %s failed for turn %s (retried later): %s",
                               getattr(hook, "__name__", hook), turn.id, exc)
                await asyncio.to_thread(self.store.memory_failed, turn.id, f"{exc.__class__.__name__}: {exc}")
                return False
        await asyncio.to_thread(self.store.memory_written, turn.id)
        return True

    async def flush_outbox(self, *, limit: int = 100) -> dict[str, int]:
        """Retry the owed after-turn work of recorded turns, oldest first; counts of done, failed and dropped
        (the turn is gone: its user was erased)."""
        counts = {"done": 0, "failed": 0, "dropped": 0}
        for row, turn in await asyncio.to_thread(self.store.owed_memory, limit=limit):
            if turn is None:
                await asyncio.to_thread(self.store.memory_written, row.turn_id)
                counts["dropped"] += 1
            elif await self.after_turn(turn):
                counts["done"] += 1
            else:
                counts["failed"] += 1
                break  # the store is likely down: the rest waits for the next round
        return counts

    async def rate(self, *, turn_id: str, rating: int, user_id: str | None = None, comment: str | None = None,
                   correction: str | None = None) -> bool:
        """Store a rating; True when it handed the conversation to a person (repeated thumbs-down)."""
        await asyncio.to_thread(self.store.rate, turn_id=turn_id, rating=rating, user_id=user_id,
                                comment=comment, correction=correction)
        if self.desk is None:
            return False
        return await self.desk.after_rating(turn_id=turn_id, rating=rating) is not None
