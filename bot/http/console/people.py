"""Users (profile, conversations, memories: search and forget, export, erasure) and the FAQ (entries, import, try a
question), through the same stores and services as the HTTP API's user and FAQ routes."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse

from bot.http.console.access import ConsoleSession, checked_form, current_session
from bot.http.console.render import path_part, render
from bot.http.deps import ServicesDep
from dialogue.errors import InvalidInput, NotFound
from memory.faq_files import parse_faq_text
from memory.text import ID_PATTERN

router = APIRouter()
SessionDep = Annotated[ConsoleSession, Depends(current_session)]
UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern)]
EntryId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:@+-]{1,128}$")]


def go(url: str, **message: str) -> RedirectResponse:
    return RedirectResponse(url + (f"?{urlencode(message)}" if message else ""), status_code=303)


# -- users -------------------------------------------------------------------------------------------

@router.get("/users")
async def users_page(request: Request, session: SessionDep, services: ServicesDep, q: str = ""):
    rows = await asyncio.to_thread(services.store.list_users, contains=q[:128])
    return render(request, session, "users.html", active="users", rows=rows, q=q,
                  notice=request.query_params.get("notice"))


def user_view(services, user_id: str, query: str) -> dict:
    memories = services.memory.for_user(user_id)
    return {"persona": services.personas.get(user_id).to_json(),
            "memories": memories.search(query, 20) if query else memories.list(100),
            "conversations": services.store.list_conversations(user_id=user_id, limit=50)}


@router.get("/users/{user_id}")
async def user_page(request: Request, user_id: UserId, session: SessionDep, services: ServicesDep, q: str = ""):
    view = await asyncio.to_thread(user_view, services, user_id, q[:2000].strip())
    params = request.query_params
    return render(request, session, "user.html", active="users", user_id=user_id, q=q, **view,
                  notice=params.get("notice"), problem=params.get("problem"))


@router.get("/users/{user_id}/export")
async def user_export(user_id: UserId, session: SessionDep, services: ServicesDep) -> JSONResponse:
    """Everything stored about the user, as the download `rapport users export` prints."""
    data = await asyncio.to_thread(services.export_user, user_id)
    return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="{path_part(user_id)}.json"',
                                       "Cache-Control": "no-store"})


@router.post("/users/{user_id}/memories/{memory_id}/forget")
async def forget_memory(request: Request, user_id: UserId, memory_id: EntryId, session: SessionDep,
                        services: ServicesDep):
    await checked_form(request, session)
    try:
        await asyncio.to_thread(services.memory.for_user(user_id).forget, memory_id)
    except NotFound:
        return go(f"/admin/users/{path_part(user_id)}", problem="That memory is gone already.")
    return go(f"/admin/users/{path_part(user_id)}", notice="Forgotten.")


@router.post("/users/{user_id}/erase")
async def erase_user(request: Request, user_id: UserId, session: SessionDep, services: ServicesDep):
    """Erase everything about the user; the form must repeat the user id, so a slip of the mouse erases nothing."""
    form = await checked_form(request, session)
    if form.get("confirm", "") != user_id:
        return go(f"/admin/users/{path_part(user_id)}", problem="Type the user id to confirm the erasure.")
    erased = await asyncio.to_thread(services.erase_user, user_id)
    summary = ", ".join(f"{k} {v}" for k, v in erased.items())
    return go("/admin/users", notice=f"Erased {user_id}: {summary}.")


# -- FAQ ---------------------------------------------------------------------------------------------

def try_question(services, question: str) -> dict | None:
    if not question:
        return None
    decision = services.faq.verdict(question, services.settings.scope)
    if decision is None:
        return {"level": "none", "confidence": 0.0, "hits": [], "used": set(), "note": "no FAQ imported"}
    return {"level": decision.level, "confidence": decision.confidence, "hits": decision.hits,
            "used": {s["id"] for s in decision.sources()}, "note": decision.small_talk}


@router.get("/faq")
async def faq_page(request: Request, session: SessionDep, services: ServicesDep, q: str = "", edit: str = ""):
    question = q[:2000].strip()
    entries = await asyncio.to_thread(services.faq.list)
    tried = await asyncio.to_thread(try_question, services, question)
    editing = next((e for e in entries if e.id == edit), None)
    params = request.query_params
    return render(request, session, "faq.html", active="faq", entries=entries, q=question, tried=tried,
                  editing=editing, notice=params.get("notice"), problem=params.get("problem"))


def entry_from(form: dict[str, str]) -> dict:
    lines = lambda name: [x.strip() for x in form.get(name, "").splitlines() if x.strip()]  # noqa: E731
    return {"id": form.get("id", "").strip(), "question": form.get("question", ""), "answer": form.get("answer", ""),
            "tags": [t.strip() for t in form.get("tags", "").split(",") if t.strip()],
            "alternates": lines("alternates")}


@router.post("/faq/save")
async def faq_save(request: Request, session: SessionDep, services: ServicesDep):
    """Add an entry, or change the one with that id (validated like an imported line)."""
    form = await checked_form(request, session)
    try:
        entries = parse_faq_text(json.dumps(entry_from(form), ensure_ascii=False), "jsonl", "the entry")
        await asyncio.to_thread(services.faq.upsert, entries)
    except InvalidInput as exc:
        return go("/admin/faq", problem=str(exc))
    return go("/admin/faq", notice=f"Saved {entries[0].id}.")


@router.post("/faq/import")
async def faq_import(request: Request, session: SessionDep, services: ServicesDep):
    """Entries pasted as CSV, JSONL or Markdown, upserted by id; one bad line and nothing changes."""
    form = await checked_form(request, session)
    try:
        entries = parse_faq_text(form.get("text", ""), form.get("format", "jsonl"), "the pasted FAQ")
        result = await asyncio.to_thread(services.faq.upsert, entries)
    except InvalidInput as exc:
        return go("/admin/faq", problem=str(exc))
    return go("/admin/faq", notice=f"Imported {len(entries)} entries: {json.dumps(result)[:300]}")


@router.post("/faq/{entry_id}/delete")
async def faq_delete(request: Request, entry_id: EntryId, session: SessionDep, services: ServicesDep):
    await checked_form(request, session)
    try:
        await asyncio.to_thread(services.faq.delete, entry_id)
    except NotFound:
        return go("/admin/faq", problem=f"No entry {entry_id}.")
    return go("/admin/faq", notice=f"Deleted {entry_id}.")
