"""Chatwoot as a channel: an agent-bot webhook in, replies out through Chatwoot's REST API, human handoff.

Set-up in Chatwoot: create an agent bot whose webhook URL is `https://<rapport>/integrations/chatwoot/webhook`
and connect it to an inbox; give Rapport the bot's access token (`RAPPORT_CHATWOOT_BOT_TOKEN`) and the installation's
URL (`RAPPORT_CHATWOOT_BASE_URL`). Each delivery must prove the shared secret (`RAPPORT_CHATWOOT_WEBHOOK_SECRET`):
signed, `X-Chatwoot-Signature: sha256=<hex HMAC-SHA256 of "<X-Chatwoot-Timestamp>.<body>">` (or of the body alone
without a timestamp; a timestamp more than 5 minutes off is refused), or the secret itself in `X-Rapport-Token`
(a proxy in front can add it). `?token=<secret>` in the URL is accepted only with `RAPPORT_CHATWOOT_QUERY_TOKEN=true`:
a query string ends up in access logs.

Events handled (Chatwoot's agent-bot payloads, `Message#webhook_data` and the conversation's):
- `message_created`, `message_type: "incoming"` from a contact: the customer speaks. The bot answers
  with `POST /api/v1/accounts/{account}/conversations/{id}/messages`, unless a person has the
  conversation. The message is on disk (a pending turn, its Chatwoot id claimed with it) before the webhook
  answers 200, so a redelivery never produces a second reply and a crash never loses the message: a reply
  a dead process left unfinished is closed and the customer told once, by the next process to start. Beyond
  `RAPPORT_MAX_QUEUE` turns in flight the message is taken all the same and handed to a person.
- `message_created`, `"outgoing"` from a `user` (a human agent), not private: recorded as the agent's
  turn for the learning loop, and the bot stays silent from then on. The bot's own messages (sender
  type `agent_bot`), private notes and activity messages are ignored, so replies never loop.
- `conversation_status_changed` / `conversation_updated` / `conversation_resolved` with status
  `pending` or `resolved`: the conversation goes back to the bot.
On handoff the bot posts a private note summarising the conversation and sets the status to `open`.

Rapport ids: conversation `chatwoot:<account>:<conversation>`, user `chatwoot:<account>:<contact>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import weakref
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException, Request

from dialogue.errors import AlreadyHandled, InvalidInput, RapportError
from dialogue.handoff import HandoffDesk, HandoffEvent
from dialogue.manager import DialogueManager, interrupted_notice
from dialogue.store import TranscriptStore, Turn

logger = logging.getLogger(__name__)

CHANNEL = "chatwoot"
RESUME_STATUSES = ("pending", "resolved")
SIGNATURE_TOLERANCE_S = 300
DRAIN_S = 30.0  # on shutdown, how long replies being made may take to finish


class ChatwootApi:
    """The few Chatwoot REST calls the bot makes, authenticated with the bot's `api_access_token`."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0) -> None:
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout,
                                        headers={"api_access_token": token})

    async def post_message(self, account_id: int, conversation_id: int, content: str, *, private: bool = False) -> None:
        response = await self.client.post(f"/api/v1/accounts/{account_id}/conversations/{conversation_id}/messages",
                                          json={"content": content, "message_type": "outgoing", "private": private})
        response.raise_for_status()

    async def set_status(self, account_id: int, conversation_id: int, status: str) -> None:
        response = await self.client.post(
            f"/api/v1/accounts/{account_id}/conversations/{conversation_id}/toggle_status", json={"status": status})
        response.raise_for_status()

    async def aclose(self) -> None:
        await self.client.aclose()


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value)
    return None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def conversation_key(account_id: int, conversation_id: int) -> str:
    return f"{CHANNEL}:{account_id}:{conversation_id}"


def parse_key(rapport_id: str) -> tuple[int, int] | None:
    """(account, conversation) from a Rapport conversation id made by `conversation_key`."""
    parts = rapport_id.split(":")
    if len(parts) == 3 and parts[0] == CHANNEL and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


def ids_of(payload: dict) -> tuple[int | None, int | None]:
    """(account id, conversation display id) from a message or conversation payload."""
    conversation = _dict(payload.get("conversation")) or payload
    account = (_int(_dict(payload.get("account")).get("id")) or _int(payload.get("account_id"))
               or _int(conversation.get("account_id")))
    return account, _int(conversation.get("id") if payload.get("conversation") else payload.get("id"))


class ChatwootBot:
    """Turns Chatwoot webhook events into dialogue turns and handoffs."""

    def __init__(self, manager: DialogueManager, store: TranscriptStore, desk: HandoffDesk, api: ChatwootApi, *,
                 secret: str, query_token: bool = False) -> None:
        if not secret:
            raise ValueError("the Chatwoot webhook needs a shared secret")
        self.manager = manager
        self.store = store
        self.desk = desk
        self.api = api
        self.secret = secret.encode()
        self.query_token = query_token
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task] = set()
        self._inflight: dict[str, tuple[int, int, str]] = {}  # turn id -> (account, conversation, text) being answered
        self._sweeper: asyncio.Task | None = None
        self.drain_s = DRAIN_S

    # -- the webhook -----------------------------------------------------------------------------

    def router(self) -> APIRouter:
        router = APIRouter(tags=["integrations"])

        @router.post("/integrations/chatwoot/webhook")
        async def chatwoot_webhook(request: Request) -> dict:
            """Chatwoot agent-bot events, signed with the shared secret (X-Chatwoot-Signature) or carrying it."""
            body = await request.body()
            self.verify_request(request, body)
            try:
                payload = json.loads(body)
            except ValueError:
                raise HTTPException(400, "body is not JSON") from None
            except RecursionError:  # nested deeper than the parser goes: no Chatwoot event looks like that
                raise HTTPException(400, "body is nested too deeply") from None
            if not isinstance(payload, dict):
                raise HTTPException(400, "body is not a JSON object")
            accepted = await self.accept(payload)
            return {"ok": True, "accepted": accepted}

        return router

    def verify_request(self, request: Request, body: bytes) -> None:
        """401 unless the delivery is signed with the secret or carries it (header; query only when allowed)."""
        signature = request.headers.get("x-chatwoot-signature")
        if signature:
            stamp = request.headers.get("x-chatwoot-timestamp")
            if stamp is not None:
                if not stamp.isdigit() or abs(time.time() - int(stamp)) > SIGNATURE_TOLERANCE_S:
                    raise HTTPException(401, "webhook timestamp missing or too far off")
                signed = stamp.encode() + b"." + body
            else:
                signed = body
            expected = "sha256=" + hmac.new(self.secret, signed, hashlib.sha256).hexdigest()
            if hmac.compare_digest(signature.strip().encode("utf-8", "surrogateescape"), expected.encode()):
                return
            raise HTTPException(401, "bad webhook signature")
        token = request.headers.get("x-rapport-token") or ""
        if not token and "token" in request.query_params:
            if not self.query_token:  # an installation set up before signatures: say what to change
                logger.warning("a Chatwoot delivery carried the secret as ?token= and was refused: sign deliveries, "
                               "send X-Rapport-Token, or set RAPPORT_CHATWOOT_QUERY_TOKEN=true")
                raise HTTPException(401, "the webhook secret in the query string is not accepted here")
            token = request.query_params.get("token") or ""
        self.verify(token)

    def verify(self, token: str) -> None:
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self.secret):
            raise HTTPException(401, "bad or missing webhook token")

    async def accept(self, payload: dict) -> bool:
        """Decide quickly (Chatwoot waits for the answer); the slow work runs in the background."""
        event = payload.get("event")
        if event == "message_created":
            job = await self._message_job(payload)
        elif event in ("conversation_status_changed", "conversation_updated", "conversation_resolved"):
            job = self._status_job(payload)
        else:
            job = None
        if job is None:
            return False
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, job) -> None:
        try:
            await job
        except (RapportError, httpx.HTTPError) as exc:
            logger.warning("chatwoot event failed: %s: %s", exc.__class__.__name__, exc)
        except Exception:
            logger.exception("chatwoot event failed")

    async def drain(self) -> None:
        """Wait for events still being handled (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.desk.drain()

    # -- start and shutdown ----------------------------------------------------------------------

    async def start(self) -> None:
        """Tell customers whose reply a dead process left unfinished, now and every lease period."""
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        """Let replies being made finish (up to `drain_s`); the rest are cut and their customers told."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            await asyncio.wait_for(self.drain(), self.drain_s)
        except TimeoutError:
            logger.warning("%d chatwoot events still running after %.0f s; cutting them", len(self._tasks),
                           self.drain_s)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for turn_id, (account, conversation, text) in list(self._inflight.items()):  # cut before their reply
            await self._tell_interrupted(account, conversation, text)
            self._inflight.pop(turn_id, None)

    async def tell_interrupted(self) -> int:
        """Close the turns of dead processes and tell each customer once; returns how many."""
        turns = await asyncio.to_thread(self.manager.close_abandoned, channels={CHANNEL})
        for turn in turns:
            ids = parse_key(turn.conversation_id)
            if ids is not None:
                await self._tell_interrupted(*ids, turn.user_text)
        return len(turns)

    async def _tell_interrupted(self, account: int, conversation: int, text: str) -> None:
        try:
            await self.api.post_message(account, conversation, interrupted_notice(text))
        except httpx.HTTPError as exc:
            logger.warning("could not tell chatwoot conversation %s:%s of an interrupted reply: %s",
                           account, conversation, exc)

    async def _sweep(self) -> None:
        while True:
            try:
                await self.tell_interrupted()
            except RapportError as exc:
                logger.warning("could not look for interrupted chatwoot turns: %s", exc)
            await asyncio.sleep(self.manager.settings.turn_lease_s)

    # -- messages --------------------------------------------------------------------------------

    async def _message_job(self, payload: dict):
        account, conversation = ids_of(payload)
        message_id = _int(payload.get("id"))
        content = payload.get("content")
        sender_type = _dict(payload.get("sender")).get("type")
        if None in (account, conversation, message_id) or payload.get("private") is True:
            return None
        if not isinstance(content, str) or not content.strip():
            return None  # attachments only, or a card: nothing to answer
        kind, event_id = payload.get("message_type"), f"{account}:{message_id}"
        if kind == "incoming" and sender_type in (None, "contact"):
            contact = _int(_dict(payload.get("sender")).get("id")) or _int(
                _dict(_dict(payload.get("conversation")).get("contact_inbox")).get("contact_id"))
            if contact is None:
                return None
            try:  # on disk before Chatwoot hears 200
                # Beyond the queue cap the message is still taken, and the gate gives it to a person (a handover
                # line, a note, the conversation open in the agents' queue) instead of a 503: Chatwoot does not
                # reliably deliver a webhook again, a customer in a chat widget does not resend, and Chatwoot is
                # where the people are, so the customer is answered for certain without adding to the model's load.
                pending = await self.manager.receive(user_id=f"{CHANNEL}:{account}:{contact}",
                                                     conversation_id=conversation_key(account, conversation),
                                                     text=content, channel=CHANNEL, event_id=event_id,
                                                     refuse_when_busy=False)
            except AlreadyHandled:
                logger.info("chatwoot message %s already handled", event_id)
                return None
            except InvalidInput as exc:  # too long, say: the customer is told why, in their conversation
                return self.api.post_message(account, conversation, f"Sorry, I can't take that message: {exc}.")
            return self.on_customer_message(account, conversation, pending)
        if kind == "outgoing" and sender_type == "user":
            if not await asyncio.to_thread(self.store.claim_event, channel=CHANNEL, event_id=event_id):
                logger.info("chatwoot message %s already handled", event_id)
                return None
            return self.on_agent_message(account, conversation, content)
        return None  # our own replies (agent_bot), activity and template messages: never answered

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def on_customer_message(self, account: int, conversation: int, pending: Turn) -> None:
        """Answer the customer's recorded message through the core's handoff gate (silent while a person has
        the conversation)."""
        key, user = pending.conversation_id, pending.user_id
        self._inflight[pending.id] = (account, conversation, pending.user_text)
        try:
            async with self._lock(key):
                try:
                    reply = await self.manager.respond(user_id=user, conversation_id=key, text=pending.user_text,
                                                       channel=CHANNEL, pending=pending)
                except InvalidInput as exc:  # too long for the budget: the customer is told why
                    reply = None
                    await self.api.post_message(account, conversation, f"Sorry, I can't take that message: {exc}.")
                if reply is not None:
                    await self._answer(account, conversation, user, reply)
        except asyncio.CancelledError:  # cut by shutdown before the reply went out: `stop` tells the customer
            raise
        except BaseException:
            self._inflight.pop(pending.id, None)
            raise
        else:
            self._inflight.pop(pending.id, None)

    async def _answer(self, account: int, conversation: int, user: str, reply) -> None:
        answer = await reply.complete()
        if answer.strip():
            await self.api.post_message(account, conversation, answer)
        elif not reply.handoff:  # a blank model reply would leave the customer unanswered: get a person
            await self.desk.hand_off(conversation_id=reply.conversation_id, user_id=user, turn_id=reply.turn_id,
                                     reason="no_answer")

    async def on_agent_message(self, account: int, conversation: int, text: str) -> None:
        """A person wrote to the customer: keep it as training gold, and keep the bot out of their way."""
        key = conversation_key(account, conversation)
        async with self._lock(key):
            if await asyncio.to_thread(self.store.get_conversation, key) is None:
                return  # a conversation the bot never saw: nothing to link the agent's words to
            if not await self.desk.is_handed_off(key):
                await asyncio.to_thread(self.store.set_status, conversation_id=key, status="human")
            await self.desk.record_agent_reply(conversation_id=key, text=text)

    # -- status and handoff ----------------------------------------------------------------------

    def _status_job(self, payload: dict):
        account, conversation = ids_of(payload)
        status = payload.get("status")
        if payload.get("event") == "conversation_resolved":
            status = "resolved"
        if None in (account, conversation) or status not in RESUME_STATUSES:
            return None
        return self.on_back_to_bot(account, conversation)

    async def on_back_to_bot(self, account: int, conversation: int) -> None:
        key = conversation_key(account, conversation)
        async with self._lock(key):
            if await self.desk.is_handed_off(key):
                await self.desk.resume(key)


class ChatwootNotes:
    """Handoff listener: for Chatwoot conversations, a private note for the agent and the status `open`."""

    def __init__(self, api: ChatwootApi) -> None:
        self.api = api

    async def __call__(self, event: HandoffEvent) -> None:
        ids = parse_key(event.conversation_id)
        if ids is None:
            return
        account, conversation = ids
        await self.api.post_message(account, conversation, event.summary, private=True)
        await self.api.set_status(account, conversation, "open")
