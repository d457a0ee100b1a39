"""Per-user routes (persona, memories, export, erasure) and the business's FAQ and adapter registry.

The stores are synchronous (SQLite, Chroma, the embedder), so every call runs in a worker thread and the
event loop stays free for streaming replies. Persona and memories need the `memory` scope and take the user id
inside the key's namespace; export/erasure of a user, FAQ writes, the adapter registry and approving corrections
need an admin key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from bot.http.auth import AdminDep, CallerDep, MemoryScopeDep
from bot.http.deps import FaqDep, MemoryDep, PersonasDep, RegistryDep, ServicesDep, StoreDep
from dialogue.errors import InvalidInput, NotFound
from memory.faq_files import parse_faq_text
from memory.memories import MemoryItem
from memory.text import ID_PATTERN
from training.store import TrainingStore

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["users", "faq", "adapters"])

UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="1-128 of letters, digits and _.:@+-")]
MemoryId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
Version = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
QueryText = Annotated[str, Query(min_length=1, max_length=2000, description="what to look for")]
K = Annotated[int, Query(ge=1, le=50, description="how many results, 1-50")]
MAX_ITEMS = 1000


class MemoriesIn(BaseModel):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ITEMS,
                                        description='lines as in `memory import`: {"text", "speaker"?, "timestamp"?, "meta"?}')


class FaqIn(BaseModel):
    entries: list[dict[str, Any]] = Field(min_length=1, max_length=5000,
                                          description='{"id", "question", "answer", "tags"?, "alternates"?}')


class PromoteIn(BaseModel):
    share: float = Field(1.0, gt=0.0, le=1.0, description="fraction of users served this version (sticky A/B)")


async def run(fn, *args, **kwargs):
    return await asyncio.to_thread(fn, *args, **kwargs)


# -- persona -----------------------------------------------------------------------------------------

@router.get("/users/{user_id}/persona")
async def get_persona(user_id: UserId, caller: MemoryScopeDep, personas: PersonasDep) -> dict:
    """The profile that conditions this user's replies."""
    return (await run(personas.get, caller.user(user_id))).to_json()


@router.put("/users/{user_id}/persona")
async def put_persona(user_id: UserId, changes: dict[str, Any], caller: MemoryScopeDep, personas: PersonasDep) -> dict:
    """Set persona fields (`{"name": "Lena", "verbosity": "short"}`); "" or [] clears one."""
    if len(changes) > 20:
        raise InvalidInput("too many persona fields")
    return (await run(personas.update, caller.user(user_id), changes)).to_json()


# -- memories ----------------------------------------------------------------------------------------

@router.post("/users/{user_id}/memories")
async def post_memories(user_id: UserId, body: MemoriesIn, caller: MemoryScopeDep, memory: MemoryDep) -> dict:
    """Add memories for the user; returns their ids in order."""
    items = []
    for number, data in enumerate(body.items, 1):
        try:
            items.append(MemoryItem.from_json(data))
        except InvalidInput as exc:
            raise InvalidInput(f"item {number}: {exc}") from None
    return {"ids": await run(memory.for_user(caller.user(user_id)).add, items)}


@router.get("/users/{user_id}/memories/search")
async def search_memories(user_id: UserId, q: QueryText, caller: MemoryScopeDep, memory: MemoryDep,
                          k: K = 5) -> list[dict]:
    """This user's memories nearest to `q`, best first: `[{"id", "text", "score", "meta"}]`."""
    return [hit.to_json() for hit in await run(memory.for_user(caller.user(user_id)).search, q, k)]


@router.delete("/users/{user_id}/memories/{memory_id}")
async def delete_memory(user_id: UserId, memory_id: MemoryId, caller: MemoryScopeDep, memory: MemoryDep) -> dict:
    """Forget one memory (404 when it is not this user's)."""
    await run(memory.for_user(caller.user(user_id)).forget, memory_id)
    return {"deleted": memory_id}


# -- whole users (admin) -----------------------------------------------------------------------------

@router.get("/users/{user_id}/export")
async def export_user(user_id: UserId, caller: AdminDep, services: ServicesDep) -> dict:
    """Everything stored about the user, as one JSON document."""
    return await run(services.export_user, user_id)


@router.delete("/users/{user_id}")
async def delete_user(user_id: UserId, caller: AdminDep, services: ServicesDep) -> dict:
    """Erase everything stored about the user; returns what went, by kind."""
    erased = await run(services.erase_user, user_id)
    logger.info("erased a user on request (%s)", ", ".join(f"{k}={v}" for k, v in erased.items()))
    return {"user_id": user_id, "erased": erased}


# -- FAQ ---------------------------------------------------------------------------------------------

@router.post("/faq")
async def post_faq(body: FaqIn, caller: AdminDep, faq: FaqDep) -> dict:
    """Upsert FAQ entries by id (validated whole: one bad entry and nothing changes)."""
    text = "\n".join(json.dumps(entry, ensure_ascii=False) for entry in body.entries)
    entries = parse_faq_text(text, "jsonl", "request entries")  # problems are reported by entry number
    return await run(faq.upsert, entries)


@router.get("/faq/search")
async def search_faq(q: QueryText, caller: CallerDep, faq: FaqDep, k: K = 5) -> list[dict]:
    """FAQ entries nearest to `q`, one per entry, best first."""
    return [hit.to_json() for hit in await run(faq.search, q, k)]


# -- adapters (admin) --------------------------------------------------------------------------------

@router.get("/adapters")
async def list_adapters(caller: AdminDep, registry: RegistryDep) -> list[dict]:
    """Adapter versions: `[{"version", "status", "metrics", "created_at"}]`."""
    return await run(registry.list)


@router.post("/adapters/{version}/promote")
async def promote_adapter(version: Version, caller: AdminDep, registry: RegistryDep,
                          body: PromoteIn | None = None) -> dict:
    """Serve `version` to everyone, or to a sticky share of users."""
    share = body.share if body else None
    promoted = await run(registry.promote, version, share)
    return promoted.public(share)


@router.post("/adapters/rollback")
async def rollback_adapter(caller: AdminDep, registry: RegistryDep) -> dict:
    """Back to the previous active version."""
    return await run(registry.rollback)


# -- training trust (admin) --------------------------------------------------------------------------

@router.post("/turns/{turn_id}/correction/approve", tags=["training"])
async def approve_correction(turn_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")], caller: AdminDep,
                             store: StoreDep) -> dict:
    """Trust the correction a user gave on this turn: only approved corrections become training examples."""
    if not await run(TrainingStore(store).approve_correction, turn_id):
        raise NotFound(f"no correction on turn {turn_id!r}")
    return {"turn_id": turn_id, "correction_trusted": True}
