"""The model runtime: one worker thread owns the model and serves generation requests from a queue.

Callers on any event loop submit a request and iterate its text deltas. The worker interleaves all
active requests one decode step at a time, so two conversations stream at once; each request keeps
its own KV cache, sampling state and adapter choice, which is the shape continuous batching needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dialogue.errors import GenerationError

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a per-row adapter batch


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one reply; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.3
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks force exactly max_new_tokens


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter version to apply: its registry name and its directory."""

    name: str
    path: Path


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (avx512_bf16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(setting: str) -> torch.dtype:
    if setting == "bfloat16" or (setting == "auto" and cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32


def load_model(model_dir: Path, dtype: torch.dtype):
    """(model, tokenizer) from a transformers directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, tokenizer


def stop_token_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def sample_next(
    logits: torch.Tensor, generated: list[int], params: GenerationParams, rng: torch.Generator
) -> int:
    """Pick the next token id from (V,) logits.

    The repetition penalty applies to the reply's own tokens only: grounded answers must be free to
    repeat words from the prompt (an FAQ answer, the user's name).
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and generated:
        seen = torch.tensor(sorted(set(generated)), dtype=torch.long)
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < params.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


_DONE = object()


class Generation:
    """One streamed reply: async-iterate it for text deltas; its counters are final once iteration ends."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, adapter: AdapterRef | None) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter
        self.generated: list[int] = []
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.ttft_s: float | None = None
        self.started_at = time.perf_counter()
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue | None = None
        # Worker-side state (touched only by the worker thread).
        self._cache = None
        self._rng = torch.Generator()
        self._rng.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"))
        self._emitted_text = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def _bind(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()

    def _emit(self, event: object) -> None:
        """Called from the worker thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                event = await self._events.get()
                if event is _DONE:
                    return
                if isinstance(event, BaseException):
                    raise GenerationError(f"generation failed: {event}") from event
                yield event
        finally:
            self.cancel()  # a consumer that stops early frees its slot at the next step

    async def text(self) -> str:
        return "".join([chunk async for chunk in self])


class ModelWorker:
    """Owns the model on one thread; serves `Generation`s round-robin, one decode step each."""

    def __init__(self, load: Callable[[], tuple[object, object]], *, threads: int | None = None,
                 eager: bool = True) -> None:
        self._load = load
        self._threads = threads
        self._inbox: queue.SimpleQueue[Generation | None] = queue.SimpleQueue()
        self._active: list[Generation] = []
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._adapters: dict[str, Path] = {}
        self.model = None
        self.tokenizer = None
        self.stop_ids: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="rapport-model", daemon=True)
        self._start_lock = threading.Lock()
        if eager:
            self.start()

    def start(self) -> None:
        """Begin loading the model in the background (idempotent); the first request also starts it."""
        with self._start_lock:
            if not self._thread.is_alive() and not self._ready.is_set():
                self._thread.start()

    # -- caller side -------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        self.start()
        if not self._ready.wait(timeout):
            raise GenerationError("the model is still loading")
        if self._load_error is not None:
            raise self._load_error

    async def ready(self) -> None:
        self.start()
        if not self._ready.is_set():
            await asyncio.to_thread(self._ready.wait)
        if self._load_error is not None:
            raise self._load_error

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    @property
    def queue_depth(self) -> int:
        return len(self._active) + self._inbox.qsize()

    async def submit(self, prompt_ids: list[int], params: GenerationParams, adapter: AdapterRef | None = None) -> Generation:
        await self.ready()
        if not prompt_ids:
            raise GenerationError("empty prompt")
        generation = Generation(prompt_ids, params, adapter)
        generation._bind()
        self._inbox.put(generation)
        return generation

    def close(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout=10)

    # -- worker side -------------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        try:
            self.model, self.tokenizer = self._load()
            self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        except BaseException as exc:  # surfaced to every caller of ready()
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while True:
                if not self._admit():
                    return
                for generation in list(self._active):
                    self._step(generation)

    def _admit(self) -> bool:
        """Move queued requests into the active set; block while there is nothing to do."""
        while True:
            try:
                item = self._inbox.get(block=not self._active)
            except queue.Empty:
                return True
            if item is None:
                return False
            self._active.append(item)
            if self._inbox.empty():
                return True

    def _finish(self, generation: Generation, reason: str, error: BaseException | None = None) -> None:
        generation.finish_reason = reason
        generation._cache = None
        self._active.remove(generation)
        if error is not None:
            generation._emit(error)
        generation._emit(_DONE)

    def _step(self, generation: Generation) -> None:
        if generation.cancelled:
            self._finish(generation, "cancelled")
            return
        try:
            logits = self._forward(generation)
            token = sample_next(logits, generation.generated, generation.params, generation._rng)
        except Exception as exc:
            logger.exception("generation step failed")
            self._finish(generation, "error", exc)
            return
        if generation.ttft_s is None:
            generation.ttft_s = time.perf_counter() - generation.started_at
        if token in self.stop_ids and not generation.params.ignore_eos:
            self._flush_text(generation, final=True)
            self._finish(generation, "stop")
            return
        generation.generated.append(token)
        self._flush_text(generation, final=False)
        if len(generation.generated) >= generation.params.max_new_tokens:
            self._flush_text(generation, final=True)
            self._finish(generation, "length")

    def _forward(self, generation: Generation) -> torch.Tensor:
        """Logits (V,) for the next token: a prefill on the first step, then one token at a time."""
        from transformers import DynamicCache

        if generation._cache is None:
            generation._cache = DynamicCache()
            input_ids = torch.tensor([generation.prompt_ids], dtype=torch.long)  # (1, T)
        else:
            input_ids = torch.tensor([[generation.generated[-1]]], dtype=torch.long)  # (1, 1)
        kwargs = {}
        if self._adapters or generation.adapter is not None:
            kwargs["adapter_names"] = [self._ensure_adapter(generation.adapter)]
        out = self.model(
            input_ids=input_ids, cache=generation._cache, use_cache=True, logits_to_keep=1, **kwargs
        )
        return out.logits[0, -1]  # (V,)

    def _ensure_adapter(self, adapter: AdapterRef | None) -> str:
        """Load an adapter version the first time a request names it; return its peft name."""
        if adapter is None:
            return BASE_ADAPTER
        if adapter.name not in self._adapters:
            from peft import PeftModel

            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.name)
            else:
                self.model.load_adapter(adapter.path, adapter_name=adapter.name)
            self.model.eval()
            self._adapters[adapter.name] = adapter.path
            logger.info("loaded adapter %s from %s", adapter.name, adapter.path)
        return adapter.name

    def _flush_text(self, generation: Generation, *, final: bool) -> None:
        """Emit the new text since the last flush; hold back a trailing partial UTF-8 character."""
        text = self.tokenizer.decode(generation.generated, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > len(generation._emitted_text):
            generation._emit(text[len(generation._emitted_text) :])
            generation._emitted_text = text
