"""The model runtime: one worker thread owns the model and serves generation requests from a queue.

Callers on any event loop submit a request and iterate its text deltas. The worker batches continuously:
every step is one forward pass over all decoding requests (one token each) plus, if a prompt is waiting,
a chunk of that prompt, so a long prompt never freezes the streams already running. Requests join between
steps and leave when done. A finished request leaves its keys and values in a bounded prefix cache, so the
next turn of a conversation (or any prompt sharing a prefix, on the same adapter) prefills only what is new.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from dialogue.model import kernels
from dialogue.model.engines import Batch, open_engine
from dialogue.model.fastllama import DecodePlan
from dialogue.errors import GenerationError
from memory.loading import BUILD_LOCK

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # the base model's key in the prefix cache (adapter names are "vNNNN-<hash>")


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one reply; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.3
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks force exactly max_new_tokens
    banned_token_ids: tuple[int, ...] = ()  # never sampled (the guard's retry avoids the copied words)
    # Token sequences the reply must not copy COPY_RUN tokens of in a row (the user's message, earlier replies):
    # the token that would complete such a run is not sampled, so most echoes are never generated at all.
    avoid_copying: tuple[tuple[int, ...], ...] = ()

    @cached_property
    def copy_index(self) -> dict[tuple[int, ...], frozenset[int]]:
        """For every COPY_RUN - 1 consecutive tokens of `avoid_copying`, the tokens that follow them there: built
        once per request, read every step."""
        follow: dict[tuple[int, ...], set[int]] = {}
        for source in self.avoid_copying:
            for i in range(len(source) - COPY_RUN + 1):
                follow.setdefault(source[i:i + COPY_RUN - 1], set()).add(source[i + COPY_RUN - 1])
        return {prefix: frozenset(tokens) for prefix, tokens in follow.items()}


COPY_RUN = 6  # tokens: "my name is Lena and" may come back, a whole copied clause may not


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter version to apply: its registry name and its directory."""

    name: str
    path: Path


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (avx512_bf16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(kernels.cpu_flags() & {"avx512_bf16", "amx_bf16"})


def choose_dtype(setting: str) -> torch.dtype:
    if setting == "bfloat16" or (setting == "auto" and cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32


LOAD_WAIT_ON_CLOSE_S = 300.0


def load_model(model_dir: Path, dtype: torch.dtype, tokenizer=None):
    """(model, tokenizer) from a transformers directory, in eval mode (`tokenizer` when the caller loaded it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    with BUILD_LOCK:
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


def copying_tokens(generated: list[int], params: GenerationParams) -> frozenset[int]:
    """The tokens that would make the reply's last COPY_RUN tokens a run of one of `params.avoid_copying`."""
    if not params.avoid_copying or len(generated) < COPY_RUN - 1:
        return frozenset()
    return params.copy_index.get(tuple(generated[-(COPY_RUN - 1):]), frozenset())


SHORTLIST = 64  # candidates read for top-p: the nucleus almost always lies within them (checked every draw)


def sample_tokens(logits: torch.Tensor, histories: list[list[int]], params: list[GenerationParams],
                  rngs: list[torch.Generator]) -> list[int]:
    """The next token id of each row of (n, V) logits, each row with its own reply so far, settings and generator.

    The repetition penalty applies to the reply's own tokens only: grounded answers must be free to
    repeat words from the prompt (an FAQ answer, the user's name).

    Top-p reads each row's SHORTLIST most likely tokens instead of sorting the whole vocabulary (sorting 49k
    tokens took 4 ms a row, more than a decode step); a row whose shortlist holds less than top_p of the mass
    sorts everything. Either way the nucleus drawn from is the same. The vocabulary-wide work (softmax
    normaliser, top-k) runs once for all rows.
    """
    logits = logits.to(torch.float32, copy=True)  # the penalty below writes into it
    for row, (generated, p) in enumerate(zip(histories, params)):
        if p.repetition_penalty != 1.0 and generated:
            seen = torch.tensor(sorted(set(generated)), dtype=torch.long)
            scores = logits[row, seen]
            logits[row, seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        banned = set(p.banned_token_ids) | copying_tokens(generated, p)
        if banned:
            logits[row, sorted(banned)] = float("-inf")
    tokens = [0] * len(params)
    greedy = [row for row, p in enumerate(params) if p.temperature <= 0]
    if greedy:
        for row, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
            tokens[row] = token
    sampled = [row for row, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    vocab = logits.shape[-1]
    rows = logits if len(sampled) == len(params) else logits[sampled]
    everything = torch.softmax(rows / torch.tensor([params[row].temperature for row in sampled])[:, None], dim=-1)
    probs, order = torch.topk(everything, min(SHORTLIST, vocab), dim=-1)  # descending
    cumulative = torch.cumsum(probs, dim=-1)
    for i, row in enumerate(sampled):
        p, rng = params[row], rngs[row]
        if p.top_p >= 1.0:
            tokens[row] = int(torch.multinomial(everything[i], 1, generator=rng))
            continue
        row_probs, row_order, row_cumulative = probs[i], order[i], cumulative[i]
        if float(row_cumulative[-1]) < p.top_p and len(row_order) < vocab:
            row_probs, row_order = torch.sort(everything[i], descending=True)
            row_cumulative = torch.cumsum(row_probs, dim=-1)
        keep = row_cumulative - row_probs < p.top_p  # always keeps the most likely token
        tokens[row] = int(row_order[keep][torch.multinomial(row_probs[keep], 1, generator=rng)])
    return tokens


def sample_next(logits: torch.Tensor, generated: list[int], params: GenerationParams, rng: torch.Generator) -> int:
    """The next token id from (V,) logits: `sample_tokens` for one row."""
    return sample_tokens(logits[None], [generated], [params], [rng])[0]


_DONE = object()


def row_index(rows: list[int]) -> torch.Tensor | slice:
    """Rows as a slice when they are consecutive (a view, no gather), else as an index tensor."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows)


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
        self._tokens = list(prompt_ids)  # the prompt, then each sampled token
        self._cached = 0  # how many of _tokens have keys and values in the engine
        self._slot = -1
        self._lora = None  # the engine's loaded adapter
        self.reused_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self._rng = torch.Generator()
        self._rng.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"))
        self._text_window = (0, 0)  # generated[a:b]: the tokens last flushed, decoded again as context

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


class PrefixCache:
    """Keys and values of finished sequences, looked up by longest shared token prefix on the same adapter.

    Bounded by total tokens, least recently used out first. A sequence that extends a stored one replaces it.
    Only identical token prefixes are ever shared, so reuse cannot carry one user's text into another's prompt.
    """

    def __init__(self, max_tokens: int, min_reuse: int = 16) -> None:
        self.max_tokens = max_tokens
        self.min_reuse = min_reuse
        self._entries: OrderedDict[int, tuple[str, torch.Tensor, object]] = OrderedDict()
        self._next = 0
        self.tokens = 0

    def lookup(self, adapter: str, prompt: list[int]) -> tuple[int, object | None]:
        """(how many leading prompt tokens are cached, their state); always leaves the last token to compute."""
        if not self._entries or len(prompt) <= self.min_reuse:
            return 0, None
        query = torch.tensor(prompt[:-1])
        best, best_key = 0, None
        for key, (name, tokens, _) in self._entries.items():
            if name != adapter:
                continue
            n = min(len(tokens), len(query))
            same = tokens[:n] == query[:n]
            length = n if bool(same.all()) else int((~same).nonzero()[0])
            if length > best:
                best, best_key = length, key
        if best < self.min_reuse:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][2]

    def wants(self, length: int) -> bool:
        """Whether a sequence of `length` tokens would be kept (so its state is worth copying out)."""
        return self.min_reuse <= length <= self.max_tokens

    def store(self, adapter: str, tokens: list[int], state: object) -> None:
        if not self.wants(len(tokens)):
            return
        new = torch.tensor(tokens)
        for key, (name, old, _) in list(self._entries.items()):
            if name == adapter and len(old) <= len(new) and bool((new[: len(old)] == old).all()):
                self._drop(key)  # the new sequence extends it
        self._entries[self._next] = (adapter, new, state)
        self._next += 1
        self.tokens += len(tokens)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.tokens -= len(self._entries.pop(key)[1])


class ModelWorker:
    """Owns the model on one thread; runs every active `Generation` in one batched step at a time."""

    def __init__(self, load: Callable[[], tuple[object, object]], *, threads: int | None = None, eager: bool = True,
                 decode: DecodePlan | Callable = DecodePlan(), max_batch: int = 16, chunk_tokens: int = 256,
                 prefix_cache_tokens: int = 16384) -> None:
        self._load = load
        self._threads = threads
        self._decode = decode  # a DecodePlan, or a function of the engine that measures one (dialogue.model.calibrate)
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self._inbox: queue.SimpleQueue[Generation | None] = queue.SimpleQueue()
        self._waiting: list[Generation] = []
        self._slots: list[Generation] = []  # slot i holds _slots[i]: decoding ones first, then prompts in progress
        self._decoding = 0
        self.steps: deque[tuple[int, int, float]] = deque(maxlen=4096)  # (decoding rows, prompt tokens, seconds)
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.engine = None
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
        return len(self._slots) + len(self._waiting) + self._inbox.qsize()

    async def submit(self, prompt_ids: list[int], params: GenerationParams, adapter: AdapterRef | None = None) -> Generation:
        await self.ready()
        if not prompt_ids:
            raise GenerationError("empty prompt")
        if len(prompt_ids) + params.max_new_tokens > self.engine.max_positions:
            raise GenerationError(f"prompt of {len(prompt_ids)} tokens plus {params.max_new_tokens} new ones exceeds "
                                  f"the model's {self.engine.max_positions} positions")
        generation = Generation(prompt_ids, params, adapter)
        generation._bind()
        self._inbox.put(generation)
        return generation

    def close(self) -> None:
        if self._thread.is_alive():
            # A load under way is let finish: a process that exits while torch is still loading in this thread
            # aborts in C++ teardown ("terminate called without an active exception"), seen when a piped chat's
            # fixed answer came before the weights.
            self._ready.wait(timeout=LOAD_WAIT_ON_CLOSE_S)
            self._inbox.put(None)
            self._thread.join(timeout=10)

    # -- worker side -------------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        try:
            start = time.perf_counter()
            model, self.tokenizer = self._load()
            loaded = time.perf_counter()
            self.stop_ids = stop_token_ids(self.tokenizer, model)
            self.engine = open_engine(model, decode=self._decode)
            del model
            logger.info("model loaded in %.1f s, engine ready %.1f s later", loaded - start, time.perf_counter() - loaded)
        except BaseException as exc:  # surfaced to every caller of ready()
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while self._admit():
                self._drop_cancelled()
                if self._slots:
                    self._step()

    def _admit(self) -> bool:
        """Take new requests; give free slots to waiting ones; block while there is nothing to do."""
        while True:
            try:
                item = self._inbox.get(block=not (self._slots or self._waiting))
            except queue.Empty:
                break
            if item is None:
                return False
            self._waiting.append(item)
        while self._waiting and len(self._slots) < self.max_batch:
            generation = self._waiting.pop(0)
            if generation.cancelled:
                self._finish(generation, "cancelled")
                continue
            try:
                self._place(generation)
            except Exception as exc:
                logger.exception("could not start a generation")
                self._finish(generation, "error", exc)
        return True

    def _place(self, generation: Generation) -> None:
        """Give a new request the next slot, its adapter, and any cached prefix of its prompt."""
        generation._lora = self.engine.adapter(generation.adapter)
        slot = len(self._slots)
        self.engine.reserve(slot + 1, len(generation.prompt_ids) + generation.params.max_new_tokens)
        generation._slot = slot
        self._slots.append(generation)
        if self.engine.can_save:
            reused, state = self.prefix_cache.lookup(self._adapter_key(generation), generation.prompt_ids)
            if state is not None:
                self.engine.load(slot, state, reused)
                generation._cached = generation.reused_tokens = reused

    @staticmethod
    def _adapter_key(generation: Generation) -> str:
        return generation.adapter.name if generation.adapter else BASE_ADAPTER

    def _drop_cancelled(self) -> None:
        for generation in [g for g in self._slots if g.cancelled]:
            self._finish(generation, "cancelled")

    def _step(self) -> None:
        """One forward: a token for every decoding slot, and a chunk of the oldest unfinished prompt.

        Alone, a prompt is prefilled whole (fastest first token); beside running streams, `chunk_tokens` at a
        time, so their tokens keep coming while it is read.
        """
        decoding = self._slots[: self._decoding]
        tokens = [g._tokens[g._cached] for g in decoding]
        positions = [g._cached for g in decoding]
        prompts = self._slots[self._decoding:]
        prompt = min(prompts, key=lambda g: g.started_at) if prompts else None  # first come, first prefilled
        chunk_start = chunk_len = 0
        if prompt is not None:
            remaining = len(prompt._tokens) - prompt._cached
            chunk_len = remaining if not decoding else min(remaining, self.chunk_tokens)
            chunk_start = prompt._cached
            tokens += prompt._tokens[chunk_start:chunk_start + chunk_len]
            positions += range(chunk_start, chunk_start + chunk_len)
        prompt_done = prompt is not None and chunk_start + chunk_len == len(prompt._tokens)
        rows = list(range(len(decoding))) + ([len(tokens) - 1] if prompt_done else [])
        owners = decoding + ([prompt] if prompt_done else [])
        groups: dict[int, tuple[object, list[int]]] = {}
        for row, generation in enumerate(decoding):
            if generation._lora is not None:
                groups.setdefault(id(generation._lora), (generation._lora, []))[1].append(row)
        if prompt is not None and prompt._lora is not None:
            groups.setdefault(id(prompt._lora), (prompt._lora, []))[1].extend(range(len(decoding), len(tokens)))
        batch = Batch(tokens=torch.tensor(tokens), positions=torch.tensor(positions), n_decode=len(decoding),
                      chunk_slot=prompt._slot if prompt is not None else None, chunk_start=chunk_start,
                      logit_rows=torch.tensor(rows, dtype=torch.long),
                      lora=[(lora, row_index(r)) for lora, r in groups.values()])
        started = time.perf_counter()
        try:
            logits = self.engine.forward(batch)  # (len(rows), V)
        except Exception as exc:
            logger.exception("generation step failed")
            for generation in decoding + ([prompt] if prompt is not None else []):
                self._finish(generation, "error", exc)
            return
        for generation in decoding:
            generation._cached += 1
        if prompt is not None:
            prompt._cached += chunk_len
            if prompt_done:  # it decodes from now on: move it to the end of the decoding block
                self._swap(prompt._slot, self._decoding)
                self._decoding += 1
        try:
            tokens = sample_tokens(logits, [g.generated for g in owners], [g.params for g in owners],
                                   [g._rng for g in owners])
        except Exception:  # one row's logits may be bad (NaN): sample row by row so only its owner fails
            tokens = [None] * len(owners)
        for row, generation in enumerate(owners):
            self._advance(generation, logits[row], tokens[row])
        self.steps.append((len(decoding), chunk_len, time.perf_counter() - started))

    def _advance(self, generation: Generation, logits: torch.Tensor, token: int | None) -> None:
        try:
            if token is None:
                token = sample_next(logits, generation.generated, generation.params, generation._rng)
        except Exception as exc:
            logger.exception("sampling failed")
            self._finish(generation, "error", exc)
            return
        if generation.ttft_s is None:
            generation.ttft_s = time.perf_counter() - generation.started_at
        if token in self.stop_ids and not generation.params.ignore_eos:
            self._flush_text(generation, final=True)
            self._finish(generation, "stop")
            return
        generation.generated.append(token)
        generation._tokens.append(token)
        self._flush_text(generation, final=False)
        if len(generation.generated) >= generation.params.max_new_tokens:
            self._flush_text(generation, final=True)
            self._finish(generation, "length")

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        ga, gb = self._slots[a], self._slots[b]
        self.engine.swap(a, b, ga._cached, gb._cached)
        self._slots[a], self._slots[b] = gb, ga
        ga._slot, gb._slot = b, a

    def _finish(self, generation: Generation, reason: str, error: BaseException | None = None) -> None:
        generation.finish_reason = reason
        slot = generation._slot
        if slot >= 0:
            if reason in ("stop", "length") and self.engine.can_save and self.prefix_cache.wants(generation._cached):
                self.prefix_cache.store(self._adapter_key(generation), generation._tokens[: generation._cached],
                                        self.engine.save(slot, generation._cached))
            # Keep the slots dense: decoding ones in [0, _decoding), prompts in progress after them.
            if slot < self._decoding:
                self._swap(slot, self._decoding - 1)
                self._decoding -= 1
                slot = generation._slot
            self._swap(slot, len(self._slots) - 1)
            self._slots.pop()
            self.engine.free(len(self._slots))
            generation._slot = -1
        if error is not None:
            generation._emit(error)
        generation._emit(_DONE)

    def _flush_text(self, generation: Generation, *, final: bool) -> None:
        """Emit the new text since the last flush; hold back a trailing partial UTF-8 character.

        Decodes only from the token before the last flush (so a word's leading space and a character split over
        tokens come out right), not the whole reply each step: 5 instead of 26 us a token at 250 tokens.
        """
        start, flushed = generation._text_window
        tokens = generation.generated
        before = self.tokenizer.decode(tokens[start:flushed], skip_special_tokens=True)
        text = self.tokenizer.decode(tokens[start:], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > len(before):
            generation._emit(text[len(before):])
            generation._text_window = (flushed, len(tokens))
