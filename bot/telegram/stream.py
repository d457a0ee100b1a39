"""A reply shown while it is generated: sent at the first words, edited as more arrive, split past 4096."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from telegram import Bot, InlineKeyboardMarkup, Message, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest

from bot.telegram.format import split_message, to_html

logger = logging.getLogger(__name__)

TYPING_EVERY_S = 4.5  # Telegram shows "typing…" for 5 s per action


class ReplyStream:
    """One reply in one chat: at most one send or edit per `interval` seconds while text arrives."""

    def __init__(self, bot: Bot, chat_id: int, *, interval: float = 1.0, reply_to: int | None = None,
                 thread_id: int | None = None) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.interval = interval
        self.reply_to = reply_to
        self.thread_id = thread_id
        self.messages: list[Message] = []  # every message of this reply, the one being edited last
        self.plain = False  # Telegram refused our HTML once: plain text from then on
        self._rest = ""  # text of the message being written (earlier pieces are final)
        self._shown: str | None = None  # what that message shows now
        self._open = False  # whether the last of `messages` is still being written
        self._last = 0.0
        self.started = asyncio.Event()  # set when the first message is out

    async def add(self, chunk: str) -> None:
        """Take more text; shows it when the last update is at least `interval` old."""
        self._rest += chunk
        if time.monotonic() - self._last >= self.interval and self._rest.strip():
            await self._flush()

    async def finish(self, markup: InlineKeyboardMarkup | None = None, *, empty: str = "…") -> list[Message]:
        """Show the whole text with `markup` under its last piece; returns the messages of the reply."""
        if not self._rest.strip() and not self._open:
            self._rest = empty
        await self._flush(markup=markup, final=True)
        return self.messages

    async def _flush(self, *, markup: InlineKeyboardMarkup | None = None, final: bool = False) -> None:
        pieces = split_message(self._rest)
        for piece in pieces[:-1]:  # these are complete: show them whole and move on to a new message
            await self._show(piece)
            self._open, self._shown = False, None
        self._rest = pieces[-1]
        await self._show(self._rest, markup=markup, final=final)
        self._last = time.monotonic()

    async def _show(self, text: str, *, markup: InlineKeyboardMarkup | None = None, final: bool = False) -> None:
        if not text.strip():
            return
        rendered = text if self.plain else to_html(text)
        if self._open and rendered == self._shown:
            if markup is not None:
                await self.bot.edit_message_reply_markup(self.chat_id, self.messages[-1].message_id, reply_markup=markup)
            return
        try:
            await self._send_or_edit(rendered, markup, parse_mode=None if self.plain else ParseMode.HTML)
        except BadRequest as exc:
            if "can't parse entities" not in exc.message.lower() or self.plain:
                raise
            logger.warning("Telegram refused the markup (%s); sending plain text", exc.message)
            self.plain, rendered = True, text
            await self._send_or_edit(text, markup, parse_mode=None)
        self._shown = rendered

    async def _send_or_edit(self, text: str, markup: InlineKeyboardMarkup | None, *, parse_mode: str | None) -> None:
        if self._open:
            try:
                await self.bot.edit_message_text(text, self.chat_id, self.messages[-1].message_id, parse_mode=parse_mode,
                                                 reply_markup=markup)
                return
            except BadRequest as exc:
                if "not modified" in exc.message.lower():
                    return
                if "not found" not in exc.message.lower():
                    raise
                logger.info("the message being streamed was deleted; continuing in a new one")
                self.messages.pop()
                self._open = False
        reply = ReplyParameters(self.reply_to, allow_sending_without_reply=True) if self.reply_to else None
        message = await self.bot.send_message(self.chat_id, text, parse_mode=parse_mode, reply_markup=markup,
                                              reply_parameters=reply if not self.messages else None,
                                              message_thread_id=self.thread_id)
        self.messages.append(message)
        self._open = True
        self.started.set()


async def keep_typing(bot: Bot, chat_id: int, until: asyncio.Event, *, thread_id: int | None = None) -> None:
    """Show "typing…" until `until` is set; a failed action is only cosmetic."""
    while not until.is_set():
        try:
            await bot.send_chat_action(chat_id, ChatAction.TYPING, message_thread_id=thread_id)
        except Exception as exc:  # noqa: BLE001 — a missing typing bubble must not fail the reply
            logger.debug("typing action failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), TYPING_EVERY_S)
