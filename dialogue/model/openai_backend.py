"""Generation on an OpenAI-compatible server (vLLM, llama.cpp's server, ...): the scale-out backend.

Memory, FAQ, persona, transcripts and training stay in this process; only the tokens are made elsewhere.
An adapter version is asked for by its registry name as the request's `model` (vLLM `--enable-lora
--lora-modules v0003-1a2b3c4d=…/adapters/v0003`), the base model by `RAPPORT_BACKEND_MODEL`. Token counts
for the history budget come from the local tokenizer of the same model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import httpx

from dialogue.model.backend import Message, TokenizerText
from dialogue.errors import GenerationError
from dialogue.model.files import EMBEDDED_NAME, resolve_model_dir
from dialogue.model.worker import AdapterRef, GenerationParams
from dialogue.settings import Settings, reveal

logger = logging.getLogger(__name__)

FINISH = {"stop": "stop", "length": "length", "eos": "stop"}


class RemoteGeneration:
    """One streamed reply from the server; the same surface as the local `Generation`."""

    def __init__(self, response: httpx.Response, estimate_prompt_tokens: Callable[[], int], started: float) -> None:
        self._response = response
        self._estimate_prompt_tokens = estimate_prompt_tokens
        self._prompt_tokens: int | None = None  # the server's count, once its usage arrives
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.ttft_s: float | None = None
        self.reused_tokens = 0
        self.started_at = started

    @property
    def prompt_tokens(self) -> int:
        """The server's count; where it sends none, our tokenizer's estimate (counted once, only then)."""
        if self._prompt_tokens is None:
            self._prompt_tokens = self._estimate_prompt_tokens()
        return self._prompt_tokens

    def cancel(self) -> None:
        """Closing the stream tells the server to stop and frees its slot."""
        asyncio.ensure_future(self._response.aclose())

    async def __aiter__(self) -> AsyncIterator[str]:
        pieces = 0
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise GenerationError(f"the generation server sent an unreadable event: {data[:80]!r}") from None
                if chunk.get("error"):
                    raise GenerationError(f"the generation server failed: {chunk['error']}")
                usage = chunk.get("usage") or {}
                self._prompt_tokens = usage.get("prompt_tokens", self._prompt_tokens)
                self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        self.finish_reason = FINISH.get(choice["finish_reason"], choice["finish_reason"])
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if self.ttft_s is None:
                            self.ttft_s = time.perf_counter() - self.started_at
                        pieces += 1
                        yield text
        except httpx.HTTPError as exc:
            raise GenerationError(f"the generation server stopped answering: {exc}") from exc
        finally:
            await self._response.aclose()
        self.completion_tokens = self.completion_tokens or pieces
        self.finish_reason = self.finish_reason or "stop"

    async def text(self) -> str:
        return "".join([chunk async for chunk in self])


class OpenAIBackend(TokenizerText):
    """Sends each turn's messages to `RAPPORT_BACKEND_URL` (…/v1) as a streamed chat completion."""

    def __init__(self, settings: Settings) -> None:
        if not settings.backend_url:
            raise GenerationError("RAPPORT_BACKEND=openai needs RAPPORT_BACKEND_URL (e.g. http://127.0.0.1:8000/v1)")
        self.settings = settings
        self.url = settings.backend_url.rstrip("/")
        self.model_id = settings.backend_model or settings.model or EMBEDDED_NAME
        headers = {"Authorization": f"Bearer {reveal(settings.backend_api_key)}"} if settings.backend_api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(10.0, read=120.0))
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(self.settings.model, self.settings.models_dir))
        return self._tokenizer

    async def ready(self) -> None:
        await asyncio.to_thread(lambda: self.tokenizer)

    async def can_count(self) -> None:
        await self.ready()

    def is_ready(self) -> bool:
        return self._tokenizer is not None

    async def generate(self, messages: list[Message], params: GenerationParams,
                       adapter: AdapterRef | None = None) -> RemoteGeneration:
        await self.ready()
        body = {"model": adapter.name if adapter else self.model_id, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p,
                # Not in OpenAI's API; vLLM reads the first, llama.cpp's server the second.
                "repetition_penalty": params.repetition_penalty, "repeat_penalty": params.repetition_penalty}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.banned_token_ids:
            body["logit_bias"] = {str(token): -100 for token in params.banned_token_ids}
        started = time.perf_counter()
        try:
            request = self._client.build_request("POST", f"{self.url}/chat/completions", json=body)
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise GenerationError(f"the generation server at {self.url} is unreachable: {exc}") from exc
        if response.status_code != 200:
            detail = (await response.aread()).decode("utf-8", "replace")[:200]
            await response.aclose()
            raise GenerationError(f"the generation server answered {response.status_code}: {detail}")
        return RemoteGeneration(response, lambda: sum(self.count_tokens(m["content"]) + 4 for m in messages), started)

    def close(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self._client.aclose())
        else:
            loop.create_task(self._client.aclose())
