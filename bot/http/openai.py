"""`POST /v1/chat/completions`: the OpenAI chat API over Rapport's turns, so existing clients work unchanged.

Rapport keeps each conversation's history itself, so only the last user message of `messages` is taken
as the turn's text; the client's own system and earlier messages are not replayed (the persona, memory
and FAQ decide the prompt). `user` is the end user (default: one id per API key), inside the key's namespace like every id. The conversation is
`X-Conversation-ID`, else `metadata.conversation_id`, else derived from the user: one running
conversation per user. Sampling fields (temperature, max_tokens, …) are accepted and ignored: the
deployment's settings decide them. Replies carry `rapport: {turn_id, sources, adapter_version, handoff}`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from bot.http.auth import Caller, CallerDep, ChatDep, limit_user
from bot.http.deps import BackendDep, ManagerDep
from bot.http.disconnect import while_connected
from bot.http.turns import EventStream, drain
from dialogue.errors import InvalidInput
from dialogue.manager import HandedOff, Reply
from memory.text import ID_PATTERN, validate_id

router = APIRouter(prefix="/v1", tags=["openai"])


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=32)
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, … are accepted and ignored
    model: str = Field("rapport", max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    user: str | None = Field(None, pattern=ID_PATTERN.pattern, description="the end user's id")
    n: int = Field(1, ge=1, le=1, description="one choice only")
    metadata: dict[str, str] | None = Field(None, description="conversation_id here selects the conversation")
    stream_options: dict[str, Any] | None = None


def last_user_text(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            if isinstance(message.content, str):
                return message.content
            if message.content:
                return "\n".join(part.text for part in message.content if part.type == "text" and part.text)
    raise InvalidInput("messages holds no user message with text")


def conversation_for(request: Request, body: ChatRequest, caller: Caller, user_id: str) -> str:
    """The stored conversation id: the one the client names, else one per user (both inside the key's namespace)."""
    given = request.headers.get("x-conversation-id") or (body.metadata or {}).get("conversation_id")
    if given:
        return caller.conversation(validate_id(given, "conversation id"))
    return caller.conversation("oai-" + hashlib.sha256(user_id.encode()).hexdigest()[:32])


def user_for(body: ChatRequest, caller: Caller) -> str:
    """The stored user id; an anonymous client still gets memory of its own, never another's."""
    return caller.user(body.user or caller.name)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def usage_of(usage: dict[str, int]) -> dict[str, int]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def rapport_field(outcome: Reply) -> dict:
    return {"turn_id": outcome.turn_id, "sources": [asdict(s) for s in outcome.sources],
            "adapter_version": outcome.adapter_version, "handoff": outcome.handoff, "status": outcome.status}


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest, caller: ChatDep, manager: ManagerDep,
                           backend: BackendDep):
    """OpenAI-compatible chat completion, plain or streamed (`stream: true`)."""
    user_id = user_for(body, caller)
    limit_user(request, caller, user_id)
    conversation_id = conversation_for(request, body, caller, user_id)
    outcome = await manager.respond(user_id=user_id, conversation_id=conversation_id,
                                    text=last_user_text(body.messages), channel="openai")
    model = backend.model_id
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return EventStream(_chunks(outcome, model, include_usage))
    if isinstance(outcome, HandedOff):
        text, reason, usage = outcome.text, "stop", {}
    else:
        outcome.streamed = False  # answered whole: cut short, it showed nothing
        await while_connected(request, drain(outcome))
        text, reason, usage = outcome.text, outcome.finish_reason, outcome.usage
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(reason),
                     "logprobs": None}],
        "usage": usage_of(usage), "rapport": rapport_field(outcome),
    }


async def _chunks(outcome: Reply, model: str, include_usage: bool) -> AsyncIterator[str]:
    cid, created = completion_id(), int(time.time())

    def chunk(delta: dict, reason: str | None = None, **extra) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    if isinstance(outcome, HandedOff):
        if outcome.text:
            yield chunk({"content": outcome.text})
        reason, usage = "stop", {}
    else:
        try:
            async for piece in outcome:
                yield chunk({"content": piece})
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(exc) or 'generation failed'}})}\n\n"
            return
        reason, usage = outcome.finish_reason, outcome.usage
    yield chunk({}, finish(reason), rapport=rapport_field(outcome))
    if include_usage:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                "usage": usage_of(usage)}
        yield f"data: {json.dumps(data)}\n\n"
    yield "data: [DONE]\n\n"


@router.get("/models")
async def list_models(caller: CallerDep, backend: BackendDep) -> dict:
    """The one model this deployment serves (clients that list models before chatting find it)."""
    model = backend.model_id
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "rapport"}]}
