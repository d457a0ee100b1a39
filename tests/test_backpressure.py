"""Back-pressure: a capped queue answers 503 with Retry-After, a left client's reply is cancelled, bounded labels."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from bot.http.app import create_app
from bot.services import open_services
from test_api import LiveServer, wait_for

pytestmark = pytest.mark.timeout(120)


class SlowBackend:
    """The real backend whose replies start after `delay_s` (a busy model, as far as a client can tell)."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s, self.generations = inner, delay_s, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, *args, **kwargs):
        generation = await self.inner.generate(*args, **kwargs)
        self.generations.append(generation)
        return SlowGeneration(generation, self.delay_s)


class SlowGeneration:
    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def __aiter__(self):
        try:
            await asyncio.sleep(self.delay_s)
            async for piece in self.inner:
                yield piece
        finally:
            self.inner.cancel()


@pytest.fixture
def services(tiny_settings):
    opened = open_services(tiny_settings.model_copy(update={"max_queue": 2}))
    opened.backend.worker.wait_ready(60)
    yield opened
    opened.close()


@pytest.fixture
def live(services):
    with LiveServer(create_app(services, open_api=True)) as server:  # `serve --open`
        yield server


def say(live, text, *, conversation="c1", timeout=30.0, **extra) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/conversations/{conversation}/messages",
                      json={"user_id": "u1", "text": text, **extra}, timeout=timeout)


def test_beyond_the_queue_cap_a_message_gets_503_with_retry_after_and_nothing_is_taken(services, live):
    waiting = [asyncio.run(services.manager.respond(user_id="u2", conversation_id=f"w{i}", text="Hello!"))
               for i in range(2)]  # two turns being answered: the cap
    refused = say(live, "Hello?")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5" and "busy" in refused.json()["error"]
    assert services.store.export_user("u1")["turns"] == []  # refused before it was taken: a retry is clean
    for reply in waiting:
        asyncio.run(reply.complete())
    assert say(live, "Hello?").status_code == 200


def test_a_non_streamed_reply_whose_client_left_is_cancelled(services, live):
    slow = SlowBackend(services.backend, delay_s=20)
    services.manager.backend = slow
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        say(live, "Hello!", timeout=1.5)  # the client gives up
    wait_for(lambda: [t for t in services.store.export_user("u1")["turns"] if t["finish_reason"] == "interrupted"], 10)
    assert time.monotonic() - started < 10  # long before the reply would have been made
    assert slow.generations and slow.generations[0].cancelled  # its model slot is freed
    wait_for(lambda: services.manager.leases.held() == [], 5)  # released just after the row is written
    assert services.manager.leases.held() == []


def test_the_channel_label_takes_known_values_only(live):
    for channel in ("api", "zz-made-up-1", "zz-made-up-2"):
        assert say(live, "Hello!", channel=channel).status_code == 200
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'channel="api"' in metrics and 'channel="other"' in metrics and "zz-made-up" not in metrics
