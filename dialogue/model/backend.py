"""Backends turn chat messages into a streamed `Generation`; the dialogue manager sees only this."""

from __future__ import annotations

import logging
import shutil
from typing import Protocol

from dialogue.model.files import EMBEDDED_NAME, ModelNotFound, resolve_model_dir
from dialogue.model.worker import AdapterRef, Generation, GenerationParams, ModelWorker, choose_dtype, load_model
from dialogue.prompt import Message
from dialogue.settings import Settings

logger = logging.getLogger(__name__)


class Backend(Protocol):
    model_id: str

    async def ready(self) -> None: ...

    def is_ready(self) -> bool: ...

    def count_tokens(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...

    async def generate(self, messages: list[Message], params: GenerationParams, adapter: AdapterRef | None) -> Generation: ...

    def close(self) -> None: ...


class TokenizerText:
    """Token counting and cutting for a backend with a `tokenizer` of its model (local or remote alike)."""

    tokenizer: object

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        return self.tokenizer.decode(ids).strip()


class LocalBackend(TokenizerText):
    """The model in this process, behind one `ModelWorker`; loading starts at once in the background."""

    def __init__(self, settings: Settings, *, eager: bool = True) -> None:
        self.settings = settings
        self.model_id = settings.model or EMBEDDED_NAME
        self.dtype = choose_dtype(settings.dtype)
        quantize = settings.quantize
        if quantize == "auto":  # the embedded GGUF's layer weights are Q4_1: int4 in the same groups loses nothing
            quantize = "int8" if settings.model else "int4"
        self.quantize = quantize
        self.worker = ModelWorker(self._load, threads=settings.threads, eager=eager, quantize=quantize,
                                  max_batch=settings.max_batch, chunk_tokens=settings.chunk_tokens,
                                  prefix_cache_tokens=settings.prefix_cache_tokens)

    def _load(self):
        directory = resolve_model_dir(self.settings.model, self.settings.models_dir)
        try:
            return load_model(directory, self.dtype)
        except Exception as exc:  # safetensors, json and torch each raise their own kinds on a damaged file
            if self.settings.model:  # a user's own directory is never deleted
                raise ModelNotFound(f"RAPPORT_MODEL={self.settings.model}: cannot load it ({exc})") from exc
            logger.warning("model cache at %s is unreadable (%s); rebuilding it", directory, exc)
            shutil.rmtree(directory, ignore_errors=True)
            return load_model(resolve_model_dir(None, self.settings.models_dir), self.dtype)

    @property
    def tokenizer(self):
        self.worker.wait_ready()
        return self.worker.tokenizer

    async def ready(self) -> None:
        await self.worker.ready()

    def is_ready(self) -> bool:
        return self.worker.is_ready

    def encode_chat(self, messages: list[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def generate(self, messages: list[Message], params: GenerationParams, adapter: AdapterRef | None = None) -> Generation:
        await self.ready()
        return await self.worker.submit(self.encode_chat(messages), params, adapter)

    def close(self) -> None:
        self.worker.close()
