"""`rapport bench memory`: evidence recall@1/@5/@10 and search latency of the product's memory search, beside
plain dense search (the same embedder, exact cosine top-k over the same turn texts) and plain BM25.

The default set is `bench.memory_conv`: long two-person conversations, imported as `rapport memory import` does
(one turn a line, speaker named), at ~600 and at 10k memories per user, each size on the "tune" split and on the
"heldout" split (other names, values and question wordings). Latency is the product's `search` per question,
query embedding included (never from the embedder's cache), split into embedding and the rest.
`--set synthetic` runs the older, easier one-speaker set of `bench.memory_data` and its latency run on perturbed
vectors (up to 100k memories).
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


# -- the conversation set (default) ------------------------------------------------------------------------

RECALL_KS = (1, 5, 10)
MODES = ("product", "dense", "bm25")


class PlainDense:
    """The baseline: each turn text embedded alone, exact cosine top-k by a matrix product."""

    def __init__(self, embedder, texts: list[str]) -> None:
        self.embedder = embedder
        unique = sorted(set(texts))
        vectors = embedder.embed(unique)  # (U, 384), unit length
        row = {text: i for i, text in enumerate(unique)}
        self.matrix = vectors[[row[text] for text in texts]]  # (N, 384)

    def search(self, query: str, k: int) -> list[int]:
        scores = self.matrix @ self.embedder.embed([query])[0]  # (N,)
        top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
        return [int(i) for i in top[np.argsort(-scores[top], kind="stable")]]


class PlainBM25:
    """The baseline: Okapi BM25 over the turn texts alone (the same tokenizer as the product's)."""

    def __init__(self, texts: list[str]) -> None:
        from memory.lexical import LexicalIndex

        self.index = LexicalIndex()
        for i, text in enumerate(texts):
            self.index.add(str(i), text)

    def search(self, query: str, k: int) -> list[int]:
        return [int(key) for key, _ in self.index.search(query, k)]


def cpu_path() -> dict:
    """Which CPU path torch (and so the embedder) ran on."""
    import os

    import torch

    from dialogue.model.kernels import cpu_class

    return {"cpu_class": cpu_class(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""), "torch_threads": torch.get_num_threads()}


def conversation_benchmark(store, embedder, conversations, *, limit: int | None = None) -> dict:
    """Import each conversation for its own user, ask its questions: recall@k per mode and per question kind,
    and the product's search time per question."""
    from memory.memories import parse_jsonl

    timed = store.embedder
    found = {(mode, kind): {k: 0 for k in RECALL_KS} for mode in MODES for kind in ("static", "changed", "event")}
    asked: dict[str, int] = {}
    total_ms, embed_ms, cpu_ms, import_s, foreign = [], [], [], 0.0, 0
    users = {convo.user_id for convo in conversations}
    for convo in conversations:
        start = time.perf_counter()
        memory = store.for_user(convo.user_id)
        ids = memory.add(parse_jsonl(convo.jsonl()))  # turn index → memory id, as `memory import` stores them
        import_s += time.perf_counter() - start
        owner = {memory_id: i for i, memory_id in enumerate(ids)}
        texts = [turn["text"] for turn in convo.turns]
        dense, bm25 = PlainDense(embedder, texts), PlainBM25(texts)
        for question in convo.questions[:limit]:
            evidence = set(question.evidence)
            timed.seconds = 0.0
            c0, t0 = time.thread_time(), time.perf_counter()
            hits = memory.search(question.text, k=max(RECALL_KS))
            elapsed = time.perf_counter() - t0
            cpu_ms.append((time.thread_time() - c0) * 1000)
            total_ms.append(elapsed * 1000)
            embed_ms.append(timed.seconds * 1000)
            foreign += sum(hit.id not in owner for hit in hits)  # another user's memory: must never happen
            ranked = {"product": [owner.get(hit.id, -1) for hit in hits],
                      "dense": dense.search(question.text, max(RECALL_KS)),
                      "bm25": bm25.search(question.text, max(RECALL_KS))}
            asked[question.kind] = asked.get(question.kind, 0) + 1
            for mode in MODES:
                for k in RECALL_KS:
                    found[mode, question.kind][k] += bool(evidence & set(ranked[mode][:k]))
    n = sum(asked.values())
    out = {"users": len(users), "memories_per_user": round(sum(len(c.turns) for c in conversations) / len(conversations)),
           "questions": n, "by_kind": asked, "foreign_hits": foreign}
    for mode in MODES:
        out[mode] = {f"recall@{k}": round(sum(found[mode, kind][k] for kind in asked) / n, 3) for k in RECALL_KS}
        out[mode]["by_kind@10"] = {kind: round(found[mode, kind][10] / asked[kind], 3) for kind in asked}
    out["product_minus_dense@10"] = round(out["product"]["recall@10"] - out["dense"]["recall@10"], 3)
    out["search_ms_p50"] = round(percentile(total_ms, 50), 2)
    out["search_ms_p95"] = round(percentile(total_ms, 95), 2)
    # this thread's CPU time per search (torch runs one intra-op thread here, on this thread): unlike the wall
    # clock, it does not grow while other processes hold the cores
    out["search_cpu_ms_p50"] = round(percentile(cpu_ms, 50), 2)
    out["search_cpu_ms_p95"] = round(percentile(cpu_ms, 95), 2)
    out["embed_query_ms_p50"] = round(percentile(embed_ms, 50), 2)
    out["rest_ms_p95"] = round(percentile([t - e for t, e in zip(total_ms, embed_ms)], 95), 2)
    out["import_s"] = round(import_s, 1)
    return out


class UncachedTimedEmbedder(TimedEmbedder):
    """As TimedEmbedder, but every query is embedded afresh: a benchmark question must not come from the cache."""

    def embed_one(self, text):
        start = time.perf_counter()
        try:
            return self.embedder.embed([text])[0]
        finally:
            self.seconds += time.perf_counter() - start


def run_conversations(sizes=(600, 10_000), conversations: int = 4, splits=("tune", "heldout"),
                      questions: int | None = None) -> dict:
    """Each size × split in a fresh embedded Chroma; sizes above 2,000 turns use one conversation per split."""
    from bench.memory_conv import generate
    from memory.chroma import open_chroma
    from memory.embeddings import shared_embedder
    from memory.memories import MemoryStore

    embedder = shared_embedder()
    embedder.embed(["warm up"])
    out = {"set": "conversations", "embedder": embedder.name, **cpu_path(), "runs": []}
    for size in sizes:
        for split in splits:
            convos = generate(conversations if size <= 2000 else 1, size, split)
            with tempfile.TemporaryDirectory(prefix="rapport-bench-") as tmp:
                handle = open_chroma(path=Path(tmp) / "chroma")
                try:
                    store = MemoryStore(handle.client, UncachedTimedEmbedder(embedder))
                    result = conversation_benchmark(store, embedder, convos, limit=questions)
                finally:
                    handle.close()
            out["runs"].append({"size": size, "split": split, **result})
    return out


def run(sizes=(600, 10_000), recall: bool = True, *, dataset: str = "conversations", conversations: int = 4,
        splits=("tune", "heldout"), questions: int | None = None, threads: int = 1, isa=None) -> dict:
    """`bench memory`. With `isa`, each CPU class in its own child process (torch reads its caps once, at start)."""
    if isa:
        return {"classes": {cpu: as_class(cpu, {"sizes": list(sizes), "recall": recall, "dataset": dataset,
                                                "conversations": conversations, "splits": list(splits),
                                                "questions": questions, "threads": threads}) for cpu in isa}}
    import torch

    # one intra-op thread by default: on a shared 2-core box two threads thrash (a query embedding took ~360 ms
    # instead of ~37 ms here); a serving process would pin this too
    torch.set_num_threads(threads)
    if dataset == "conversations":
        return run_conversations(sizes, conversations, splits, questions)
    return run_synthetic(sizes, recall)


def as_class(cpu_class: str, args: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    from bench.compare import CLASS_ENV

    if cpu_class not in CLASS_ENV:
        raise ValueError(f"unknown CPU class {cpu_class!r}: one of {', '.join(CLASS_ENV)}")
    done = subprocess.run([sys.executable, "-m", "bench.memory", json.dumps(args)], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, **CLASS_ENV[cpu_class]})
    if done.returncode != 0:
        raise RuntimeError(f"bench memory as {cpu_class} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_synthetic(sizes=(10_000, 100_000), recall: bool = True) -> dict:
    """The older one-speaker set: recall by mode, and latency on perturbed vectors."""
    import chromadb

    from memory.chroma import chroma_settings
    from memory.embeddings import shared_embedder
    from memory.memories import MemoryStore

    embedder = shared_embedder()
    out: dict = {"set": "synthetic", "embedder": embedder.name, **cpu_path()}
    if recall:
        store = MemoryStore(chromadb.EphemeralClient(settings=chroma_settings()), embedder)
        out["recall"] = recall_benchmark(store)
    out["latency"] = [latency_benchmark(size, embedder) for size in sizes]
    return out


if __name__ == "__main__":  # a child of `run(isa=…)`: the arguments as JSON, the result as the last line
    import json
    import sys

    print(json.dumps(run(**json.loads(sys.argv[1]))))
