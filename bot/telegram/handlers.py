"""The Telegram channel: a python-telegram-bot `Application` whose handlers turn updates into dialogue calls.

Each update is handled once: a text message is claimed together with its pending turn, recorded as it arrives
(`on_arrival`: before it waits behind its chat's earlier replies, since the library has confirmed it to Telegram
by then), every other update before it is handled, so a redelivery after a crash is dropped and a message is
never lost to a crash. Updates of one chat are handled in order, different chats concurrently. On
start, and every lease period after, messages whose reply a dead process left unfinished are closed and
their users told once. Users are `telegram:<id>`, so
memory and persona follow the person across chats; a conversation is per chat (per person in a group).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlparse

from telegram import (
    BotCommand,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    MessageEntity,
    Update,
    User,
)
from telegram.constants import ChatType
from telegram.error import Forbidden, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from bot.commands import COMMANDS as SHARED_COMMANDS
from bot.commands import Commands, help_text
from bot.services import Services
from bot.telegram.format import escape, scrub, split_message
from bot.telegram.net import ChatOrderedProcessor, RetryingRequest
from bot.telegram.stream import ReplyStream, keep_typing
from dialogue.errors import (AlreadyHandled, GenerationError, InvalidInput, NotFound, Overloaded, RapportError,
                             StoreUnavailable)
from dialogue.manager import HandedOff, Reply, interrupted_notice
from dialogue.store import Turn

logger = logging.getLogger(__name__)

CHANNEL = "telegram"
TELEGRAM_COMMANDS = ("start", "help", "new", "rate", "persona", "memory", "forget", "sources", "export", "delete_me")
COMMANDS = [(name, SHARED_COMMANDS[name].summary) for name in TELEGRAM_COMMANDS]  # what setMyCommands lists
GREETING = (
    "Hi{name}! I'm Rapport, a personal assistant. Just write to me; /help lists what else I can do.\n\n"
    "<b>Privacy.</b> I keep our conversations, the ratings you give my replies (they teach the next version "
    "of me), what I learn about you (your name, how you like to be answered, facts you tell me) and memories "
    "from past chats, so I can answer better next time. /persona and /memory show what I know, /forget removes "
    "memories, /export sends you everything as a file, and /delete_me erases all of it."
)
HELP = ("Write to me and I answer; in groups, mention me or reply to my message.\n"
        "Under each reply, 👍/👎 tell me how I did.\n\n" + help_text(TELEGRAM_COMMANDS))
ACK = {1: "👍 Thanks!", -1: "👎 Noted"}


@dataclass(frozen=True)
class Webhook:
    """Where Telegram posts updates (`url`) and where this process listens for them."""

    url: str
    listen: str = "127.0.0.1"
    port: int = 8443
    secret: str | None = None

    @property
    def path(self) -> str:
        return urlparse(self.url).path.strip("/")


def user_id_of(user: User) -> str:
    return f"{CHANNEL}:{user.id}"


def actor_of(update: Update) -> str:
    """Who really speaks: the chat a message is sent on behalf of (an anonymous group admin, a channel post: all
    share one fake sender, `sender_chat` tells them apart), else the user."""
    message = update.effective_message
    sender_chat = getattr(message, "sender_chat", None) if update.callback_query is None else None
    if sender_chat is not None:
        return f"{CHANNEL}:chat:{sender_chat.id}"
    return user_id_of(update.effective_user)


def scoped_user(update: Update) -> str:
    """The stored user id: the actor in a private chat; `actor@group` in a group, so that a group never sees the
    memories and profile of private chats (and a group's talk never lands in them)."""
    chat, actor = update.effective_chat, actor_of(update)
    if chat is None or chat.type == ChatType.PRIVATE:
        return actor
    return f"{actor}@{chat.id}"


def chat_of(conversation_id: str) -> str:
    """The chat of a Telegram conversation id: `telegram:<chat>:<n>` (private) or `<actor>@<chat>:<n>` (group)."""
    scope = conversation_id.rsplit(":", 1)[0]
    return scope.rsplit("@", 1)[1] if "@" in scope else scope.split(":")[1]


def rating_buttons(turn_id: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("👍", callback_data=f"rate:{turn_id}:1"),
                                  InlineKeyboardButton("👎", callback_data=f"rate:{turn_id}:-1")]])


def addressed_to_bot(message: Message, bot_id: int, username: str | None) -> bool:
    """Private chats always; in groups, a reply to the bot or a mention of it."""
    if message.chat.type == ChatType.PRIVATE:
        return True
    replied = message.reply_to_message
    if replied is not None and replied.from_user is not None and replied.from_user.id == bot_id:
        return True
    for entity, text in message.parse_entities([MessageEntity.MENTION, MessageEntity.TEXT_MENTION]).items():
        if entity.type == MessageEntity.MENTION and username and text[1:].lower() == username.lower():
            return True
        if entity.type == MessageEntity.TEXT_MENTION and entity.user is not None and entity.user.id == bot_id:
            return True
    return False


class TelegramBot:
    """Rapport's handlers over one process's `Services`."""

    def __init__(self, services: Services, *, tidy: bool = True) -> None:
        self.services = services
        self.tidy = tidy  # run the process's repairs (`Services.tidy`); not beside the API, whose sweep does
        self.settings = services.settings
        self.allowed = {str(i) for i in self.settings.telegram_allowed_ids}
        self._conversations: dict[tuple[int, int], int] = {}  # (chat, user) -> current conversation number
        self._corrections: dict[tuple[int, int], str] = {}  # (chat, user) -> turn id a 👎 asked about
        self._last: dict[tuple[int, int], Reply] = {}  # (chat, user) -> the last reply, for /rate and /sources
        self._received: dict[int, Turn | RapportError] = {}  # update id -> what on_arrival made of its message
        self.commands = Commands(services)
        self.text_messages = filters.UpdateType.MESSAGE & filters.TEXT & ~filters.COMMAND  # on_message's updates

    # -- the application ----------------------------------------------------------------------

    def build_application(self, token: str, *, base_url: str | None = None) -> Application:
        s = self.settings
        builder = (
            Application.builder()
            .token(token)
            .rate_limiter(AIORateLimiter(max_retries=s.telegram_rate_limit_retries))
            .concurrent_updates(ChatOrderedProcessor(s.telegram_concurrency, admit=self.on_arrival))
            .request(RetryingRequest(retry_budget=s.telegram_retry_budget, connection_pool_size=s.telegram_concurrency + 8,
                                     read_timeout=15, write_timeout=30))
        )
        if base_url:
            builder = builder.base_url(base_url)
        app = builder.build()
        self.add_handlers(app)
        return app

    def add_handlers(self, app: Application) -> None:
        app.add_handler(TypeHandler(Update, self.on_update), group=-1)
        for name, callback in (("start", self.on_start), ("help", self.on_help), ("new", self.on_new),
                               ("rate", self.on_rate_command), ("persona", self.on_persona), ("memory", self.on_memory),
                               ("forget", self.on_forget), ("sources", self.on_sources), ("export", self.on_export),
                               ("delete_me", self.on_delete_me)):
            app.add_handler(CommandHandler(name, callback, filters=filters.UpdateType.MESSAGE))
        app.add_handler(MessageHandler(self.text_messages, self.on_message))
        app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.ChatType.PRIVATE & ~filters.TEXT,
                                       self.on_not_text))
        app.add_handler(CallbackQueryHandler(self.on_rating, pattern=r"^rate:"))
        app.add_handler(CallbackQueryHandler(self.on_correction_skipped, pattern=r"^skip$"))
        app.add_handler(CallbackQueryHandler(self.on_erase, pattern=r"^erase:"))
        app.add_handler(CallbackQueryHandler(self.on_quiet_button))
        app.add_error_handler(self.on_error)

    # -- every update first -----------------------------------------------------------------------

    async def on_arrival(self, update: object) -> bool:
        """Record a text message for the bot as a pending turn as it arrives, before it waits for its chat's earlier
        replies: the library confirms an update to Telegram with its next poll, and from then on the message exists
        only here. Its turn (or why it was refused, told in the chat's turn) waits for on_message in `_received`.
        False for commands and buttons: the chat's later messages are recorded once they are handled."""
        if not isinstance(update, Update) or not self.text_messages.check_update(update):
            return False
        if self.allowed and not self._is_allowed(update):
            return True
        chat, who = update.effective_chat, scoped_user(update)
        text = _text_for_bot(update, update.get_bot())
        if not text or (chat.id, who) in self._corrections:
            return True  # no turn (or a correction, perhaps): on_message decides in the chat's turn
        try:
            conversation_id = await self._current_conversation(chat.id, chat.type, who)
            self._received[update.update_id] = await self.services.manager.receive(
                user_id=who, conversation_id=conversation_id, text=text, channel=CHANNEL,
                event_id=str(update.update_id))
        except AlreadyHandled:  # a redelivery: on_update drops it
            pass
        except RapportError as exc:  # too long, too busy, the store down
            self._received[update.update_id] = exc
        return True

    async def on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Drop an update already handled (a redelivery) and anyone not on the allowlist."""
        store, event_id = self.services.store, str(update.update_id)
        try:
            if update.update_id in self._received:  # claimed by on_arrival, with its turn
                first = True
            elif self.text_messages.check_update(update):  # claimed with its turn, once the message is on disk
                first = not await asyncio.to_thread(store.event_claimed, channel=CHANNEL, event_id=event_id)
            else:
                first = await asyncio.to_thread(store.claim_event, channel=CHANNEL, event_id=event_id)
        except StoreUnavailable as exc:  # nothing can be answered or recorded: say so once, and stop here
            await self.on_error(update, _ErrorContext(exc, context.bot))
            raise ApplicationHandlerStop from exc
        if not first:
            logger.info("update %s was handled before; skipping it", update.update_id)
            raise ApplicationHandlerStop
        if self.allowed and not self._is_allowed(update):
            logger.info("update %s from a user or chat not on the allowlist", update.update_id)
            chat = update.effective_chat
            if chat is not None and chat.type == ChatType.PRIVATE and update.message is not None:
                await update.message.reply_text("Sorry, this assistant is private.")
            raise ApplicationHandlerStop

    def _is_allowed(self, update: Update) -> bool:
        ids = {str(x.id) for x in (update.effective_user, update.effective_chat) if x is not None}
        return bool(ids & self.allowed)

    # -- commands -------------------------------------------------------------------------------

    async def on_start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Greet and say what is kept and how to see and erase it."""
        user = update.effective_user
        name = f", {escape(user.first_name)}" if user and user.first_name else ""
        await update.effective_message.reply_html(GREETING.format(name=name))

    async def on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """List the commands."""
        await update.effective_message.reply_text(HELP)

    async def on_new(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Start a new conversation in this chat; memory and persona stay."""
        chat, who = update.effective_chat, scoped_user(update)
        number = await self._conversation_number(chat.id, chat.type, who) + 1
        conversation_id = self._conversation_id(chat.id, chat.type, who, number)
        await asyncio.to_thread(self.services.store.ensure_conversation, conversation_id=conversation_id,
                                user_id=who, channel=CHANNEL)
        self._conversations[(chat.id, who)] = number
        self._corrections.pop((chat.id, who), None)
        self._last.pop((chat.id, who), None)
        await update.effective_message.reply_text("Started a new conversation. I still remember you: /memory and "
                                                  "/persona show what I know.")

    async def on_persona(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Show the persona, or `/persona set key=value` to change one field (private chats only)."""
        if await self._private_only(update, "/persona"):
            await self._reply(update, await self.commands.persona(actor_of(update), _args(context)))

    async def on_memory(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """List what is remembered about the user (private chats only)."""
        if await self._private_only(update, "/memory"):
            await self._reply(update, await self.commands.memory(actor_of(update)))

    async def on_forget(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Forget one memory by id, or all of them (private chats only)."""
        if await self._private_only(update, "/forget"):
            await self._reply(update, await self.commands.forget(actor_of(update), _args(context)))

    async def on_rate_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """`/rate up|down [comment]` on the last reply in this chat (the buttons do the same)."""
        who = scoped_user(update)
        last = self._last.get((update.effective_chat.id, who))
        await self._reply(update, await self.commands.rate(who, last, _args(context)))

    async def on_sources(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Where the last reply in this chat came from."""
        await self._reply(update, self.commands.sources(self._last.get((update.effective_chat.id, scoped_user(update)))))

    async def on_export(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Send everything kept about the user as a JSON document (private chats only: never to a group)."""
        if not await self._private_only(update, "/export"):
            return
        user = update.effective_user
        payload = (await self.commands.export(actor_of(update))).encode()
        await update.effective_message.reply_document(
            InputFile(io.BytesIO(payload), filename=f"rapport-export-{user.id}.json"),
            caption="Everything I keep about you.")

    async def _private_only(self, update: Update, command: str) -> bool:
        """True in a private chat; in a group, a pointer to the private chat instead (what is kept stays private)."""
        if update.effective_chat.type == ChatType.PRIVATE:
            return True
        await update.effective_message.reply_text(f"{command} is answered only in a private chat with me: "
                                                  "what I keep about you stays between us.")
        return False

    async def _reply(self, update: Update, text: str) -> None:
        for piece in split_message(text):
            await update.effective_message.reply_text(piece)

    async def on_delete_me(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Ask for confirmation before erasing the user."""
        uid = update.effective_user.id
        buttons = InlineKeyboardMarkup([[InlineKeyboardButton("Yes, erase everything", callback_data=f"erase:yes:{uid}"),
                                         InlineKeyboardButton("Cancel", callback_data=f"erase:no:{uid}")]])
        await update.effective_message.reply_text(
            "This erases everything I keep about you: conversations, ratings, memories and persona. "
            "It cannot be undone.", reply_markup=buttons)

    # -- talking ----------------------------------------------------------------------------------

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Answer a text message with a streamed reply carrying 👍/👎 buttons."""
        message, chat = update.effective_message, update.effective_chat
        group = chat.type != ChatType.PRIVATE
        who = scoped_user(update)
        received = self._received.pop(update.update_id, None)
        if isinstance(received, RapportError):
            raise received  # refused as it arrived: on_error tells the user why
        if received is None:  # not recorded as it arrived: maybe no turn at all
            text = _text_for_bot(update, context.bot)
            if text is None:
                await self._claim(update)
                return
            pending = self._corrections.pop((chat.id, who), None)
            if pending and text:
                await self.services.manager.rate(turn_id=pending, rating=-1, user_id=who, correction=text)
                if await self._claim(update):
                    await message.reply_text("Thank you, I'll learn from that.", do_quote=group)
                return
            if not text:
                if await self._claim(update):
                    await message.reply_text("Yes? Ask me anything.", do_quote=group)
                return

        thread_id = message.message_thread_id if message.is_topic_message else None
        stream = ReplyStream(context.bot, chat.id, reply_to=message.message_id if group else None, thread_id=thread_id,
                             interval=self.settings.telegram_group_edit_interval if group else self.settings.telegram_edit_interval)
        typing = asyncio.create_task(keep_typing(context.bot, chat.id, stream.started, thread_id=thread_id))
        reply = None
        try:
            try:
                if received is None:
                    conversation_id = await self._current_conversation(chat.id, chat.type, who)
                else:
                    conversation_id, text = received.conversation_id, received.user_text
                reply = await self.services.manager.respond(user_id=who, conversation_id=conversation_id, text=text,
                                                            channel=CHANNEL, event_id=str(update.update_id),
                                                            pending=received)
            except AlreadyHandled:  # redelivered while its first delivery was being recorded
                logger.info("update %s was handled before; skipping it", update.update_id)
                return
            self._last[(chat.id, who)] = reply
            for notice in reply.notices:
                await context.bot.send_message(chat.id, notice, message_thread_id=thread_id)
            if isinstance(reply, HandedOff):  # the gate: a person has (or is now asked to take) this conversation
                if reply.text:  # the handover line; while a person has it, the bot stays silent
                    await message.reply_text(reply.text, do_quote=group)
                return
            async for chunk in reply:
                await stream.add(chunk)
            await stream.finish(rating_buttons(reply.turn_id), empty="(no reply)")
        finally:
            if reply is not None:
                reply.discard()  # never iterated (a notice failed to send): closed, not left pending
            stream.started.set()
            await typing

    async def _claim(self, update: Update) -> bool:
        """Claim a text message's update that makes no turn; False when it was handled before."""
        return await asyncio.to_thread(self.services.store.claim_event, channel=CHANNEL, event_id=str(update.update_id))

    async def tell_interrupted(self, bot) -> int:
        """Close the turns a dead process left unanswered and tell each user once; returns how many."""
        turns = await asyncio.to_thread(self.services.manager.close_abandoned, channels={CHANNEL})
        for turn in turns:
            chat_id = chat_of(turn.conversation_id)
            logger.info("turn %s was interrupted; telling chat %s", turn.id, chat_id)
            try:
                await bot.send_message(int(chat_id), interrupted_notice(turn.user_text))
            except (TelegramError, ValueError) as exc:
                logger.warning("could not tell chat %s about an interrupted reply: %s", chat_id, exc)
        return len(turns)

    async def sweep_interrupted(self, bot, stop: asyncio.Event) -> None:
        """`tell_interrupted` now and every lease period until `stop` (a dead process's lease runs out later)."""
        while not stop.is_set():
            try:
                await self.tell_interrupted(bot)
                if self.tidy:
                    await self.services.tidy()
            except RapportError as exc:
                logger.warning("could not look for interrupted turns: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.turn_lease_s)

    async def on_not_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Say politely that only text is read."""
        await update.effective_message.reply_text("I can only read text messages for now.")

    # -- buttons ----------------------------------------------------------------------------------

    async def on_rating(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Store a 👍/👎 for a turn, acknowledge it quietly, and after a 👎 ask what would have been better."""
        query, chat = update.callback_query, update.effective_chat
        try:
            _, turn_id, value = query.data.split(":")
            rating = int(value)
            await self.services.manager.rate(turn_id=turn_id, rating=rating, user_id=scoped_user(update))
        except (ValueError, InvalidInput, NotFound):
            await query.answer("Only the person I answered can rate this reply.")
            return
        await query.answer("Thanks for the feedback!")
        ack = InlineKeyboardMarkup([[InlineKeyboardButton(ACK[rating], callback_data="rated")]])
        with contextlib.suppress(TelegramError):  # the reply may be gone; the rating is stored anyway
            await query.edit_message_reply_markup(ack)
        if rating < 0 and chat is not None:
            self._corrections[(chat.id, scoped_user(update))] = turn_id
            skip = InlineKeyboardMarkup([[InlineKeyboardButton("Skip", callback_data="skip")]])
            where = " (reply to this message)" if chat.type != ChatType.PRIVATE else ""
            await context.bot.send_message(chat.id, f"What would have been a better reply? Your next message{where} "
                                           "is kept as a correction to learn from.", reply_markup=skip)

    async def on_correction_skipped(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Drop the pending correction question."""
        query = update.callback_query
        self._corrections.pop((update.effective_chat.id, scoped_user(update)), None)
        await query.answer("Okay.")
        with contextlib.suppress(TelegramError):
            await query.edit_message_reply_markup(None)

    async def on_erase(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Erase the user after they confirmed with the button; only they can press it."""
        query, user = update.callback_query, update.effective_user
        _, verdict, owner = (query.data.split(":") + ["", ""])[:3]
        if owner != str(user.id):
            await query.answer("This button is for someone else.")
            return
        await query.answer()
        if verdict != "yes":
            await query.edit_message_text("Nothing was erased.")
            return
        mine = (user_id_of(user), f"{user_id_of(user)}@")  # their private id and their group scopes
        scopes = await asyncio.to_thread(self.services.store.user_ids, prefix=mine[1])
        counts = await asyncio.to_thread(self.services.erase_user, mine[0])
        for scope in scopes:
            for kind, n in (await asyncio.to_thread(self.services.erase_user, scope)).items():
                counts[kind] = counts.get(kind, 0) + n
        for held in (self._conversations, self._corrections, self._last):
            for key in [k for k in held if k[1] == mine[0] or k[1].startswith(mine[1])]:
                del held[key]
        logger.info("erased %s: %s", user_id_of(user), counts)
        await query.edit_message_text("Done: everything I kept about you is erased.")

    async def on_quiet_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Answer a press on an acknowledgement or an outdated button so the client stops spinning."""
        await update.callback_query.answer()

    # -- errors -----------------------------------------------------------------------------------

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log the error and tell the user briefly; a RapportError's message is fit to show as is."""
        error = context.error
        if isinstance(error, Forbidden):  # the user blocked the bot or it left the group: nobody to tell
            logger.info("cannot write to chat of update %s: %s", getattr(update, "update_id", None), error)
            return
        if isinstance(error, GenerationError):
            logger.warning("generation failed: %s", error)
            text = "Sorry, I couldn't come up with a reply just now. Please try again."
        elif isinstance(error, StoreUnavailable):
            logger.error("a store is unavailable: %s", error)
            text = "Sorry, I can't reach my memory right now. Please try again in a moment."
        elif isinstance(error, Overloaded):  # not taken (Telegram has no person to hand it to): the user sends it again
            logger.warning("refused a message: %s", error)
            text = "Sorry, I'm answering a lot of messages right now. Please send that again in a moment."
        elif isinstance(error, RapportError):
            logger.info("refused: %s", error)
            text = str(error)
        else:
            logger.error("update %s failed", getattr(update, "update_id", None), exc_info=error)
            text = "Sorry, something went wrong on my side. Please try again in a moment."
        if not isinstance(update, Update) or update.effective_chat is None:
            return
        try:
            if update.callback_query is not None:
                await update.callback_query.answer(text[:200])
            else:
                await context.bot.send_message(update.effective_chat.id, text)
        except TelegramError as exc:
            logger.warning("could not tell the user about the error: %s", exc)

    # -- conversations ------------------------------------------------------------------------------

    @staticmethod
    def _conversation_id(chat_id: int, chat_type: str, who: str, number: int) -> str:
        """`telegram:<chat>:<n>` in a private chat; `<who>:<n>` (`telegram:<uid>@<group>:<n>`) in a group."""
        if chat_type == ChatType.PRIVATE:
            return f"{CHANNEL}:{chat_id}:{number}"
        return f"{who}:{number}"

    async def _current_conversation(self, chat_id: int, chat_type: str, user_id: str) -> str:
        return self._conversation_id(chat_id, chat_type, user_id, await self._conversation_number(chat_id, chat_type, user_id))

    async def _conversation_number(self, chat_id: int, chat_type: str, user_id: str) -> int:
        """The chat's current conversation number: remembered, else the highest in the store (so a restart
        continues the conversation), else 1."""
        key = (chat_id, user_id)
        if key not in self._conversations:
            prefix = self._conversation_id(chat_id, chat_type, user_id, 0)[:-1]
            self._conversations[key] = await asyncio.to_thread(self._latest_number, prefix, user_id)
        return self._conversations[key]

    def _latest_number(self, prefix: str, user_id: str) -> int:
        ids = self.services.store.conversation_ids(user_id=user_id, prefix=prefix)
        numbers = [int(i[len(prefix):]) for i in ids if i[len(prefix):].isdigit()]
        return max(numbers, default=1)


@dataclass
class _ErrorContext:
    """The part of a callback context `on_error` reads, for errors caught before a handler runs."""

    error: BaseException
    bot: object = None


def _text_for_bot(update: Update, bot) -> str | None:
    """A message's text, without the bot's @mention, when it is addressed to the bot; else None. (The core
    refuses an over-long one, saying the limit; on_error shows it.)"""
    message = update.effective_message
    if update.effective_user is None or not addressed_to_bot(message, bot.id, bot.username):
        return None
    text = scrub(message.text or "")
    if bot.username:
        text = re.sub(rf"@{re.escape(bot.username)}\b", "", text, flags=re.I)
    return text.strip()


def _args(context: ContextTypes.DEFAULT_TYPE) -> str:
    """What followed the command, made safe to store."""
    return scrub(" ".join(context.args or []))


# -- running ----------------------------------------------------------------------------------------


async def run_bot(bot: TelegramBot, token: str, *, base_url: str | None = None, webhook: Webhook | None = None,
                  stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Run until `stop` is set: polling, or a webhook server when `webhook` is given."""
    app = bot.build_application(token, base_url=base_url)
    allowed = [Update.MESSAGE, Update.CALLBACK_QUERY]
    async with app:  # getMe now; shut down cleanly however we leave
        await app.bot.set_my_commands([BotCommand(name, text) for name, text in COMMANDS])
        if webhook is not None:
            secret = webhook.secret or secrets.token_urlsafe(32)
            await app.updater.start_webhook(listen=webhook.listen, port=webhook.port, url_path=webhook.path,
                                            webhook_url=webhook.url, secret_token=secret, allowed_updates=allowed,
                                            drop_pending_updates=False)
        else:
            await app.updater.start_polling(allowed_updates=allowed, drop_pending_updates=False,
                                            error_callback=_log_polling_error)
        await app.start()
        logger.info("Telegram bot @%s is up (%s)", app.bot.username, "webhook" if webhook else "polling")
        sweeper = asyncio.create_task(bot.sweep_interrupted(app.bot, stop))
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            await app.updater.stop()
            await app.stop()
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper


class TelegramChannel:
    """The bot as a channel of `rapport serve --telegram`: polling in the API's event loop, started and stopped with
    the app (`app.state.channels`)."""

    def __init__(self, services, token: str, *, base_url: str | None = None) -> None:
        self.services, self.token, self.base_url = services, token, base_url
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Up once the Bot API answered (getMe); a start-up failure (a rejected token) is raised here."""
        ready = asyncio.Event()
        bot = TelegramBot(self.services, tidy=False)  # the API's sweep tidies this process
        self._task = asyncio.create_task(run_bot(bot, self.token, base_url=self.base_url, stop=self._stop, ready=ready))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({self._task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if self._task.done():
            self._task.result()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await self._task
            except Exception as exc:  # the bot's own failure: the API shuts down regardless
                logger.warning("the Telegram bot stopped with an error: %s", exc)


def _log_polling_error(error: TelegramError) -> None:
    logger.warning("polling for updates failed (%s); retrying", error)
