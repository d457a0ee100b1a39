"""Backends turn chat messages into a streamed `Generation`; the dialogue manager sees only this."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from typing import Protocol

from dialogue.model import calibrate, kernels
from dialogue.model.files import EMBEDDED_NAME, ModelNotFound, resolve_model_dir
from dialogue.model.worker import AdapterRef, Generation, GenerationParams, ModelWorker, load_model
from dialogue.prompt import Message
from dialogue.settings import Settings

logger = logging.getLogger(__name__)


class Backend(Protocol):
    model_id: str

    async def ready(self) -> None: ...

    async def can_count(self) -> None:
        """The tokenizer is loaded: a reply that needs no generation need not wait for the model's weights."""

    def is_ready(self) -> bool: ...

    def count_tokens(self, text: str) -> int: ...

    async def generate(self, messages: list[Message], params: GenerationParams, adapter: AdapterRef | None) -> Generation: ...

    def close(self) -> None: ...


class TokenizerText:
    """Token counting for a backend with a `tokenizer` of its model (local or remote alike)."""

    tokenizer: object

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


class LocalBackend(TokenizerText):
    """The model in this process, behind one `ModelWorker`; loading starts at once in the background.

    The compute dtype and the decode weights are chosen by measurement on this CPU (dialogue.model.calibrate), cached
    under `$RAPPORT_HOME/calibration/`; `path()` says what was chosen and why."""

    def __init__(self, settings: Settings, *, eager: bool = True) -> None:
        self.settings = settings
        self.model_id = settings.model or EMBEDDED_NAME
        self.dtype = None  # known once loaded
        self.dtype_us: dict = {}
        self._cache = calibrate.CalibrationCache(settings.home / "calibration")
        self._tokenizer = None  # loaded first by the model thread, seconds before the weights are ready
        self._tokenizer_known = threading.Event()
        self._decode_record: list[dict] = []
        decide = calibrate.calibrator(settings.quantize, settings.model is None, self._cache, self._decode_record)
        self.worker = ModelWorker(self._load, threads=settings.threads, eager=eager, decode=decide,
                                  max_batch=settings.max_batch, chunk_tokens=settings.chunk_tokens,
                                  prefix_cache_tokens=settings.prefix_cache_tokens)

    def path(self) -> dict:
        """The compute path in use: CPU class, dtype, decode weights, and the measurements behind them."""
        self.worker.wait_ready()
        engine = self.worker.engine
        plan = getattr(getattr(engine, "model", None), "plan", None)
        decode = self._decode_record[-1] if self._decode_record else {}
        return {"cpu_class": kernels.cpu_class(), "dtype": str(self.dtype).removeprefix("torch."),
                "kernels": bool(getattr(getattr(engine, "model", None), "fused", False)),
                "kv_dtype": str(getattr(getattr(engine, "model", None), "kv_dtype", self.dtype)).removeprefix("torch."),
                "decode_weights": plan.fmt if plan else None, "quantised_up_to_rows": plan.max_rows if plan else 0,
                "head_weights": plan.head_fmt if plan else None, "head_quantised_up_to_rows": plan.head_max_rows if plan else 0,
                "int8_activations_up_to_rows": plan.int8_rows if plan else 0,
                "head_int8_activations_up_to_rows": plan.head_int8_rows if plan else 0,
                "why": decode.get("reason", ""), "dtype_us": self.dtype_us,
                "layers_us": decode.get("layers_us", {}), "head_us": decode.get("head_us", {})}

    def _choose_dtype(self, directory) -> None:
        config = json.loads((directory / "config.json").read_text())
        self.dtype, self.dtype_us = calibrate.pick_dtype(self.settings.dtype, config["hidden_size"],
                                                         config["intermediate_size"], self._cache)

    def _load(self):
        try:
            directory = resolve_model_dir(self.settings.model, self.settings.models_dir)
            try:
                return self._load_from(directory)
            except Exception as exc:  # safetensors, json and torch each raise their own kinds on a damaged file
                if self.settings.model:  # a user's own directory is never deleted
                    raise ModelNotFound(f"RAPPORT_MODEL={self.settings.model}: cannot load it ({exc})") from exc
                logger.warning("model cache at %s is unreadable (%s); rebuilding it", directory, exc)
                shutil.rmtree(directory, ignore_errors=True)
                return self._load_from(resolve_model_dir(None, self.settings.models_dir, from_gguf=True))
        finally:
            self._tokenizer_known.set()  # a tokenizer that never came is the load's error (worker.wait_ready)

    def _load_from(self, directory):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(directory)
        self._tokenizer_known.set()  # counting and fixed answers can go on while the weights load
        kernels.load(self.settings)  # the first call decides for the process: built or not, per these settings
        self._choose_dtype(directory)
        return load_model(directory, self.dtype, tokenizer=self._tokenizer)

    @property
    def tokenizer(self):
        """The model's tokenizer, as soon as it is loaded (the weights may still be loading)."""
        self.worker.start()
        self._tokenizer_known.wait()
        if self._tokenizer is None:
            self.worker.wait_ready()  # raises what made the load fail
        return self._tokenizer

    async def ready(self) -> None:
        await self.worker.ready()

    async def can_count(self) -> None:
        if not self._tokenizer_known.is_set():
            await asyncio.to_thread(self._tokenizer_known.wait)
        if self._tokenizer is None:
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
