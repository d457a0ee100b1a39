"""Native dialogue routes: a message in, a grounded reply out (JSON or server-sent events), ratings, handoff.

A turn starts with `DialogueManager.respond` (the OpenAI route's too); the handoff gate it passes (silence while
a person has the conversation, "let me talk to a human") is the dialogue core's, the same for every channel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from bot.http.auth import Caller, ChatDep, limit_user
from bot.http.deps import DeskDep, ManagerDep, MetricsDep, StoreDep
from bot.http.disconnect import while_connected
from dialogue.errors import AlreadyHandled, NotFound, Overloaded
from dialogue.manager import RETRY_AFTER_S, Reply
from dialogue.store import DIED, PENDING, Conversation, TranscriptStore, Turn
from memory.text import ID_PATTERN

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["dialogue"])

STILL_ANSWERED = "this message is still being answered; ask again in a few seconds"
ID = ID_PATTERN.pattern
TURN_ID = r"^[A-Za-z0-9_-]{1,64}$"
ConversationId = Annotated[str, Path(pattern=ID, description="1-128 of letters, digits and _.:@+-")]
TurnId = Annotated[str, Path(pattern=TURN_ID)]


class SourceOut(BaseModel):
    kind: str = Field(description='"faq" | "memory" | "persona" (id: the profile field)')
    id: str
    score: float


class MessageIn(BaseModel):
    user_id: str = Field(pattern=ID, description="the end user")
    text: str = Field(min_length=1, description="the user's message")
    channel: str = Field("api", pattern=r"^[a-z0-9_-]{1,32}$")
    metadata: dict[str, Any] | None = Field(None, description="free-form; not interpreted")
    stream: bool = Field(False, description="answer as server-sent events (also: Accept: text/event-stream)")
    message_id: str | None = Field(None, pattern=ID, description="the client's id of this message: a retry with "
                                   "the same id gets the first answer again, never a second one")


class MessageOut(BaseModel):
    turn_id: str
    reply: str
    sources: list[SourceOut]
    handoff: bool
    adapter_version: str | None
    status: Literal["bot", "human"] = Field("bot", description='"human": a person has the conversation')
    finish_reason: str = "stop"
    usage: dict[str, int] = Field(default_factory=dict)
    notices: list[str] = Field(default_factory=list)


class RatingIn(BaseModel):
    rating: Literal[1, -1]
    comment: str | None = Field(None, max_length=2000)
    correction: str | None = Field(None, max_length=8000, description="a better reply, for training")
    user_id: str | None = Field(None, pattern=ID, description="when given, must own the turn")


class RatingOut(BaseModel):
    turn_id: str
    rating: int
    handoff: bool = Field(description="this rating handed the conversation to a person")


class AgentMessageIn(BaseModel):
    text: str = Field(min_length=1, max_length=8000)


class HandoffIn(BaseModel):
    reason: Literal["manual", "customer_request", "low_confidence", "negative_ratings"] = "manual"


class ConversationOut(BaseModel):
    conversation_id: str
    user_id: str
    channel: str
    status: Literal["bot", "human"]


def reply_json(reply: Reply) -> dict:
    """The native answer; a turn that asked for a person has already handed the conversation over."""
    return {"turn_id": reply.turn_id, "reply": reply.text, "sources": [asdict(s) for s in reply.sources],
            "handoff": reply.handoff, "adapter_version": reply.adapter_version,
            "status": reply.status,
            "finish_reason": reply.finish_reason or "stop", "usage": reply.usage, "notices": reply.notices}


async def drain(chunks: AsyncIterator[str]) -> None:
    """Consume a reply that is answered whole (not streamed)."""
    async for _ in chunks:
        pass


def wants_stream(request: Request, flag: bool) -> bool:
    return flag or "text/event-stream" in request.headers.get("accept", "")


def sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that stop generating when the client goes away, on any ASGI server.

    Starlette only watches for `http.disconnect` for older ASGI spec versions; a reply nobody reads would
    otherwise keep its model slot until it finished. Cancelling the body iterator cancels the reply,
    which records the turn as cut short and frees the slot at the worker's next step.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.0"}}
        await super().__call__(scope, receive, send)


@router.post("/conversations/{conversation_id}/messages", response_model=MessageOut,
             responses={200: {"content": {"text/event-stream": {}}}})
async def post_message(request: Request, conversation_id: ConversationId, body: MessageIn, caller: ChatDep,
                       manager: ManagerDep, store: StoreDep):
    """A user's message in; the reply with its sources, handoff flag and adapter version out. The core's handoff
    gate answers with a `HandedOff` when a person has (or is asked to take) the conversation. Ids are taken
    inside the key's namespace; a conversation id that belongs to another user is refused. A `message_id` makes a
    retry safe: the same message is answered once."""
    user_id = caller.user(body.user_id)
    limit_user(request, caller, user_id)
    conversation_id = caller.conversation(conversation_id)
    retry = {}
    if body.message_id is not None:  # one turn per client message, found again by its id
        turn_id = hashlib.sha256(f"{user_id}\n{conversation_id}\n{body.message_id}".encode()).hexdigest()[:32]
        retry = {"event_id": turn_id, "turn_id": turn_id}
    try:
        outcome = await manager.respond(user_id=user_id, conversation_id=conversation_id, text=body.text,
                                        channel=body.channel, **retry)
    except AlreadyHandled:
        answered = await _answered_before(store, retry["turn_id"], user_id)
        if answered is None:  # the earlier tries died unanswered: this one takes up their turn, so one answers
            try:
                outcome = await manager.respond(user_id=user_id, conversation_id=conversation_id, text=body.text,
                                                channel=body.channel, turn_id=retry["turn_id"], again=True)
            except AlreadyHandled:  # another try took it up first
                raise Overloaded(STILL_ANSWERED, retry_after=RETRY_AFTER_S) from None
        elif wants_stream(request, body.stream):
            return EventStream(_events_of(answered))
        else:
            return answered
    if wants_stream(request, body.stream):
        return EventStream(_reply_events(outcome))
    outcome.streamed = False  # answered whole: cut short, it showed nothing
    await while_connected(request, drain(outcome))
    return reply_json(outcome)


async def _answered_before(store: TranscriptStore, turn_id: str, user_id: str) -> dict | None:
    """The answer a message with this client id got before; None when it never got one. A message whose first
    try is still being answered is refused for now (503, Retry-After), not answered twice."""
    turn: Turn | None = await asyncio.to_thread(store.get_turn, turn_id)
    if turn is None or turn.user_id != user_id or turn.finish_reason in DIED:
        return None
    if turn.finish_reason == PENDING:
        raise Overloaded(STILL_ANSWERED, retry_after=RETRY_AFTER_S)
    conversation = await asyncio.to_thread(store.get_conversation, turn.conversation_id)
    return {"turn_id": turn.id, "reply": turn.reply, "sources": json.loads(turn.sources or "[]"),
            "handoff": turn.handoff, "adapter_version": turn.adapter_version,
            "status": conversation.status if conversation else "bot", "finish_reason": turn.finish_reason or "stop",
            "usage": {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens},
            "notices": []}


async def _events_of(answered: dict) -> AsyncIterator[str]:
    if answered["reply"]:
        yield sse({"text": answered["reply"]}, "delta")
    yield sse(answered, "done")


async def _reply_events(reply: Reply) -> AsyncIterator[str]:
    try:
        async for chunk in reply:
            yield sse({"text": chunk}, "delta")
    except Exception as exc:  # the status line is gone already: the error travels as an event
        logger.warning("stream of turn %s failed: %s", reply.turn_id, exc)
        yield sse({"error": str(exc) or "generation failed"}, "error")
        return
    yield sse(reply_json(reply), "done")


@router.post("/turns/{turn_id}/rating", response_model=RatingOut)
async def post_rating(turn_id: TurnId, body: RatingIn, caller: ChatDep, manager: ManagerDep, store: StoreDep,
                      metrics: MetricsDep):
    """Thumbs up (1) or down (-1) on a turn of the key's users; repeated downs hand the conversation to a person.
    A correction is kept for training only once an admin approves it (`POST /v1/turns/{id}/correction/approve`)."""
    turn = await asyncio.to_thread(store.get_turn, turn_id)
    if turn is None or not caller.owns(turn.user_id) or (
            body.user_id is not None and caller.user(body.user_id) != turn.user_id):
        raise NotFound(f"no turn {turn_id!r}")
    handed_off = await manager.rate(turn_id=turn_id, rating=body.rating, user_id=turn.user_id,
                                    comment=body.comment, correction=body.correction)
    metrics.ratings.labels(str(body.rating)).inc()
    return {"turn_id": turn_id, "rating": body.rating, "handoff": handed_off}


async def _conversation(store: TranscriptStore, caller: Caller, conversation_id: str) -> Conversation:
    """The caller's conversation of that id; another user's is as unknown as a missing one."""
    conversation = await asyncio.to_thread(store.get_conversation, caller.conversation(conversation_id))
    if conversation is None or not caller.owns(conversation.user_id):
        raise NotFound(f"no conversation {conversation_id!r}")
    return conversation


def _conversation_json(c, caller: Caller) -> dict:
    return {"conversation_id": caller.shown(c.id), "user_id": caller.shown(c.user_id), "channel": c.channel,
            "status": c.status}


@router.get("/conversations/{conversation_id}", response_model=ConversationOut)
async def get_conversation(conversation_id: ConversationId, caller: ChatDep, store: StoreDep):
    """Who the conversation belongs to and whether the bot or a person has it."""
    return _conversation_json(await _conversation(store, caller, conversation_id), caller)


@router.post("/conversations/{conversation_id}/handoff", response_model=ConversationOut)
async def post_handoff(conversation_id: ConversationId, body: HandoffIn, caller: ChatDep, store: StoreDep,
                       desk: DeskDep):
    """Hand the conversation to a person now; the bot stays silent until it is resumed."""
    conversation = await _conversation(store, caller, conversation_id)
    await desk.hand_off(conversation_id=conversation.id, user_id=conversation.user_id,
                                          reason=body.reason, background=True)
    return {**_conversation_json(conversation, caller), "status": "human"}


@router.post("/conversations/{conversation_id}/resume", response_model=ConversationOut)
async def post_resume(conversation_id: ConversationId, caller: ChatDep, store: StoreDep, desk: DeskDep):
    """Give the conversation back to the bot."""
    conversation = await _conversation(store, caller, conversation_id)
    await desk.resume(conversation.id)
    return {**_conversation_json(conversation, caller), "status": "bot"}


@router.post("/conversations/{conversation_id}/agent_messages")
async def post_agent_message(conversation_id: ConversationId, body: AgentMessageIn, caller: ChatDep,
                             store: StoreDep, desk: DeskDep) -> dict:
    """Record what a human agent wrote (linked to the customer message it answers); it teaches the learning loop
    only when an admin key sent it (any other key could put words in a 'human agent's' mouth)."""
    conversation = await _conversation(store, caller, conversation_id)
    turn = await desk.record_agent_reply(conversation_id=conversation.id, text=body.text, trusted=caller.admin)
    return {"turn_id": turn.id, "reply_to": turn.reply_to}
