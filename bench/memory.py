"""`rapport bench memory`: evidence recall@5/@10 (dense vs BM25 vs hybrid) and search latency at scale.

Recall runs on the synthetic conversations of `bench.memory_data` through the real `UserMemory.search`.
Latency runs on one user with N memories in a real embedded Chroma in a temp dir. Embedding 100k texts
would take ~6 min here, so the corpus is a few thousand really embedded sentences, each reused with
perturbed vectors and distinct extra words; the search path measured is the real one (query embedding,
Chroma HNSW query, BM25 over all N documents, fusion).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.memory_data import FACTS, FILLER, NAMES, generate

KS = (5, 10)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def recall_benchmark(store, n_conversations: int = 4, user_turns: int = 300) -> dict:
    """Evidence recall@k per retrieval mode over the synthetic conversations."""
    from memory.memories import MemoryItem

    conversations = generate(n_conversations, user_turns)
    modes = ("dense", "lexical", "hybrid")
    kinds = ("value", "entity")
    found = {(mode, kind): {k: 0 for k in KS} for mode in modes for kind in kinds}
    asked = {kind: 0 for kind in kinds}
    assistant_hits = 0
    for convo in conversations:
        memory = store.for_user(convo.user_id)
        ids = memory.add([MemoryItem.from_json(turn) for turn in convo.turns])  # turn index → memory id
        for question in convo.questions:
            evidence = {ids[i] for i in question.evidence}
            asked[question.kind] += 1
            for mode in modes:
                hits = memory.search(question.text, k=max(KS), mode=mode)
                assistant_hits += sum(hit.speaker != "user" for hit in hits)
                ranked = [hit.id for hit in hits]
                for k in KS:
                    found[mode, question.kind][k] += bool(evidence & set(ranked[:k]))
    total = sum(asked.values())
    out = {"conversations": n_conversations, "turns_per_conversation": 2 * user_turns, "questions": asked,
           "assistant_lines_returned": assistant_hits}
    for mode in modes:
        out[mode] = {f"recall@{k}": round(sum(found[mode, kind][k] for kind in kinds) / total, 3) for k in KS}
        for kind in kinds:
            out[mode][kind] = {f"recall@{k}": round(found[mode, kind][k] / asked[kind], 3) for k in KS}
    return out


def corpus(n: int, embedder, rng: random.Random, distinct: int = 3000) -> tuple[list[str], np.ndarray]:
    """`n` distinct texts with plausible unit vectors: `distinct` real embeddings, perturbed and reworded."""
    base = []
    for kind, (values, statements, _questions, distractors) in FACTS.items():
        for template in statements + distractors:
            for value in values:
                base.append(template.format(x=value, y=value, n=rng.choice(NAMES)))
    base += [line.format(n=name) for line in FILLER for name in NAMES]
    rng.shuffle(base)
    base = base[:distinct]
    vectors = embedder.embed(base)  # (distinct, 384)
    texts, rows = [], []
    noise = np.random.default_rng(rng.randrange(2**32))
    for i in range(n):
        j = i % len(base)
        texts.append(f"{base[j]} (note {i}, {rng.choice(NAMES)} {rng.choice(['mon', 'tue', 'wed', 'thu', 'fri'])})")
        rows.append(j)
    matrix = vectors[rows] + noise.normal(0, 0.02, size=(n, vectors.shape[1])).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return texts, matrix.astype(np.float32)


class TimedEmbedder:
    """The real embedder, recording how long each query embedding took (to split search time)."""

    def __init__(self, embedder) -> None:
        self.embedder, self.name, self.seconds = embedder, embedder.name, 0.0

    def embed(self, texts):
        return self.embedder.embed(texts)

    def embed_one(self, text):
        start = time.perf_counter()
        try:
            return self.embedder.embed_one(text)
        finally:
            self.seconds += time.perf_counter() - start


def latency_benchmark(size: int, embedder, queries: int = 200, writes: int = 20) -> dict:
    """Load one user with `size` memories in a fresh embedded Chroma, then time searches."""
    from memory.chroma import open_chroma
    from memory.memories import MemoryItem, MemoryStore

    rng = random.Random(size)
    texts, vectors = corpus(size, embedder, rng, distinct=min(3000, size))
    with tempfile.TemporaryDirectory(prefix="rapport-bench-") as tmp:
        handle = open_chroma(path=Path(tmp) / "chroma")
        try:
            timed = TimedEmbedder(embedder)
            store = MemoryStore(handle.client, timed)
            memory = store.for_user("bench:latency")
            state = store._state("bench:latency")
            start = time.perf_counter()
            for at in range(0, size, 5000):  # the real write path (dedup, mirror, BM25), vectors given
                items = [MemoryItem(text=text) for text in texts[at:at + 5000]]
                with state.lock:
                    memory._write(state, items, vectors[at:at + 5000])
            load_s = time.perf_counter() - start
            # a process that starts cold: rebuild the mirror and BM25 index from Chroma once
            store._forget_state("bench:latency")
            start = time.perf_counter()
            state = store._state("bench:latency")
            cold_s = time.perf_counter() - start
            question_texts = [q for _, (_, _, qs, _) in FACTS.items() for q in qs]
            memory.search("warm up", k=10)
            total, retrieval = [], []
            for i in range(queries):
                query = f"{question_texts[i % len(question_texts)]} {rng.choice(NAMES)}"
                timed.seconds = 0.0
                t0 = time.perf_counter()
                memory.search(query, k=10)
                elapsed = time.perf_counter() - t0
                total.append(elapsed * 1000)
                retrieval.append((elapsed - timed.seconds) * 1000)
            write_ms = []
            for i in range(writes):  # one remembered turn each (embedding, dedup check, HNSW persist)
                t0 = time.perf_counter()
                memory.remember_turn(turn_id=f"t{i}", user_text=f"I planted {i} tomato seedlings on the balcony",
                                     reply="-", timestamp=None)
                write_ms.append((time.perf_counter() - t0) * 1000)
            forget_id = memory.list(limit=1)[0].id
            t0 = time.perf_counter()
            memory.forget(forget_id)
            forget_s = time.perf_counter() - t0
            return {
                "memories": size,
                "insert_s": round(load_s, 1),
                "cold_load_s": round(cold_s, 2),
                "search_ms_p50": round(percentile(total, 50), 2),
                "search_ms_p95": round(percentile(total, 95), 2),
                "retrieval_ms_p50": round(percentile(retrieval, 50), 2),  # Chroma + BM25 + fusion, vector given
                "retrieval_ms_p95": round(percentile(retrieval, 95), 2),
                "remember_turn_ms_p50": round(statistics.median(write_ms), 1),
                "forget_one_s": round(forget_s, 2),
            }
        finally:
            handle.close()


def run(sizes: list[int] = (10_000, 100_000), recall: bool = True) -> dict:
    import chromadb

    from memory.chroma import chroma_settings
    from memory.embeddings import shared_embedder
    from memory.memories import MemoryStore

    import torch

    # one intra-op thread: on a shared 2-core box two threads thrash (a query embedding took ~360 ms
    # instead of ~37 ms here); a serving process would pin this too
    torch.set_num_threads(1)
    embedder = shared_embedder()
    out: dict = {"embedder": embedder.name, "torch_threads": torch.get_num_threads()}
    if recall:
        store = MemoryStore(chromadb.EphemeralClient(settings=chroma_settings()), embedder)
        out["recall"] = recall_benchmark(store)
    out["latency"] = [latency_benchmark(size, embedder) for size in sizes]
    return out

