"""The FAQ's entry classifier (memory/faq_classifier.py), its gate in the fit, and the entry centroid in search."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import chromadb
import numpy as np
import pytest

from memory.faq import FaqIndex
from memory.faq_classifier import EntryClassifier
from memory.faq_files import make_entry
from memory.faq_fit import CLASSIFIER_WEIGHT, FitConfig, FitStore, fit_adapter

BANK = Path(__file__).resolve().parent.parent / "bench" / "data" / "faq_bank.jsonl"


def bank_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in BANK.read_text().splitlines()][:n]


@pytest.fixture(scope="module")
def phrasings(embedder):
    """(texts, vectors, labels) of 12 bank entries' questions and alternates."""
    texts, labels = [], []
    for i, row in enumerate(bank_rows(12)):
        for text in [row["question"], *row["alternates"]]:
            texts.append(text)
            labels.append(i)
    return texts, embedder.embed(texts), np.array(labels)


def test_the_classifier_learns_the_entries_and_survives_a_round_trip(phrasings, embedder, tmp_path):
    texts, vectors, labels = phrasings
    classifier = EntryClassifier.fit(texts, vectors, labels, 13)  # entry 12 has no phrasing
    p = classifier.probabilities(texts, vectors)
    assert p.shape == (len(texts), 13) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(p.argmax(axis=1) == labels) >= 0.95 and p[:, 12].max() < 1e-6
    classifier.save(tmp_path)
    again = EntryClassifier.load(tmp_path)
    queries = ["is there a limit on free cash withdrawls per month", "wats the yearly cost of the card"]
    q_vectors = embedder.embed(queries)
    assert np.allclose(again.probabilities(queries, q_vectors), classifier.probabilities(queries, q_vectors), atol=1e-6)
    (tmp_path / "classifier.json").write_text('{"words": {}}')
    with pytest.raises((KeyError, ValueError)):
        EntryClassifier.load(tmp_path)


def test_character_ngrams_tolerate_typos(phrasings, embedder):
    texts, vectors, labels = phrasings
    classifier = EntryClassifier.fit(texts, vectors, labels, 12)
    rows = bank_rows(12)
    atm = next(i for i, r in enumerate(rows) if r["id"] == "atm-fee")
    typo = "do u chrage for withdrawls at a cashpoint machnie"
    # with the sentence vector zeroed, only the word and character views speak: the typos still find the entry
    p = classifier.probabilities([typo], np.zeros((1, vectors.shape[1]), np.float32))[0]
    assert int(p.argmax()) == atm


def test_the_gate_keeps_the_classifier_only_when_the_held_out_phrasings_say_so(phrasings):
    texts, vectors, labels = phrasings
    kinds = np.array(["question" if i == 0 or labels[i] != labels[i - 1] else "alternate" for i in range(len(labels))])
    result, weight, classifier = fit_adapter(vectors, labels, kinds, "fp", FitConfig(steps=20), texts)
    assert result.held_out == 12 and result.classifier_top1 is not None
    best_alone = max(result.plain_top1, result.fitted_top1)
    assert result.classifier_used == (result.classifier_top1 > best_alone) == (classifier is not None)
    # a classifier this strongly regularised predicts almost nothing: never better, never used
    weak, _, none = fit_adapter(vectors, labels, kinds, "fp", FitConfig(steps=20, classifier_c=1e-6), texts)
    assert not weak.classifier_used and none is None and "classifier not better" in weak.reason
    off, _, none = fit_adapter(vectors, labels, kinds, "fp", FitConfig(steps=20, classifier=False), texts)
    assert off.classifier_top1 is None and none is None


def test_a_stored_classifier_is_loaded_with_its_fit_and_moves_the_scores(phrasings, tmp_path, embedder):
    texts, vectors, labels = phrasings
    kinds = np.array(["question" if i == 0 or labels[i] != labels[i - 1] else "alternate" for i in range(len(labels))])
    result, weight, _ = fit_adapter(vectors, labels, kinds, "fp", FitConfig(steps=20, classifier=False), texts)
    classifier = EntryClassifier.fit(texts, vectors, labels, 12)
    forced = type(result)(**{**result.to_json(), "classifier_used": True})
    store = FitStore(tmp_path / "faq_fit")
    store.save(forced, weight, classifier)
    loaded = store.load("fp")
    assert loaded is not None and loaded[2] is not None and loaded[0].classifier_used
    (tmp_path / "faq_fit" / "fp" / "classifier.npz").write_bytes(b"damaged")
    assert store.load("fp") is None  # a damaged fit is refitted, never trusted

    # in the index: the fused score is the one without the classifier plus CLASSIFIER_WEIGHT × its probability
    entries = [make_entry(r["id"], r["question"], r["answer"], r["tags"], r["alternates"]) for r in bank_rows(12)]
    index = FaqIndex(chromadb.EphemeralClient(), embedder, collection=f"faq-{uuid.uuid4().hex[:8]}",
                     fit_dir=tmp_path / "fits", fit_config=FitConfig(steps=20, encoder=False))
    index.upsert(entries)
    snap = index.snapshot()
    query = "tapped my card on the bus and it didnt go"
    rows = np.flatnonzero(snap.kinds != "answer")
    own = EntryClassifier.fit([snap.texts[i] for i in rows], snap.raw[rows], snap.owner[rows], 12)
    snap.classifier = None  # (whatever the gate chose for this FAQ)
    without = index.analyse(snap, query).fused
    snap.classifier = own
    added = own.probabilities([query], embedder.embed_one(query)[None])[0]
    assert np.allclose(index.analyse(snap, query).fused, without + CLASSIFIER_WEIGHT * added, atol=1e-5)


def test_each_entry_is_scored_by_its_nearest_phrasing_and_its_centroid(embedder):
    entries = [make_entry(r["id"], r["question"], r["answer"], r["tags"], r["alternates"]) for r in bank_rows(12)]
    client = chromadb.EphemeralClient()
    fused = FaqIndex(client, embedder, collection=f"faq-{uuid.uuid4().hex[:8]}")
    nearest = FaqIndex(client, embedder, collection=f"faq-{uuid.uuid4().hex[:8]}", nearest_weight=1.0)
    fused.upsert(entries)
    nearest.upsert(entries)
    snap = fused.snapshot()
    assert snap.centroids.shape == (12, 384) and np.allclose(np.linalg.norm(snap.centroids, axis=1), 1.0, atol=1e-5)
    query = "is there an option to go a little bit into minus at the end of the month"
    a, b = fused.analyse(snap, query).fused, nearest.analyse(nearest.snapshot(), query).fused
    assert not np.allclose(a, b)  # the centroid counts
    assert [h.id for h in fused.search("How much does the card cost per year?", 1)] == ["card-annual-fee"]
