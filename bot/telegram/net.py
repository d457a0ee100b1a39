"""Surviving Telegram's failures: Bot API calls retried through network errors, updates admitted as they arrive and
handled in order per chat."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from telegram import Update
from telegram.error import BadRequest, NetworkError, TimedOut
from telegram.ext import BaseUpdateProcessor
from telegram.request import HTTPXRequest

logger = logging.getLogger(__name__)

# Calls that are safe to repeat when a response was lost (a timeout): the second one changes nothing.
IDEMPOTENT = {"getMe", "sendChatAction", "editMessageText", "editMessageReplyMarkup", "answerCallbackQuery",
              "setMyCommands", "deleteMyCommands", "deleteWebhook", "setWebhook", "getWebhookInfo"}


class RetryingRequest(HTTPXRequest):
    """HTTPXRequest that retries a call with exponential backoff while the Bot API is unreachable or answers 5xx.

    A refused connection or a 5xx means Telegram did not act, so every call is retried; a timeout may hide a
    call that went through, so only idempotent calls are repeated then (a sendMessage is not sent twice).
    429s are not handled here: the AIORateLimiter above honours their `retry_after`.
    """

    def __init__(self, *, retry_budget: float = 60.0, first_delay: float = 0.5, max_delay: float = 8.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.retry_budget = retry_budget
        self.first_delay = first_delay
        self.max_delay = max_delay

    async def post(self, url: str, request_data=None, *args: Any, **kwargs: Any):
        method = url.rsplit("/", 1)[-1]
        deadline = time.monotonic() + self.retry_budget
        delay = self.first_delay
        while True:
            try:
                return await super().post(url, request_data, *args, **kwargs)
            except BadRequest:
                raise
            except NetworkError as exc:
                if isinstance(exc, TimedOut) and method not in IDEMPOTENT:
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("Bot API %s failed (%s); retrying in %.1f s", method, exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)


def chat_key(update: object) -> int | None:
    if isinstance(update, Update) and update.effective_chat is not None:
        return update.effective_chat.id
    return None


class ChatOrderedProcessor(BaseUpdateProcessor):
    """Each update is admitted (`admit`: a message recorded) as soon as it may be, then handled: updates of different
    chats concurrently, those of one chat one after another, in arrival order.

    `admit` returns True when it took the update in: the chat's later updates are then admitted without waiting for
    its handling (a reply being made). An update it did not take in (a command, a button) may change how later ones
    are (/new starts a conversation, a 👎 makes the next message a correction), so they wait until it is handled.
    Waiting updates hold no slot: `max_concurrent_updates` counts updates being handled. The application starts
    one task per update in arrival order, and each takes its place in its chat's line before it first yields.
    """

    def __init__(self, max_concurrent_updates: int, admit: Callable[[object], Awaitable[bool]] | None = None) -> None:
        super().__init__(max_concurrent_updates)
        self.admit = admit
        self._last: dict[int, _Place] = {}  # chat -> the place of its latest update still in line

    async def process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        key = chat_key(update)
        ahead, place = self._last.get(key), _Place()
        if key is not None:
            self._last[key] = place
        try:
            if ahead is not None:
                await ahead.settled.wait()
            try:
                if self.admit is not None and await self.admit(update):
                    place.settled.set()
            except Exception:  # the handler does without it
                logger.exception("admitting update %s failed", getattr(update, "update_id", None))
            if ahead is not None:
                await ahead.handled.wait()
            await super().process_update(update, coroutine)  # within the concurrency limit
        finally:
            place.settled.set()
            place.handled.set()
            if self._last.get(key) is place:  # the chat's line is empty
                del self._last[key]

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        await coroutine

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


@dataclass
class _Place:
    """An update's place in its chat's line: `settled` once later updates may be admitted, `handled` once done."""

    settled: asyncio.Event = field(default_factory=asyncio.Event)
    handled: asyncio.Event = field(default_factory=asyncio.Event)
