"""Surviving Telegram's failures: Bot API calls retried through network errors, updates of one chat in order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
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
    """Updates of different chats run concurrently; those of one chat one after another, in arrival order.

    The application creates one task per update in arrival order and each reaches the chat's lock without
    yielding before it, and asyncio locks are FIFO: so a chat's updates are handled in the order they came.
    """

    def __init__(self, max_concurrent_updates: int) -> None:
        super().__init__(max_concurrent_updates)
        self._locks: dict[int, asyncio.Lock] = {}
        self._users: dict[int, int] = {}

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        key = chat_key(update)
        if key is None:
            await coroutine
            return
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                await coroutine
        finally:
            self._users[key] -= 1
            if not self._users[key]:  # nobody waits on this chat: forget its lock
                del self._users[key], self._locks[key]

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass
