"""The generic handoff webhook: each `HandoffEvent` POSTed as JSON to the operators' URL.

With a secret, each delivery is signed the Standard Webhooks way (standardwebhooks.com): `webhook-id` (the same on
every retry, so the receiver drops duplicates), `webhook-timestamp` (Unix seconds: the receiver refuses old ones,
so a captured delivery cannot be replayed later) and `webhook-signature: v1,<base64 HMAC-SHA256 of
"<id>.<timestamp>.<body>">` (a `whsec_…` secret is base64, as the scheme's libraries expect). The older
`X-Rapport-Signature: sha256=<hex HMAC of the body>` is still sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid

import httpx

from dialogue.handoff import HandoffEvent

logger = logging.getLogger(__name__)


class WebhookNotifier:
    """POSTs each `HandoffEvent` as JSON to a URL; signs the body with HMAC-SHA256 when a secret is set."""

    def __init__(self, url: str, secret: str | None = None, *, timeout: float = 5.0, attempts: int = 3) -> None:
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.attempts = attempts

    async def __call__(self, event: HandoffEvent) -> None:
        body = json.dumps(event.to_json(), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "rapport-handoff/1"}
        if self.secret:
            digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Rapport-Signature"] = f"sha256={digest}"
            headers.update(standard_signature(self.secret, f"msg_{uuid.uuid4().hex}", int(time.time()), body))
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            for attempt in range(1, self.attempts + 1):
                try:
                    response = await client.post(self.url, content=body, headers=headers)
                    if response.status_code < 500:
                        if response.status_code >= 400:
                            logger.warning("handoff webhook refused the event: HTTP %s", response.status_code)
                        return
                except httpx.HTTPError as exc:
                    logger.warning("handoff webhook attempt %d failed: %s", attempt, exc.__class__.__name__)
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        logger.error("handoff webhook gave up on conversation %s", event.conversation_id)


def standard_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for one delivery."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    signed = f"{message_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{signature}"}
