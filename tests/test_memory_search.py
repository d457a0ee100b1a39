"""What the memory search promises, on the real MiniLM and a real Chroma in a temp dir, and `bench memory` run small."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from memory.embeddings import DIMENSIONS, VectorIndex
from memory.memories import MemoryItem, MemoryStore, parse_jsonl

SMALL_TALK = ["Same old, work and more work.", "The weather was lovely today.", "I had pasta for lunch.",
              "Cities are so expensive nowadays.", "Haha, that's awesome!", "Let's catch up again soon!"]


def open_store(path, embedder) -> MemoryStore:
    import chromadb

    from memory.chroma import chroma_settings

    return MemoryStore(chromadb.PersistentClient(path=str(path), settings=chroma_settings()), embedder)


@pytest.fixture
def store(tmp_path, embedder):
    return open_store(tmp_path / "chroma", embedder)


def lines(*pairs, start: str = "2024-03-0") -> list[MemoryItem]:
    """(speaker, text) pairs as `memory import` lines, one turn each, a day apart."""
    return parse_jsonl("".join(json.dumps({"text": text, "speaker": speaker, "timestamp": f"{start}{i % 9 + 1}T10:00:00Z",
                                           "meta": {"turn": i}}) + "\n" for i, (speaker, text) in enumerate(pairs)).encode())


def test_a_question_finds_the_statement_in_other_words(store):
    memory = store.for_user("lena")
    memory.add([MemoryItem(text=t) for t in SMALL_TALK + ["I moved to Porto last year and I love the old town.",
                                                        "My sister works in a bakery."]])
    assert "Porto" in " ".join(hit.text for hit in memory.search("Which city do I live in?", k=2))


def test_the_speaker_a_question_names_comes_first(store):
    """Jon's own lines never say "Jon"; the other speaker's greetings do, and must not win."""
    memory = store.for_user("pair")
    ids = memory.add(lines(("Melanie", "Hey Jon! How have you been?"), ("Jon", "I work as a paramedic, night shifts again."),
                           ("Melanie", "Thanks Jon, talk soon!"), ("Melanie", "I work as a pharmacist in town."),
                           ("Jon", "Haha, that's awesome!"), ("Melanie", "Hi Jon, so good to hear from you!")))
    hits = memory.search("What does Jon do for a living?", k=3)
    assert hits[0].id == ids[1] and hits[0].speaker == "Jon"
    hits = memory.search("What is Melanie's job?", k=3)
    assert hits[0].id == ids[3]


def test_a_newer_statement_outranks_the_one_it_supersedes(store):
    memory = store.for_user("mover")
    old, new = memory.add([MemoryItem(text="I live in Lyon.", timestamp="2023-01-10T10:00:00Z"),
                           MemoryItem(text="I've lived in Porto since we moved in May.", timestamp="2024-05-02T10:00:00Z")])
    memory.add([MemoryItem(text=t, timestamp="2023-06-01T10:00:00Z") for t in SMALL_TALK])
    assert [hit.id for hit in memory.search("Where do I live now?", k=2)] == [new, old]


def test_small_talk_said_again_is_returned_once(store):
    memory = store.for_user("chatty")
    memory.add(lines(*[("Ana", "Same old, work and more work.")] * 5, ("Ana", "I started a new job at Helix Medical.")))
    texts = [hit.text for hit in memory.search("Where does Ana work?", k=5)]
    assert texts.count("Same old, work and more work.") == 1 and "I started a new job at Helix Medical." in texts


def test_one_users_memories_never_reach_another_even_after_a_cold_start(tmp_path, embedder):
    store = open_store(tmp_path / "chroma", embedder)
    a, b = store.for_user("alice"), store.for_user("bob")
    a_ids = set(a.add([MemoryItem(text="My dog is called Rex."), MemoryItem(text="I live in Lyon.")] +
                      [MemoryItem(text=t) for t in SMALL_TALK]))
    b_ids = set(b.add([MemoryItem(text="My dog is called Biscuit."), MemoryItem(text="I live in Porto.")]))
    queries = ["What is my dog called?", "Biscuit", "Where do I live now?", "Porto"]
    before = {q: [hit.id for hit in a.search(q, k=10)] for q in queries}
    assert all(set(ids) <= a_ids for ids in before.values()) and all(before.values())
    # a new process: the mirror and the vectors come back from Chroma, and rank the same
    fresh = open_store(tmp_path / "chroma", embedder)
    assert {q: [hit.id for hit in fresh.for_user("alice").search(q, k=10)] for q in queries} == before
    rex = before["What is my dog called?"][0]
    fresh.for_user("alice").forget(rex)
    assert rex not in {hit.id for q in queries for hit in fresh.for_user("alice").search(q, k=10)}
    assert {hit.id for hit in fresh.for_user("bob").search("Biscuit", k=10)} <= b_ids


def test_vector_index_matches_brute_force_through_removals():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(3000, DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex()
    for i, vector in enumerate(vectors):
        index.add(f"m{i}", vector)
    for i in range(0, 3000, 2):  # 1500 removals: compaction runs
        index.remove(f"m{i}")
    index.add("m1", -vectors[1])  # a replaced vector
    query = vectors[7]
    keys, scores = index.scores(query)
    got = {key: float(score) for key, score in zip(keys, scores) if key is not None}
    want = {f"m{i}": float(vectors[i] @ query) for i in range(1, 3000, 2)}
    want["m1"] = -want["m1"]
    assert len(index) == 1500 and got.keys() == want.keys()
    assert max(abs(got[key] - want[key]) for key in want) < 1e-5
    assert np.allclose(index.rows(["m7", "m1", "gone"]), np.stack([vectors[7], -vectors[1], np.zeros(DIMENSIONS)]))


def test_generated_conversations_are_deterministic_and_well_formed():
    from bench.memory_conv import SPLITS, generate

    one, again = generate(2, 300, "tune"), generate(2, 300, "tune")
    assert [c.jsonl() for c in one] == [c.jsonl() for c in again]
    assert not set(SPLITS["tune"]["names"]) & set(SPLITS["heldout"]["names"])
    for convo in one + generate(1, 300, "heldout"):
        assert {turn["speaker"] for turn in convo.turns} == set(convo.speakers)
        kinds = {q.kind for q in convo.questions}
        assert kinds == {"static", "changed", "event"}
        for question in convo.questions:
            speaker = convo.turns[question.evidence[0]]["speaker"]
            assert speaker in question.text  # asked about the one who said it
        assert len(parse_jsonl(convo.jsonl())) == len(convo.turns)


def test_bench_memory_runs_small(embedder, monkeypatch, capsys, tmp_path):
    import torch

    from bot.cli.main import main

    monkeypatch.setenv("RAPPORT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "argv", ["rapport", "bench", "memory", "--sizes", "80", "--conversations", "1",
                                      "--questions", "8", "--json"])
    threads = torch.get_num_threads()
    try:
        main()
    except SystemExit as exited:
        assert not exited.code
    finally:
        torch.set_num_threads(threads)  # the bench pins one thread for itself
    result = json.loads(capsys.readouterr().out)
    assert result["cpu_class"] and result["torch_threads"] == 1
    assert [(run["size"], run["split"]) for run in result["runs"]] == [(80, "tune"), (80, "heldout")]
    for run in result["runs"]:
        assert run["questions"] == 8 and run["foreign_hits"] == 0 and run["search_ms_p95"] > 0
        for mode in ("product", "dense", "bm25"):
            assert 0 <= run[mode]["recall@1"] <= run[mode]["recall@5"] <= run[mode]["recall@10"] <= 1
        assert run["product"]["recall@10"] >= 0.5
