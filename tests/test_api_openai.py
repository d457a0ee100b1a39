"""The official `openai` client against a real uvicorn server on 127.0.0.1; streams that lose their client."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from bot.http.app import create_app
from bot.services import open_services
from test_api import LiveServer, free_port, wait_for

@pytest.fixture
def server(tiny_settings):
    """A server with one integration, `acme` (chat and memory): its ids live in the namespace `acme`."""
    services = open_services(tiny_settings)
    services.backend.worker.wait_ready(60)
    _, key = services.integrations.create("acme", scopes="chat,memory")
    with LiveServer(create_app(services)) as live:
        live.services, live.key = services, key
        yield live
    services.close()


def test_the_openai_client_works_unchanged_plain_and_streamed(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    completion = client.chat.completions.create(
        model="rapport", user="lena", messages=[{"role": "system", "content": "ignored"},
                                                {"role": "user", "content": "Hello! My name is Lena."}])
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    rapport = completion.model_extra["rapport"]
    assert set(rapport) >= {"turn_id", "sources", "adapter_version"}
    stored = server.services.store.get_turn(rapport["turn_id"])
    assert stored.user_id == "acme:lena" and stored.reply == choice.message.content and stored.channel == "openai"
    assert completion.usage.completion_tokens == stored.completion_tokens > 0

    stream = client.chat.completions.create(model="rapport", user="lena", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "What is my name?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    turn = server.services.store.get_turn(last.model_extra["rapport"]["turn_id"])
    assert turn.reply == text and turn.conversation_id == stored.conversation_id  # one running conversation per user
    assert chunks[-1].usage.completion_tokens == turn.completion_tokens


def test_conversation_header_and_auth_errors_through_the_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    completion = client.chat.completions.create(model="x", user="ana", extra_headers={"X-Conversation-ID": "support-42"},
                                                messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    stored = server.services.store.get_turn(completion.model_extra["rapport"]["turn_id"])
    assert (stored.conversation_id, stored.user_id) == ("acme:support-42", "acme:ana")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "\x00"}])
    assert [m.id for m in client.models.list()] == [server.services.backend.model_id]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(tiny_settings):
    settings = tiny_settings.model_copy(update={"max_new_tokens": 1500, "context_budget": 4096})
    services = open_services(settings)
    services.backend.worker.wait_ready(60)
    try:
        with LiveServer(create_app(services, open_api=True)) as live:
            with httpx.Client(base_url=live.url, timeout=30) as http:
                with http.stream("POST", "/v1/conversations/d1/messages",
                                 json={"user_id": "u1", "text": "Hello!", "stream": True}) as response:
                    assert response.status_code == 200
                    lines = response.iter_lines()
                    seen = [next(lines) for _ in range(6)]
                    assert any(line.startswith("data:") for line in seen)
                    assert services.backend.worker.queue_depth == 1
                # the connection is closed here, long before 1500 tokens
            wait_for(lambda: services.backend.worker.queue_depth == 0, timeout=10)
            wait_for(lambda: services.store.history(conversation_id="d1", user_id="u1"), timeout=5)
            turns = services.store.history(conversation_id="d1", user_id="u1")
            assert turns[-1].finish_reason == "cancelled" and 0 < turns[-1].completion_tokens < 1500
    finally:
        services.close()


@pytest.mark.e2e
def test_rapport_serve_on_the_real_model_with_the_openai_client(real_home):
    """`rapport serve` as a user runs it, the embedded SmolLM2, the official client, and curl-like calls."""
    port = free_port()
    env = {**os.environ, "RAPPORT_HOME": str(real_home), "RAPPORT_MAX_NEW_TOKENS": "32", "RAPPORT_TEMPERATURE": "0"}
    process = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--open", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "rapport serve did not become ready"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="rapport", user="e2e",
                                                    messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert completion.choices[0].message.content.strip()
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="rapport", user="e2e", stream=True, messages=[{"role": "user", "content": "Say hello."}]) if c.choices)
        assert streamed.strip()
        native = httpx.post(base + "/v1/conversations/e2e-1/messages", json={"user_id": "e2e", "text": "Hi!"}, timeout=60)
        assert native.status_code == 200 and native.json()["reply"].strip()
        metrics = httpx.get(base + "/metrics").text
        assert any(line.startswith("rapport_turns_total{") and 'channel="openai"' in line and 'adapter_version="base"'
                   in line for line in metrics.splitlines())  # labels come out sorted by name
    finally:
        process.terminate()
        process.wait(timeout=30)
