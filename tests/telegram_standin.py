"""A stand-in Bot API server on 127.0.0.1 for the Telegram tests: the real python-telegram-bot client talks to it.

It keeps Telegram's contract where the bot could trip over it: long-polled getUpdates with offsets, HTML
that must parse, 4096 characters per message, "message is not modified", 64-byte callback data, 429 with
`retry_after`, 502 during an outage. Tests inject updates, script failures and read the calls it recorded.
"""

from __future__ import annotations

import asyncio
import email.parser
import html
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

JSON_FIELDS = {"chat_id", "message_id", "reply_markup", "commands", "entities", "allowed_updates", "reply_parameters",
               "offset", "limit", "timeout", "show_alert", "drop_pending_updates", "message_thread_id", "scope",
               "link_preview_options", "disable_notification", "max_connections", "cache_time"}
HTML_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "span", "tg-spoiler",
             "blockquote", "tg-emoji"}
TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s+[a-zA-Z-]+=\"[^\"]*\")*)\s*>")
ENTITY = re.compile(r"&(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")
MAX_TEXT = 4096


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def parse_html(text: str) -> str:
    """The visible text of Telegram-flavoured HTML, or ApiError 400 as Telegram words it."""
    visible: list[str] = []
    stack: list[str] = []
    pos = 0
    for match in TAG.finditer(text):
        visible.append(_plain(text[pos:match.start()]))
        closing, name = match.group(1), match.group(2).lower()
        if name not in HTML_TAGS:
            raise ApiError(400, f"Bad Request: can't parse entities: unsupported start tag \"{name}\"")
        if closing:
            if not stack or stack.pop() != name:
                raise ApiError(400, f"Bad Request: can't parse entities: can't find end tag corresponding to start tag \"{name}\"")
        else:
            stack.append(name)
        pos = match.end()
    visible.append(_plain(text[pos:]))
    if stack:
        raise ApiError(400, f"Bad Request: can't parse entities: can't find end tag corresponding to start tag \"{stack[-1]}\"")
    return "".join(visible)


def _plain(segment: str) -> str:
    if "<" in segment or ">" in segment:
        raise ApiError(400, "Bad Request: can't parse entities: unexpected character '<' or '>'")
    if "&" in ENTITY.sub("", segment):
        raise ApiError(400, "Bad Request: can't parse entities: unsupported HTML entity")
    return html.unescape(segment)


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float  # when it arrived
    status: int = 200
    done: float = 0.0  # when it was answered
    result: Any = None

    @property
    def message_id(self) -> int | None:
        """The message this call sent or edited."""
        if isinstance(self.result, dict) and "message_id" in self.result:
            return self.result["message_id"]
        return self.params.get("message_id")


@dataclass
class SentMessage:
    message_id: int
    chat_id: int
    text: str  # visible text, as a Telegram client shows it
    raw: str
    parse_mode: str | None
    reply_markup: dict | None
    reply_to: int | None
    edits: int = 0
    document: dict | None = None


@dataclass
class Failure:
    method: str
    times: int
    code: int = 429
    retry_after: int | None = None
    chat_id: int | None = None


@dataclass
class Delay:
    method: str
    seconds: float
    chat_id: int | None = None


@dataclass
class Standin:
    """The Bot API, as far as Rapport uses it."""

    token: str = "123:ABC"
    bot_id: int = 4242
    username: str = "rapport_test_bot"
    reject_html: bool = False
    calls: list[Call] = field(default_factory=list)
    messages: dict[int, SentMessage] = field(default_factory=dict)
    webhook: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._updates: list[dict] = []
        self._confirmed = 0  # updates below this id were confirmed by an offset and are gone
        self._next_update = 1
        self._next_message = 100
        self._next_query = 1
        self._failures: list[Failure] = []
        self._delays: list[Delay] = []
        self._outage_until = 0.0
        self._open_queries: set[str] = set()
        self.port = free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def start(self) -> Standin:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", interface="asgi3",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="bot-api-standin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the stand-in Bot API did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None

    # -- what tests inject ----------------------------------------------------------------------

    def user(self, user_id: int, name: str = "Ann") -> dict:
        return {"id": user_id, "is_bot": False, "first_name": name, "username": f"{name.lower()}{user_id}"}

    def chat(self, chat_id: int, chat_type: str = "private") -> dict:
        chat = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = "Ann"
        else:
            chat["title"] = "Test group"
        return chat

    def message(self, text: str | None, *, chat_id: int, user_id: int | None = None, chat_type: str = "private",
                reply_to: int | None = None, update_id: int | None = None, extra: dict | None = None) -> dict:
        """Inject a user's message (mention entities computed as Telegram does); returns the update."""
        user_id = user_id if user_id is not None else chat_id
        message: dict[str, Any] = {"message_id": self._new_message_id(), "date": int(time.time()),
                                   "chat": self.chat(chat_id, chat_type), "from": self.user(user_id)}
        if text is not None:
            message["text"] = text
            entities = _entities(text)
            if entities:
                message["entities"] = entities
        if reply_to is not None:
            sent = self.messages.get(reply_to)
            message["reply_to_message"] = {
                "message_id": reply_to, "date": int(time.time()), "chat": self.chat(chat_id, chat_type),
                "from": self.bot_user() if sent else self.user(user_id), "text": sent.text if sent else "earlier",
            }
        message.update(extra or {})
        return self.push({"message": message}, update_id=update_id)

    def press(self, message_id: int, data: str, *, user_id: int, chat_type: str = "private") -> dict:
        """Inject a press on an inline button of a message the bot sent."""
        sent = self.messages[message_id]
        query_id = f"q{self._next_query}"
        self._next_query += 1
        with self._lock:
            self._open_queries.add(query_id)
        query = {"id": query_id, "from": self.user(user_id), "chat_instance": str(sent.chat_id), "data": data,
                 "message": {"message_id": message_id, "date": int(time.time()), "chat": self.chat(sent.chat_id, chat_type),
                             "from": self.bot_user(), "text": sent.text}}
        return self.push({"callback_query": query})

    def push(self, update: dict, *, update_id: int | None = None) -> dict:
        with self._lock:
            if update_id is None:
                update_id = self._next_update
            self._next_update = max(self._next_update, update_id + 1)
            update = {"update_id": update_id, **update}
            self._updates.append(update)
        return update

    def delete(self, message_id: int) -> None:
        """The user deleted a message of the bot's: editing it fails from now on."""
        with self._lock:
            self.messages.pop(message_id, None)

    def confirmed(self, update: dict) -> bool:
        """True once the bot told Telegram it has `update` (a getUpdates offset past it): it is never sent again."""
        with self._lock:
            return self._confirmed > update["update_id"]

    def unconfirm(self) -> None:
        """As after a crash before the bot confirmed its offset: every update is delivered again."""
        with self._lock:
            self._confirmed = 0

    # -- scripted failures ----------------------------------------------------------------------

    def fail(self, method: str, times: int = 1, *, code: int = 429, retry_after: int | None = None,
             chat_id: int | None = None) -> None:
        with self._lock:
            self._failures.append(Failure(method, times, code, retry_after, chat_id))

    def undelay(self) -> None:
        """Calls answer at once again (every `delay` taken back)."""
        with self._lock:
            self._delays.clear()

    def delay(self, method: str, seconds: float, *, chat_id: int | None = None) -> None:
        with self._lock:
            self._delays.append(Delay(method, seconds, chat_id))

    def outage(self, seconds: float) -> None:
        """Every request gets 502 Bad Gateway for the next `seconds`."""
        self._outage_until = time.monotonic() + seconds

    def down(self, seconds: float) -> threading.Timer:
        """The server goes away (connections refused) and comes back on the same port after `seconds`."""
        self.stop()
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer

    # -- what tests read --------------------------------------------------------------------------

    def calls_to(self, method: str, chat_id: int | None = None, *, ok_only: bool = True) -> list[Call]:
        with self._lock:
            calls = list(self.calls)
        return [c for c in calls if c.method == method and (chat_id is None or c.params.get("chat_id") == chat_id)
                and (c.status == 200 or not ok_only)]

    def sent_to(self, chat_id: int) -> list[SentMessage]:
        with self._lock:
            return [m for m in self.messages.values() if m.chat_id == chat_id]

    async def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; calls: {[c.method for c in self.calls][-30:]}")

    def bot_user(self) -> dict:
        return {"id": self.bot_id, "is_bot": True, "first_name": "Rapport", "username": self.username}

    # -- the server -------------------------------------------------------------------------------

    async def app(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        parts = request.url.path.strip("/").split("/")
        if len(parts) != 2 or not parts[0].startswith("bot"):
            return await JSONResponse({"ok": False, "error_code": 404, "description": "Not Found"}, 404)(scope, receive, send)
        token, method = parts[0][3:], parts[1]
        params = await _read_params(request)
        call = Call(method, params, time.monotonic())
        with self._lock:
            self.calls.append(call)
        try:
            if token != self.token:
                raise ApiError(401, "Unauthorized")
            await self._before(method, params)
            handler = getattr(self, f"api_{method}", None)
            if handler is None:
                raise ApiError(404, "Not Found")
            result = await handler(params)
            body, status = {"ok": True, "result": result}, 200
            call.result = result
        except ApiError as exc:
            body = {"ok": False, "error_code": exc.code, "description": exc.description}
            if exc.parameters:
                body["parameters"] = exc.parameters
            status = exc.code
        call.status, call.done = status, time.monotonic()
        # ASCII-escaped like Telegram's own JSON, so even a lone surrogate in a message travels intact.
        await Response(json.dumps(body), status, media_type="application/json")(scope, receive, send)

    async def _before(self, method: str, params: dict) -> None:
        if time.monotonic() < self._outage_until:
            raise ApiError(502, "Bad Gateway")
        chat_id = params.get("chat_id")
        with self._lock:
            delays = [d for d in self._delays if d.method == method and d.chat_id in (None, chat_id)]
            failure = next((f for f in self._failures if f.method == method and f.times > 0
                            and f.chat_id in (None, chat_id)), None)
            if failure:
                failure.times -= 1
        for d in delays:
            await asyncio.sleep(d.seconds)
        if failure:
            if failure.code == 429:
                raise ApiError(429, f"Too Many Requests: retry after {failure.retry_after}",
                               {"retry_after": failure.retry_after})
            raise ApiError(failure.code, "Internal Server Error" if failure.code >= 500 else "Bad Request: scripted")

    # -- methods ------------------------------------------------------------------------------------

    async def api_getMe(self, params: dict) -> dict:
        return {**self.bot_user(), "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    async def api_deleteWebhook(self, params: dict) -> bool:
        self.webhook = {}
        return True

    async def api_setWebhook(self, params: dict) -> bool:
        if not str(params.get("url", "")).startswith(("https://", "http://")):
            raise ApiError(400, "Bad Request: bad webhook: invalid URL")
        self.webhook = dict(params)
        return True

    async def api_getWebhookInfo(self, params: dict) -> dict:
        return {"url": self.webhook.get("url", ""), "has_custom_certificate": False, "pending_update_count": 0}

    async def api_setMyCommands(self, params: dict) -> bool:
        for command in params.get("commands", []):
            if not re.fullmatch(r"[a-z0-9_]{1,32}", command["command"]) or not 1 <= len(command["description"]) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
        return True

    async def api_getUpdates(self, params: dict) -> list[dict]:
        offset, limit = int(params.get("offset") or 0), int(params.get("limit") or 100)
        deadline = time.monotonic() + float(params.get("timeout") or 0)
        while True:
            with self._lock:
                if offset:
                    self._confirmed = max(self._confirmed, offset)
                floor = max(offset, self._confirmed)
                ready = sorted((u for u in self._updates if u["update_id"] >= floor), key=lambda u: u["update_id"])
            if ready or time.monotonic() >= deadline or self._server is None or self._server.should_exit:
                return ready[:limit]
            await asyncio.sleep(0.02)

    async def api_sendChatAction(self, params: dict) -> bool:
        if params.get("action") not in ("typing", "upload_document"):
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    async def api_sendMessage(self, params: dict) -> dict:
        text, raw = self._checked_text(params)
        markup = self._checked_markup(params)
        reply_to = (params.get("reply_parameters") or {}).get("message_id")
        sent = SentMessage(self._new_message_id(), int(params["chat_id"]), text, raw, params.get("parse_mode"),
                           markup, reply_to)
        with self._lock:
            self.messages[sent.message_id] = sent
        return self._message_json(sent)

    async def api_editMessageText(self, params: dict) -> dict:
        sent = self._editable(params)
        text, raw = self._checked_text(params)
        markup = self._checked_markup(params)
        if text == sent.text and markup == sent.reply_markup:
            raise ApiError(400, "Bad Request: message is not modified: specified new message content and reply "
                                "markup are exactly the same as a current content and reply markup of the message")
        sent.text, sent.raw, sent.parse_mode, sent.reply_markup = text, raw, params.get("parse_mode"), markup
        sent.edits += 1
        return self._message_json(sent)

    async def api_editMessageReplyMarkup(self, params: dict) -> dict:
        sent = self._editable(params)
        markup = self._checked_markup(params)
        if markup == sent.reply_markup:
            raise ApiError(400, "Bad Request: message is not modified")
        sent.reply_markup = markup
        return self._message_json(sent)

    async def api_answerCallbackQuery(self, params: dict) -> bool:
        with self._lock:
            if params.get("callback_query_id") not in self._open_queries:
                raise ApiError(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
            self._open_queries.discard(params["callback_query_id"])
        if len(params.get("text") or "") > 200:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        return True

    async def api_sendDocument(self, params: dict) -> dict:
        document = params.get("document")
        if not isinstance(document, dict):
            raise ApiError(400, "Bad Request: there is no document in the request")
        sent = SentMessage(self._new_message_id(), int(params["chat_id"]), params.get("caption") or "", "",
                           None, None, None, document=document)
        with self._lock:
            self.messages[sent.message_id] = sent
        return {**self._message_json(sent), "document": {"file_id": f"f{sent.message_id}", "file_unique_id": "u",
                                                         "file_name": document["filename"],
                                                         "file_size": len(document["content"])}}

    # -- helpers ------------------------------------------------------------------------------------

    def _checked_text(self, params: dict) -> tuple[str, str]:
        raw = params.get("text") or ""
        if params.get("parse_mode") == "HTML":
            if self.reject_html:
                raise ApiError(400, "Bad Request: can't parse entities: unsupported start tag \"b\" at byte offset 0")
            text = parse_html(raw)
        elif params.get("parse_mode"):
            raise ApiError(400, "Bad Request: unsupported parse_mode")
        else:
            text = raw
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if utf16_len(text) > MAX_TEXT:
            raise ApiError(400, "Bad Request: message is too long")
        return text, raw

    def _checked_markup(self, params: dict) -> dict | None:
        markup = params.get("reply_markup")
        for row in (markup or {}).get("inline_keyboard", []):
            for button in row:
                if "callback_data" in button and not 1 <= len(button["callback_data"].encode()) <= 64:
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        return markup

    def _editable(self, params: dict) -> SentMessage:
        sent = self.messages.get(int(params.get("message_id") or 0))
        if sent is None or sent.chat_id != int(params.get("chat_id") or 0):
            raise ApiError(400, "Bad Request: message to edit not found")
        return sent

    def _message_json(self, sent: SentMessage) -> dict:
        chat_type = "private" if sent.chat_id > 0 else "supergroup"
        message = {"message_id": sent.message_id, "date": int(time.time()), "chat": self.chat(sent.chat_id, chat_type),
                   "from": self.bot_user()}
        if sent.text:
            message["text"] = sent.text
        if sent.reply_markup:
            message["reply_markup"] = sent.reply_markup
        return message

    def _new_message_id(self) -> int:
        with self._lock:
            self._next_message += 1
            return self._next_message


def _entities(text: str) -> list[dict]:
    """Mention and bot-command entities with UTF-16 offsets, as Telegram computes them."""
    entities = []
    for match in re.finditer(r"(?<![\w@/])(@[A-Za-z0-9_]{5,32}|/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{5,32})?)", text):
        kind = "mention" if match.group(1).startswith("@") else "bot_command"
        if kind == "bot_command" and match.start() != 0:
            continue
        entities.append({"type": kind, "offset": utf16_len(text[:match.start()]), "length": utf16_len(match.group(1))})
    return entities


async def _read_params(request: Request) -> dict[str, Any]:
    body = await request.body()
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        parsed = email.parser.BytesParser().parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + body)
        fields: dict[str, Any] = {}
        for part in parsed.get_payload():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True)
            fields[name] = {"filename": filename, "content": payload} if filename else payload.decode()
        pairs = [(k, v) for k, v in fields.items()]
    elif kind.startswith("application/json"):
        return json.loads(body or b"{}")
    else:
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
    params: dict[str, Any] = {}
    for key, value in pairs:
        params[key] = json.loads(value) if key in JSON_FIELDS and isinstance(value, str) else value
    # A file attached by name (attach://x) is resolved to its part.
    for key, value in list(params.items()):
        if isinstance(value, str) and value.startswith("attach://"):
            params[key] = dict(pairs).get(value[len("attach://"):])
    return params


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
