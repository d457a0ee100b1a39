"""The HTTP dialogue API: `create_app(services)` builds the FastAPI app that `rapport serve` runs.

Routes live in `turns` (messages, ratings, handoff), `openai` (`/v1/chat/completions`) and
`users` (persona, memories, export/erasure, FAQ, adapters); keys, namespaces and rate limits in `auth`; the Host
allowlist and the cross-origin refusal in `guard`; the
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
from bot.http.guard import GuardMiddleware, allowed_hosts
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
        except Exception as exc:  # the text stays in the log: /readyz tells only that it failed
            self.error = f"{exc.__class__.__name__}: {exc}"
            logger.error("start-up failed: %s", self.error)

    def _open_stores(self) -> None:
        self.services.chroma  # noqa: B018 - opening is the point
        self.services.embedder.embed(["warm-up"])  # loads the sentence-transformers model now, not on a request
        self.services.memory  # noqa: B018
        self.services.faq  # noqa: B018

    def status(self) -> dict:
        return {"model": self.services.backend.is_ready() and self.error is None, "stores": self.stores_ready,
                "transcripts": self.services.store.ping(), "failed": self.error is not None}


def queue_depth(services: Services):
    worker = getattr(services.backend, "worker", None)
    return (lambda: worker.queue_depth) if worker is not None else (lambda: 0)


async def sweep_abandoned(services: Services) -> None:
    """Close the API's turns that a dead process left pending, now and every lease period (the clients
    got a broken connection; the turn says "interrupted" instead of staying pending; Telegram and
    Chatwoot sweep their own, because they tell their users); retry the memory writes still owed."""
    while True:
        try:
            closed = await asyncio.to_thread(services.manager.close_abandoned, exclude={"telegram", "chatwoot"})
            if closed:
                logger.info("closed %d turns left pending by a process that died", len(closed))
            await services.tidy()  # half-done erasures, owed memory writes
        except Exception as exc:
            logger.warning("could not look for abandoned turns: %s", exc)
        await asyncio.sleep(services.settings.turn_lease_s)


def create_app(services: Services, *, open_api: bool = False, bound_host: str | None = None) -> FastAPI:
    """The API over one process's services (the caller opens and closes them).

    Without any key the API answers only with `open_api` (`rapport serve --open`, loopback only): chat and memory
    with ids as given, never the admin routes. `bound_host` joins the Host allowlist when none is configured."""
    settings = services.settings
    readiness = Readiness(services)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        readiness.task = asyncio.create_task(readiness.warm())
        sweeper = asyncio.create_task(sweep_abandoned(services))
        for channel in app.state.channels:
            await channel.start()
        yield
        for channel in app.state.channels:  # Chatwoot: replies being made finish first (30 s at most)
            await channel.stop()
        sweeper.cancel()
        await services.desk.drain()
        readiness.task.cancel()

    app = FastAPI(title="Rapport", version="1", lifespan=lifespan,
                  description="Dialogue API: grounded, persona-aware replies with sources; OpenAI-compatible chat.")
    metrics = ApiMetrics(queue_depth(services), handoffs=services.desk.counts)
    services.manager.observers.append(metrics.observe_turn)  # every channel's turns: API, Telegram, Chatwoot
    app.state.services = services
    app.state.metrics = metrics
    app.state.keys = ApiKeys(settings, services.integrations, open_api=open_api)
    app.state.limiter = RateLimiter(settings.api_rate_per_minute, settings.api_rate_burst)
    app.state.user_limiter = RateLimiter(settings.api_user_rate_per_minute, settings.api_user_rate_burst)
    app.state.readiness = readiness
    app.state.channels = []  # channels with webhooks on this app (Chatwoot): each has start() and stop()

    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.api_max_body_bytes, on_done=metrics.observe_request)
    app.add_middleware(GuardMiddleware, hosts=allowed_hosts(settings.allowed_hosts, bound_host))  # outermost
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
        """The model and the stores are loaded (503 until they are); no error text (that is in the log)."""
        status = await asyncio.to_thread(readiness.status)
        ready = status["model"] and status["stores"] and status["transcripts"]
        return JSONResponse({"ready": ready, **status}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus(request: Request) -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
