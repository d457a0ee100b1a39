"""The HTTP dialogue API: `create_app(services)` builds the FastAPI app that `rapport serve` runs.

Routes live in `turns` (messages, ratings, handoff), `openai` (`/v1/chat/completions`) and
`users` (persona, memories, export/erasure, FAQ, adapters); auth and rate limits in `auth`; the
JSON error edge, request ids and the body limit in `errors`; metrics in `metrics`; the handoff desk in
`dialogue.handoff`. Routes are handed the stores and services as FastAPI dependencies (`deps`); channels
with their own webhooks (Chatwoot) mount a router on the app.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from bot.http import openai, turns, users
from bot.http.auth import ApiKeys, RateLimiter
from bot.http.console import install_console
from bot.http.errors import EdgeMiddleware, install_error_handlers
from bot.http.metrics import ApiMetrics
from bot.services import Services

logger = logging.getLogger(__name__)


class Readiness:
    """Warms the model and the stores once at start-up; `/readyz` reports what is loaded."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.stores_ready = False
        self.error: str | None = None
        self.task: asyncio.Task | None = None

    async def warm(self) -> None:
        try:
            await self.services.backend.ready()
            await asyncio.to_thread(self._open_stores)
            self.stores_ready = True
        except Exception as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"
            logger.error("start-up failed: %s", self.error)

    def _open_stores(self) -> None:
        self.services.chroma  # noqa: B018 - opening is the point
        self.services.embedder.embed(["warm-up"])  # loads the sentence-transformers model now, not on a request
        self.services.memory  # noqa: B018
        self.services.faq  # noqa: B018

    def status(self) -> dict:
        return {"model": self.services.backend.is_ready() and self.error is None, "stores": self.stores_ready,
                "transcripts": self.services.store.ping(), "error": self.error}


def queue_depth(services: Services):
    worker = getattr(services.backend, "worker", None)
    return (lambda: worker.queue_depth) if worker is not None else (lambda: 0)


def create_app(services: Services) -> FastAPI:
    """The API over one process's services (the caller opens and closes them)."""
    settings = services.settings
    readiness = Readiness(services)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        readiness.task = asyncio.create_task(readiness.warm())
        yield
        await services.desk.drain()
        readiness.task.cancel()

    app = FastAPI(title="Rapport", version="1", lifespan=lifespan,
                  description="Dialogue API: grounded, persona-aware replies with sources; OpenAI-compatible chat.")
    metrics = ApiMetrics(queue_depth(services), handoffs=services.desk.counts)
    services.manager.observers.append(metrics.observe_turn)  # every channel's turns: API, Telegram, Chatwoot
    app.state.services = services
    app.state.metrics = metrics
    app.state.keys = ApiKeys(settings)
    app.state.limiter = RateLimiter(settings.api_rate_per_minute, settings.api_rate_burst)
    app.state.readiness = readiness

    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.api_max_body_bytes, on_done=metrics.observe_request)
    app.include_router(turns.router)
    app.include_router(openai.router)
    app.include_router(users.router)
    install_console(app)  # the operators' web console at /admin

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process is up."""
        return {"ok": True}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "still loading, or a load failed"}})
    async def readyz() -> JSONResponse:
        """The model and the stores are loaded (503 until they are)."""
        status = await asyncio.to_thread(readiness.status)
        ready = status["model"] and status["stores"] and status["transcripts"]
        return JSONResponse({"ready": ready, **status}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus(request: Request) -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
