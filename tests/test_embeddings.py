"""The embedder from the wheel: normalised vectors, no download, and the per-turn cache."""

from __future__ import annotations

import numpy as np

from memory.embeddings import DIMENSIONS, shared_embedder


def test_vectors_are_unit_length_and_meaningful():
    embedder = shared_embedder()
    vectors = embedder.embed(["When do you open?", "What are your opening hours?", "I love jazz."])
    assert vectors.shape == (3, DIMENSIONS) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_a_repeated_query_is_embedded_once():
    embedder = shared_embedder()
    first = embedder.embed_one("Where is the shop?")
    assert embedder.embed_one("Where is the shop?") is first and not first.flags.writeable
    assert np.allclose(first, embedder.embed(["Where is the shop?"])[0], atol=1e-5)
