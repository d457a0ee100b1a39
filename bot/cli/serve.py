"""`rapport serve`: the HTTP dialogue API under uvicorn, with the Chatwoot integration when configured and the
Telegram bot with `--telegram`."""

from __future__ import annotations

import logging

import click

from bot.cli.common import load_settings
from dialogue.settings import LOOPBACK_HOSTS, reveal

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s] %(message)s"


def build_app(services, *, open_api: bool = False, host: str | None = None, telegram_token: str | None = None):
    """The API app plus the channels that plug into it (Chatwoot when its URL, token and secret are set; the
    Telegram bot with `telegram_token`)."""
    from bot.http.app import create_app

    app = create_app(services, open_api=open_api, bound_host=host)
    settings = services.settings
    if telegram_token:
        from bot.telegram.handlers import TelegramChannel

        app.state.channels.append(TelegramChannel(services, telegram_token, base_url=settings.telegram_base_url))
    if services.chatwoot is not None:
        from bot.http.chatwoot import ChatwootBot

        if not settings.chatwoot_webhook_secret:
            raise click.ClickException("RAPPORT_CHATWOOT_WEBHOOK_SECRET is required with the Chatwoot integration")
        bot = ChatwootBot(services.manager, services.store, services.desk, services.chatwoot,
                          secret=reveal(settings.chatwoot_webhook_secret), query_token=settings.chatwoot_query_token)
        app.include_router(bot.router())
        app.state.channels.append(bot)
    return app


def has_integrations(settings) -> bool:
    """Whether any integration's key is active (read before the model starts loading)."""
    from dialogue.integrations import IntegrationStore
    from dialogue.store import TranscriptStore

    store = TranscriptStore(settings.db_url)
    try:
        return IntegrationStore(store).any_active()
    finally:
        store.close()


def configure_access_log(verbose: bool) -> None:
    """One line per request with its request id; keys and bodies are never logged."""
    from bot.http.errors import RequestIdFilter

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    for name in ("dialogue", "bot", "training"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
        log.propagate = False


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0 exposes it)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--open", "open_api", is_flag=True,
              help="development mode: answer without keys (loopback addresses only; never the admin routes)")
@click.option("--telegram", "with_telegram", is_flag=True,
              help="run the Telegram bot in this process too (TELEGRAM_BOT_TOKEN; RAPPORT_TELEGRAM_BASE_URL)")
def serve(host: str, port: int, log_level: str, open_api: bool, with_telegram: bool) -> None:
    """Serve the HTTP API (docs at /docs, schema at /openapi.json)."""
    import uvicorn

    from bot.services import open_services

    settings = load_settings()
    telegram_token = None
    if with_telegram:
        from bot.cli.telegram import bot_token

        telegram_token = bot_token(reveal(settings.telegram_bot_token))
    if open_api and host not in LOOPBACK_HOSTS:
        raise click.ClickException(f"--open serves without keys and is for loopback addresses only, not {host}")
    keyed = bool(settings.api_keys or settings.admin_keys) or has_integrations(settings)
    if not keyed and not open_api:
        raise click.ClickException("no API keys: create one with `rapport keys create NAME --scopes chat,memory` "
                                   "(or run `serve --open` on a loopback address for development)")
    if keyed and open_api:
        logger.warning("--open is ignored: API keys exist, so every request needs one")
    services = open_services(settings)
    retrain = retrain_scheduler(services)
    try:
        if not settings.allowed_hosts and host not in LOOPBACK_HOSTS:
            logger.warning("serving on %s: only the Host names localhost, 127.0.0.1, ::1 and %s are answered; "
                           "set RAPPORT_ALLOWED_HOSTS to the names clients use", host, host)
        app = build_app(services, open_api=open_api, host=host, telegram_token=telegram_token)
        configure_access_log(log_level == "debug")
        retrain.start()  # does nothing unless RAPPORT_RETRAIN_MIN_EXAMPLES or RAPPORT_RETRAIN_EVERY_DAYS is set
        uvicorn.run(app, host=host, port=port, log_level=log_level if log_level != "info" else "warning",
                    access_log=False, timeout_graceful_shutdown=10)
    finally:
        retrain.stop()
        services.close()


def retrain_scheduler(services):
    """Retraining on the schedule the settings give, with the FAQ this process holds open."""
    from training.schedule import RetrainScheduler

    def faq_entries() -> list:
        try:
            return list(services.faq.list())
        except Exception as exc:  # train without FAQ examples rather than not at all, as `rapport train` does
            logger.warning("retraining without FAQ examples (%s)", exc)
            return []

    return RetrainScheduler(services.settings, services.store, faq_entries=faq_entries)
