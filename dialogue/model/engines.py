"""What the model worker runs a batched step on: the fast Llama forward, or any transformers model.

An engine takes a `Batch` (see dialogue.model.fastllama) and returns the logits of the rows asked for, keeping
each slot's keys and values between steps. `FastEngine` does the whole batch in one pass; `TransformersEngine`
is the fallback for architectures the fast forward does not know: the same contract, one sequence at a time.
"""

from __future__ import annotations

import logging

import torch

from dialogue.model.fastllama import Batch, DecodePlan, FastLlama, LoraAdapter, supports
from memory.loading import BUILD_LOCK

logger = logging.getLogger(__name__)

__all__ = ["Batch", "FastEngine", "TransformersEngine", "open_engine"]

PEFT_NO_ADAPTER = "__base__"  # peft's name for "no adapter" in a per-row adapter batch


class FastEngine:
    """FastLlama plus its adapters; prefix states are copies of a slot's keys and values."""

    can_save = True

    def __init__(self, model, *, decode=DecodePlan(), kv_dtype=None) -> None:
        self.model = FastLlama(model, decode=decode, kv_dtype=kv_dtype)
        self.max_positions = self.model.max_positions
        self._adapters: dict[str, LoraAdapter] = {}

    def adapter(self, ref) -> LoraAdapter | None:
        """The loaded adapter for an `AdapterRef` (loaded once per version name), or None for the base model."""
        if ref is None:
            return None
        if ref.name not in self._adapters:
            self._adapters[ref.name] = LoraAdapter.load(ref.name, ref.path, self.model.dtype, self.model.slices)
            logger.info("loaded adapter %s from %s", ref.name, ref.path)
        return self._adapters[ref.name]

    def reserve(self, slots: int, length: int) -> None:
        self.model.arena.reserve(slots, length)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model.forward(batch)

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        arena = self.model.arena
        held = arena.read(a, length_a)
        arena.move(b, a, length_b)
        arena.write(b, held)

    def free(self, slot: int) -> None:
        """Nothing to do: a slot's stale positions are masked until it is written again."""

    def save(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.arena.read(slot, length)

    def load(self, slot: int, state: tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        self.model.arena.write(slot, state, length)


class TransformersEngine:
    """Any causal LM through its own forward and a DynamicCache per slot; adapters through peft by name."""

    can_save = False

    def __init__(self, model) -> None:
        self.model = model
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 20
        self._caches: dict[int, object] = {}
        self._adapters: set[str] = set()

    def adapter(self, ref) -> str | None:
        if ref is None:
            return None
        if ref.name not in self._adapters:
            from peft import PeftModel

            with BUILD_LOCK:
                if not self._adapters:
                    self.model = PeftModel.from_pretrained(self.model, ref.path, adapter_name=ref.name)
                else:
                    self.model.load_adapter(ref.path, adapter_name=ref.name)
            self.model.eval()
            self._adapters.add(ref.name)
            logger.info("loaded adapter %s from %s", ref.name, ref.path)
        return ref.name

    def reserve(self, slots: int, length: int) -> None:
        pass

    def forward(self, batch: Batch) -> torch.Tensor:
        from transformers import DynamicCache

        names = {}
        for name, rows in batch.lora:  # rows are a slice or an index tensor
            names.update(dict.fromkeys(torch.arange(len(batch.tokens))[rows].tolist(), name))
        wanted = set(batch.logit_rows.tolist())
        logits = {}
        runs = [(slot, slot, slot + 1) for slot in range(batch.n_decode)]  # (slot, first row, end row)
        if batch.chunk_slot is not None:
            runs.append((batch.chunk_slot, batch.n_decode, len(batch.tokens)))
        for slot, first, end in runs:
            cache = self._caches.setdefault(slot, DynamicCache())
            kwargs = {}
            if self._adapters:
                kwargs["adapter_names"] = [names.get(first, PEFT_NO_ADAPTER)]
            out = self.model(input_ids=batch.tokens[first:end][None], cache=cache, use_cache=True, logits_to_keep=1,
                             **kwargs)
            if end - 1 in wanted:
                logits[end - 1] = out.logits[0, -1]
        return torch.stack([logits[row] for row in batch.logit_rows.tolist()])

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        ca, cb = self._caches.pop(a, None), self._caches.pop(b, None)
        if ca is not None:
            self._caches[b] = ca
        if cb is not None:
            self._caches[a] = cb

    def free(self, slot: int) -> None:
        self._caches.pop(slot, None)


def open_engine(model, *, decode=DecodePlan()):
    """The fast engine where the architecture allows it, else the transformers fallback. `decode` is a
    `DecodePlan` or a function that measures the engine and returns one."""
    if supports(model.config):
        return FastEngine(model, decode=decode)
    logger.info("%s runs through transformers' own forward (one sequence per pass)", model.config.model_type)
    return TransformersEngine(model)
