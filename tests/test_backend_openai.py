"""The scale-out backend: generation on an OpenAI-compatible server, everything else in this process.

The end-to-end tests run against a real llama.cpp server (llama-cpp-python's, built once by `make
llama-server`) serving the embedded GGUF on 127.0.0.1; the request-shape tests use httpx's transport hook.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.compare import DEFAULT_PYTHON
from bot.services import open_backend
from dialogue.model.openai_backend import OpenAIBackend
from dialogue.errors import GenerationError
from dialogue.model.worker import AdapterRef, GenerationParams

LLAMA_PYTHON = os.environ.get("RAPPORT_TEST_LLAMA_PYTHON", str(DEFAULT_PYTHON))
PARAMS = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    """llama.cpp's OpenAI-compatible server on the embedded GGUF, on loopback, for this module."""
    from dialogue.model.files import embedded_gguf

    if not Path(LLAMA_PYTHON).exists():
        pytest.skip(f"llama-cpp-python is not installed at {LLAMA_PYTHON}: run `make llama-server`")
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "w")
    process = subprocess.Popen([LLAMA_PYTHON, "-m", "llama_cpp.server", "--model", str(embedded_gguf()),
                                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1",
                                "--model_alias", "smollm2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(300):
            if process.poll() is not None:
                pytest.fail(f"llama.cpp server exited with {process.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("llama.cpp server did not start in 60 s")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture
def remote_settings(real_home, llama_server):
    from dialogue.settings import Settings

    return Settings(home=real_home, backend="openai", backend_url=llama_server, backend_model="smollm2",
                    temperature=0.0, max_new_tokens=48)


@pytest.mark.e2e
async def test_a_turn_through_the_llama_cpp_server_is_streamed_and_recorded(remote_settings):
    from bot.services import open_services

    # a budget for a story of whole sentences: in 48 tokens llama.cpp's AVX2 build gave an opening and an unfinished
    # first sentence, which the length cut drops, so the reply came as one chunk
    services = open_services(remote_settings.model_copy(update={"max_new_tokens": 128}))
    try:
        assert isinstance(services.backend, OpenAIBackend)
        # a request for a story: a reply of several sentences, past the guard's held-back opening, so it streams
        # (a greeting of one or two sentences fits in the opening and comes as one chunk)
        reply = await services.manager.respond(user_id="lena", conversation_id="c1",
                                               text="Hi! My name is Lena. Tell me a short story about a bike.")
        chunks = [chunk async for chunk in reply]
        assert len(chunks) > 1 and reply.text.strip(), chunks
        turn = services.store.get_turn(reply.turn_id)
        assert turn.reply == reply.text and turn.completion_tokens > 0 and turn.prompt_tokens > 0
        assert turn.model_id == "smollm2"
        # Memory and persona stay in this process: the profile answers the name without the server.
        second = await services.manager.respond(user_id="lena", conversation_id="c1", text="What is my name?")
        assert "Lena" in await second.complete()
    finally:
        services.close()


@pytest.mark.e2e
async def test_a_consumer_that_stops_closes_the_stream(remote_settings):
    backend = open_backend(remote_settings)
    generation = await backend.generate([{"role": "user", "content": "Tell me a long story about a bike."}],
                                        GenerationParams(max_new_tokens=400, temperature=0.0))
    async for _ in generation:
        break
    for _ in range(100):  # the abandoned iterator is closed by the event loop's async-generator finaliser
        if generation._response.is_closed:
            break
        await asyncio.sleep(0.01)
    assert generation._response.is_closed
    again = await backend.generate([{"role": "user", "content": "Say hello."}], PARAMS)
    assert (await again.text()).strip()  # the server is free for the next request
    await backend._client.aclose()


def recording_backend(settings, answer: list[str], seen: list[dict], status: int = 200, usage: bool = True) -> OpenAIBackend:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "model not found"}})
        events = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in answer]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                       **({"usage": {"prompt_tokens": 11, "completion_tokens": len(answer)}} if usage else {})})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    backend = OpenAIBackend(settings)
    backend._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    backend._tokenizer = type("T", (), {"encode": staticmethod(lambda text, add_special_tokens=False: text.split())})()
    return backend


async def test_an_adapter_version_is_asked_for_by_its_registry_name(tiny_settings, tmp_path):
    settings = tiny_settings.model_copy(update={"backend": "openai", "backend_url": "http://127.0.0.1:9/v1",
                                                "backend_model": "smollm2"})
    seen: list[dict] = []
    backend = recording_backend(settings, ["Hel", "lo"], seen)
    plain = await backend.generate([{"role": "user", "content": "hi"}], PARAMS)
    assert await plain.text() == "Hello"
    assert (plain.finish_reason, plain.prompt_tokens, plain.completion_tokens) == ("length", 11, 2)
    tuned = await backend.generate([{"role": "user", "content": "hi"}], PARAMS, AdapterRef("v0002-1a2b3c4d", tmp_path))
    await tuned.text()
    assert [body["model"] for body in seen] == ["smollm2", "v0002-1a2b3c4d"]
    assert seen[0]["stream"] is True and seen[0]["max_tokens"] == 24 and seen[0]["temperature"] == 0.0


async def test_without_the_servers_usage_the_counts_are_estimated_here(tiny_settings):
    settings = tiny_settings.model_copy(update={"backend": "openai", "backend_url": "http://127.0.0.1:9/v1"})
    backend = recording_backend(settings, ["Hel", "lo", "!"], [], usage=False)
    generation = await backend.generate([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                        PARAMS)
    assert await generation.text() == "Hello!"
    assert (generation.prompt_tokens, generation.completion_tokens) == ((2 + 4) + (1 + 4), 3)


async def test_server_errors_become_generation_errors(tiny_settings):
    settings = tiny_settings.model_copy(update={"backend": "openai", "backend_url": f"http://127.0.0.1:{free_port()}/v1"})
    backend = OpenAIBackend(settings)
    with pytest.raises(GenerationError, match="unreachable"):
        await backend.generate([{"role": "user", "content": "hi"}], PARAMS)
    refusing = recording_backend(settings, [], [], status=404)
    with pytest.raises(GenerationError, match="404"):
        await refusing.generate([{"role": "user", "content": "hi"}], PARAMS)


def test_the_openai_backend_needs_a_url(tiny_settings):
    with pytest.raises(GenerationError, match="RAPPORT_BACKEND_URL"):
        open_backend(tiny_settings.model_copy(update={"backend": "openai", "backend_url": None}))
