"""Conversations (a live list across channels, filters, transcripts) and the handoff queue (take over, reply, hand
back)."""

from __future__ import annotations

import asyncio
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import RedirectResponse

from bot.http.console.access import ConsoleSession, PageMissing, checked_form, current_session
from bot.http.console.delivery import deliver_agent_reply
from bot.http.console.render import path_part, render
from bot.http.deps import ServicesDep
from bot.services import Services
from dialogue.errors import InvalidInput
from memory.text import ID_PATTERN

router = APIRouter()
SessionDep = Annotated[ConsoleSession, Depends(current_session)]
ConversationId = Annotated[str, Path(pattern=ID_PATTERN.pattern)]
RATINGS = {"up": 1, "down": -1, "none": 0}
DELIVERED = {"chatwoot": "sent to the customer in Chatwoot", "telegram": "sent to the customer on Telegram",
             "webhook": "sent to the integration's webhook",
             "": "recorded, but this channel has no way back configured: the customer has not seen it"}


def filters_of(request: Request) -> dict[str, str]:
    q = request.query_params
    return {name: q.get(name, "") for name in ("channel", "status", "adapter", "rating")}


def summaries(services: Services, filters: dict[str, str]):
    adapter = filters["adapter"]
    return services.store.list_conversations(
        channel=filters["channel"] or None, status=filters["status"] or None,
        adapter_version=None if not adapter else "" if adapter == "base" else adapter,
        rating=RATINGS.get(filters["rating"]), limit=200)


@router.get("/conversations")
async def conversations_page(request: Request, session: SessionDep, services: ServicesDep):
    filters = filters_of(request)
    rows = await asyncio.to_thread(summaries, services, filters)
    facets = await asyncio.to_thread(services.store.facets)
    return render(request, session, "conversations.html", active="conversations", rows=rows, facets=facets,
                  filters=filters, query=urlencode({k: v for k, v in filters.items() if v}))


@router.get("/live/conversations")
async def conversation_rows(request: Request, session: SessionDep, services: ServicesDep):
    """The list's rows alone, re-read by the page every two seconds."""
    rows = await asyncio.to_thread(summaries, services, filters_of(request))
    return render(request, session, "_conversation_rows.html", rows=rows)


async def _conversation(services: Services, conversation_id: str):
    conversation = await asyncio.to_thread(services.store.get_conversation, conversation_id)
    if conversation is None:
        raise PageMissing(f"There is no conversation {conversation_id}.")
    return conversation


@router.get("/conversations/{conversation_id}")
async def conversation_page(request: Request, conversation_id: ConversationId, session: SessionDep,
                            services: ServicesDep):
    conversation = await _conversation(services, conversation_id)
    turns = await asyncio.to_thread(services.store.conversation_turns, conversation_id)
    q = request.query_params
    return render(request, session, "conversation.html", active="conversations", conversation=conversation,
                  turns=turns, notice=q.get("notice"), problem=q.get("problem"))


@router.get("/conversations/{conversation_id}/turns")
async def conversation_turns(request: Request, conversation_id: ConversationId, session: SessionDep,
                             services: ServicesDep):
    """The transcript's turns alone, re-read by the page (customer messages arrive while an agent has it)."""
    turns = await asyncio.to_thread(services.store.conversation_turns, conversation_id)
    return render(request, session, "_turns.html", turns=turns)


def back_to(conversation_id: str, **message: str) -> RedirectResponse:
    query = f"?{urlencode(message)}" if message else ""
    return RedirectResponse(f"/admin/conversations/{path_part(conversation_id)}{query}", status_code=303)


@router.post("/conversations/{conversation_id}/take")
async def take_over(request: Request, conversation_id: ConversationId, session: SessionDep, services: ServicesDep):
    """A person takes the conversation: the bot goes silent and the handoff listeners are told."""
    await checked_form(request, session)
    conversation = await _conversation(services, conversation_id)
    if conversation.status != "human":
        await services.desk.hand_off(conversation_id=conversation.id, user_id=conversation.user_id, reason="manual",
                                     background=True)
    return back_to(conversation_id, notice="You have the conversation: the bot stays silent until you hand it back.")


@router.post("/conversations/{conversation_id}/reply")
async def reply(request: Request, conversation_id: ConversationId, session: SessionDep, services: ServicesDep):
    """The agent's reply: recorded through the desk, then sent on the customer's channel."""
    form = await checked_form(request, session)
    conversation = await _conversation(services, conversation_id)
    text = form.get("text", "").strip()
    if conversation.status != "human":
        return back_to(conversation_id, problem="Take the conversation over before replying.")
    if not text or len(text) > 8000:
        return back_to(conversation_id, problem="A reply is 1 to 8000 characters.")
    try:
        _, where = await deliver_agent_reply(services, conversation, text)
    except InvalidInput as exc:
        return back_to(conversation_id, problem=str(exc))
    except Exception as exc:  # the channel refused it: the reply is recorded, the operator must know it did not go
        return back_to(conversation_id, problem=f"Recorded, but sending failed: {exc.__class__.__name__}")
    return back_to(conversation_id, notice=f"Reply {DELIVERED[where]}.")


@router.post("/conversations/{conversation_id}/release")
async def hand_back(request: Request, conversation_id: ConversationId, session: SessionDep, services: ServicesDep):
    """Give the conversation back to the bot."""
    await checked_form(request, session)
    await _conversation(services, conversation_id)
    await services.desk.resume(conversation_id)
    return back_to(conversation_id, notice="Handed back: the bot answers the next message.")


def waiting_first(services: Services):
    rows = services.store.list_conversations(status="human", limit=500)
    return sorted(rows, key=lambda r: (not r.waiting, -r.conversation.updated_at.timestamp()))


@router.get("/handoffs")
async def handoffs_page(request: Request, session: SessionDep, services: ServicesDep):
    rows = await asyncio.to_thread(waiting_first, services)
    return render(request, session, "handoffs.html", active="handoffs", rows=rows)


@router.get("/live/handoffs")
async def handoff_rows(request: Request, session: SessionDep, services: ServicesDep):
    rows = await asyncio.to_thread(waiting_first, services)
    return render(request, session, "_handoff_rows.html", rows=rows)
