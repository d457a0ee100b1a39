"""Human handoff: when the bot steps back, who is told, and what the human agent says afterwards.

A conversation is handed off when the customer asks for a person, when a turn says `handoff` (the FAQ
does not cover the question), or after repeated negative ratings. The status is stored with the
conversation ("human"), so the bot stays silent across restarts until it is resumed ("bot"). Listeners
(the generic webhook, the Chatwoot integration) are told with a `HandoffEvent`.

While a conversation is with a human, each customer message is recorded as a turn with no bot reply
(`finish_reason="handoff"`), and each agent message as a turn with `model_id="human"`,
`finish_reason="agent"` linked by `reply_to` to the customer turn it answers and carrying that turn's
prompt: the learning loop trains on exactly what the model would have seen, answered by a person.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field

from dialogue.errors import NotFound
from dialogue.store import PENDING, TranscriptStore, Turn, new_id, utcnow
from memory.text import clean_text

logger = logging.getLogger(__name__)

HUMAN_REQUEST = re.compile(
    r"\b(human|real person|live (agent|person|chat)|operator|representative|"
    r"(talk|speak|chat|connect me) (to|with) (a |an |the |your )?(agent|person|someone|somebody|staff|manager|support)|"
    r"customer (service|support) (agent|rep))\b",
    re.IGNORECASE,
)
HANDOFF_REPLY = "I'm handing this conversation to a colleague, who will reply here shortly."
BUSY_REPLY = "Sorry, I'm very busy right now, so I've passed your message to a colleague, who will reply here shortly."
SUMMARY_TURNS = 6
SUMMARY_CHARS = 240


@dataclass
class HandoffEvent:
    """What listeners receive; `to_json()` is the documented webhook payload."""

    conversation_id: str
    user_id: str
    channel: str
    reason: str
    turn_id: str | None
    summary: str
    transcript: list[dict] = field(default_factory=list)  # [{"role": "customer"|"bot"|"agent", "text"}], oldest first
    at: str = ""

    def to_json(self) -> dict:
        return {"event": "conversation.handoff", **asdict(self)}


Listener = Callable[[HandoffEvent], Awaitable[None]]


def wants_human(text: str) -> bool:
    """True when the customer asks for a person ("can I talk to a human?", "agent please")."""
    return bool(HUMAN_REQUEST.search(text)) or text.strip().lower() in ("agent", "agent please", "human please")


def transcript_of(turns: list[Turn]) -> list[dict]:
    lines = []
    for turn in turns:
        lines.append({"role": "customer", "text": turn.user_text[:SUMMARY_CHARS]})
        if turn.reply:
            lines.append({"role": "agent" if turn.model_id == "human" else "bot", "text": turn.reply[:SUMMARY_CHARS]})
    return lines


def summarise(reason: str, transcript: list[dict]) -> str:
    """A short note for the human agent: why, and the last few messages (extractive: no model involved)."""
    why = {
        "customer_request": "the customer asked for a person",
        "low_confidence": "the FAQ does not cover the customer's question",
        "negative_ratings": "the customer rated several replies as unhelpful",
        "no_answer": "the bot could not produce an answer",
        "busy": "the bot was answering as many messages as it takes at once (RAPPORT_MAX_QUEUE)",
        "manual": "a handoff was requested",
    }.get(reason, reason)
    lines = [f"Rapport handed this conversation over: {why}."]
    if transcript:
        lines.append("Last messages:")
        lines += [f"- {m['role']}: {m['text']}" for m in transcript[-SUMMARY_TURNS:]]
    return "\n".join(lines)


def follow_on_prompt(last: Turn | None, system: str, text: str) -> str:
    """The prompt parts the model would have seen for `text` after `last` (its history plus that exchange)."""
    parts = json.loads(last.prompt) if last is not None and last.prompt else {"system": system, "history": []}
    history = list(parts.get("history") or [])
    if last is not None:
        history += [{"role": "user", "content": last.user_text}, {"role": "assistant", "content": last.reply}]
    return json.dumps({**parts, "user_text": text, "history": history[-40:]}, ensure_ascii=False)


class HandoffDesk:
    """Performs handoffs and records what happens while a person has the conversation."""

    def __init__(self, store: TranscriptStore, *, system_prompt: str = "", after_negative: int = 2,
                 listeners: Iterable[Listener] = ()) -> None:
        self.store = store
        self.system_prompt = system_prompt
        self.after_negative = after_negative
        self.listeners: tuple[Listener, ...] = tuple(listeners)  # told of each handoff (webhook, Chatwoot, …)
        self.counts: Counter[str] = Counter()  # handoffs by reason since start (the API's /metrics reads it)
        self._tasks: set[asyncio.Task] = set()

    # -- state -----------------------------------------------------------------------------------

    async def is_handed_off(self, conversation_id: str) -> bool:
        conversation = await asyncio.to_thread(self.store.get_conversation, conversation_id)
        return conversation is not None and conversation.status == "human"

    async def hand_off(self, *, conversation_id: str, user_id: str, reason: str, turn_id: str | None = None,
                       background: bool = False) -> HandoffEvent:
        """Store the handoff at once, then tell every listener (awaited, or in the background)."""
        await asyncio.to_thread(self.store.set_status, conversation_id=conversation_id, status="human")
        conversation = await asyncio.to_thread(self.store.get_conversation, conversation_id)
        turns = await asyncio.to_thread(self.store.history, conversation_id=conversation_id, user_id=user_id,
                                        limit=SUMMARY_TURNS)
        transcript = transcript_of(turns)
        event = HandoffEvent(conversation_id=conversation_id, user_id=user_id, channel=conversation.channel,
                             reason=reason, turn_id=turn_id, summary=summarise(reason, transcript),
                             transcript=transcript, at=utcnow().isoformat())
        logger.info("conversation %s handed off (%s)", conversation_id, reason)
        self.counts[reason] += 1
        if background:
            task = asyncio.create_task(self._notify(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            await self._notify(event)
        return event

    async def resume(self, conversation_id: str) -> None:
        """Give the conversation back to the bot."""
        await asyncio.to_thread(self.store.set_status, conversation_id=conversation_id, status="bot")
        logger.info("conversation %s resumed by the bot", conversation_id)

    async def _notify(self, event: HandoffEvent) -> None:
        for listener in self.listeners:
            try:
                await listener(event)
            except Exception:  # one platform being down must not stop the others hearing of it
                logger.exception("handoff listener %s failed", getattr(listener, "__name__", listener))

    async def drain(self) -> None:
        """Wait for background notifications (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- what happens around a handoff -------------------------------------------------------------

    async def answer_request(self, *, conversation_id: str, user_id: str, channel: str, text: str,
                             pending: Turn | None = None, reply: str = HANDOFF_REPLY) -> Turn:
        """A person is to answer (the customer asked for one, or the bot is too busy): record the bot's short
        handover line as a turn (over `pending`, the message's row written when it came in, when there is one)."""
        turn = await self._record(conversation_id, user_id, channel, text, reply=reply, model_id="rule",
                                  finish_reason="stop", handoff=True, pending=pending)
        return turn

    async def record_waiting(self, *, conversation_id: str, user_id: str, channel: str, text: str,
                             pending: Turn | None = None) -> Turn:
        """A customer message while a person has the conversation: kept, not answered by the bot."""
        return await self._record(conversation_id, user_id, channel, text, reply="", model_id="",
                                  finish_reason="handoff", handoff=True, pending=pending)

    async def record_agent_reply(self, *, conversation_id: str, text: str, trusted: bool = True) -> Turn:
        """A human agent's message, linked to the latest customer turn it answers (the training gold).

        `trusted` False (sent by a key that is not admin) records it as `finish_reason="agent_untrusted"`: part of
        the history, never a training example."""
        text = clean_text(text, "the message")
        conversation = await asyncio.to_thread(self.store.get_conversation, conversation_id)
        if conversation is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        turns = await asyncio.to_thread(self.store.history, conversation_id=conversation_id,
                                        user_id=conversation.user_id, limit=20)
        answered = next((t for t in reversed(turns) if t.model_id != "human"), None)
        turn = Turn(id=new_id(), conversation_id=conversation_id, user_id=conversation.user_id,
                    channel=conversation.channel, user_text=answered.user_text if answered else "",
                    reply=text, prompt=answered.prompt if answered else follow_on_prompt(None, self.system_prompt, ""),
                    model_id="human", finish_reason="agent" if trusted else "agent_untrusted",
                    reply_to=answered.id if answered else None, handoff=True)
        return await asyncio.to_thread(self.store.record_turn, turn)

    async def after_rating(self, *, turn_id: str, rating: int) -> HandoffEvent | None:
        """Hand off after `after_negative` -1 ratings in a row in one conversation."""
        if rating != -1:
            return None
        turn = await asyncio.to_thread(self.store.get_turn, turn_id)
        if turn is None or await self.is_handed_off(turn.conversation_id):
            return None
        recent = await asyncio.to_thread(self.store.recent_ratings, turn.conversation_id)
        if len(recent) >= self.after_negative and all(r == -1 for r in recent[: self.after_negative]):
            return await self.hand_off(conversation_id=turn.conversation_id, user_id=turn.user_id,
                                       reason="negative_ratings", turn_id=turn_id, background=True)
        return None

    async def _record(self, conversation_id: str, user_id: str, channel: str, text: str, *, reply: str,
                      model_id: str, finish_reason: str, handoff: bool, pending: Turn | None = None) -> Turn:
        text = clean_text(text, "the message")
        await asyncio.to_thread(self.store.ensure_conversation, conversation_id=conversation_id, user_id=user_id,
                                channel=channel)
        turns = await asyncio.to_thread(self.store.history, conversation_id=conversation_id, user_id=user_id, limit=5)
        last = next((t for t in reversed(turns) if t.finish_reason not in (PENDING, "interrupted", "error")), None)
        prompt = follow_on_prompt(last, self.system_prompt, text)
        if pending is not None:  # the message is on disk already: its row gets the outcome
            pending.reply, pending.prompt, pending.model_id = reply, prompt, model_id
            pending.finish_reason, pending.handoff, pending.finished_at = finish_reason, handoff, utcnow()
            await asyncio.to_thread(self.store.finish_turn, pending)
            return pending
        turn = Turn(id=new_id(), conversation_id=conversation_id, user_id=user_id, channel=channel, user_text=text,
                    reply=reply, prompt=prompt, model_id=model_id, finish_reason=finish_reason, handoff=handoff)
        return await asyncio.to_thread(self.store.record_turn, turn)
