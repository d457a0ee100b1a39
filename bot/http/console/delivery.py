"""An agent's reply from the console, taken to the customer on the channel the conversation came from.

The reply is first recorded by the handoff desk (`HandoffDesk.record_agent_reply`: the training gold, linked to
the customer message it answers), then delivered: Chatwoot conversations through Chatwoot's REST API, Telegram
chats through the Bot API with `TELEGRAM_BOT_TOKEN` (at `RAPPORT_TELEGRAM_BASE_URL` when set), every other
channel (the HTTP API's integrations) as a
`conversation.agent_message` event POSTed to `RAPPORT_HANDOFF_WEBHOOK_URL`, signed like the handoff event.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from bot.http.chatwoot import parse_key
from bot.services import Services
from bot.telegram.handlers import chat_of
from dialogue.settings import reveal
from dialogue.store import Conversation, Turn

logger = logging.getLogger(__name__)


@dataclass
class AgentMessageEvent:
    """What the handoff webhook receives for an agent's reply (`to_json()` is the payload)."""

    conversation_id: str
    user_id: str
    channel: str
    turn_id: str
    text: str
    at: str

    def to_json(self) -> dict:
        return {"event": "conversation.agent_message", **asdict(self)}


async def deliver_agent_reply(services: Services, conversation: Conversation, text: str) -> tuple[Turn, str]:
    """Record the agent's reply, then send it to the customer; returns the turn and where it went ("" = nowhere:
    the channel has no way back configured, and the operator is told so)."""
    turn = await services.desk.record_agent_reply(conversation_id=conversation.id, text=text)
    settings = services.settings
    ids = parse_key(conversation.id)
    if conversation.channel == "chatwoot" and ids is not None and services.chatwoot is not None:
        await services.chatwoot.post_message(ids[0], ids[1], turn.reply)
        return turn, "chatwoot"
    if conversation.channel == "telegram" and settings.telegram_bot_token:
        from telegram import Bot

        base_url = settings.telegram_base_url or "https://api.telegram.org/bot"
        async with Bot(reveal(settings.telegram_bot_token), base_url=base_url) as bot:
            await bot.send_message(int(chat_of(conversation.id)), turn.reply)  # a private chat or a group
        return turn, "telegram"
    if services.webhook is not None:
        event = AgentMessageEvent(conversation_id=conversation.id, user_id=conversation.user_id,
                                  channel=conversation.channel, turn_id=turn.id, text=turn.reply,
                                  at=turn.created_at.isoformat())
        await services.webhook(event)
        return turn, "webhook"
    logger.warning("agent reply in %s recorded, but channel %s has no way back configured",
                   conversation.id, conversation.channel)
    return turn, ""
