"""`rapport telegram`: the Telegram bot, polling by default or behind a webhook."""

from __future__ import annotations

import asyncio
import logging
import re
import signal

import click

from bot.cli.common import load_settings

logger = logging.getLogger(__name__)

TOKEN = re.compile(r"^\d{1,20}:[A-Za-z0-9_-]{1,100}$")


class RedactToken(logging.Filter):
    """Keeps the bot token out of every log line (httpx and the Bot API client put it in URLs)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = message.replace(self.token, "<token>"), None
        if record.exc_info and record.exc_info[1] is not None and self.token in str(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None  # a traceback quoting the token is not worth the leak
        return True


def bot_token(token: str | None) -> str:
    """The bot token, checked, and kept out of every log line from now on (ClickException when missing or malformed)."""
    token = (token or "").strip()
    if not token:
        raise click.ClickException("no bot token: pass --token or set TELEGRAM_BOT_TOKEN")
    if not TOKEN.match(token):
        raise click.ClickException("that does not look like a bot token (digits, a colon, then letters)")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactToken(token))
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("bot").setLevel(min(logging.getLogger().level, logging.INFO))
    return token


@click.command("telegram")
@click.option("--token", default=None, help="bot token from @BotFather (default: $TELEGRAM_BOT_TOKEN; the "
              "variable keeps it out of the process list)")
@click.option("--base-url", default=None, metavar="URL",
              help="another Bot API server, e.g. http://127.0.0.1:8081/bot (the token is appended; "
              "default: $RAPPORT_TELEGRAM_BASE_URL)")
@click.option("--webhook-url", default=None, metavar="URL",
              help="receive updates by webhook at this public https URL instead of polling")
@click.option("--listen", default="127.0.0.1", show_default=True, help="webhook mode: address to listen on")
@click.option("--port", default=8443, show_default=True, type=click.IntRange(1, 65535), help="webhook mode: port")
def telegram_command(token: str | None, base_url: str | None, webhook_url: str | None, listen: str, port: int) -> None:
    """Run the Telegram bot until Ctrl-C or SIGTERM."""
    from telegram.error import InvalidToken

    from dialogue.settings import reveal

    from bot.telegram.handlers import TelegramBot, Webhook
    from bot.services import open_services

    settings = load_settings()
    token = bot_token(token or reveal(settings.telegram_bot_token))
    webhook = Webhook(url=webhook_url, listen=listen, port=port, secret=reveal(settings.telegram_webhook_secret)) \
        if webhook_url else None
    if webhook and not webhook.path:
        raise click.ClickException("--webhook-url needs a path, e.g. https://bot.example.com/telegram")

    services = open_services(settings, load_model=True)
    try:
        asyncio.run(_run(TelegramBot(services), token, base_url or settings.telegram_base_url, webhook))
    except InvalidToken:
        raise click.ClickException("the Bot API rejected the token") from None
    finally:
        services.close()


async def _run(bot, token: str, base_url: str | None, webhook) -> None:
    from bot.telegram.handlers import run_bot

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_bot(bot, token, base_url=base_url, webhook=webhook, stop=stop)
