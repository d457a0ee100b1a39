"""The FAQ's own encoder (memory/faq_tune.py): fine-tuned, judged, stored, reloaded and used, with the real MiniLM."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import chromadb
import numpy as np
import pytest

from memory.faq import FaqIndex
from memory.faq_files import make_entry
from memory.faq_fit import FitConfig, FitStore
from memory.faq_tune import WEIGHTS, TuneConfig, augment, padded, typo

BANK = Path(__file__).resolve().parent.parent / "bench" / "data" / "faq_bank.jsonl"
# the map left at the identity (no steps) and no classifier: the encoder is judged against the plain embedder
FAST = dict(steps=0, classifier=False)
TUNE = TuneConfig(layers=2, min_steps=8, lr=2e-4)  # 12 entries: 0.667 plain -> 0.75 in about 5 s


def bank_entries(n: int) -> list:
    rows = [json.loads(line) for line in BANK.read_text().splitlines()][:n]
    return [make_entry(r["id"], r["question"], r["answer"], r["tags"], r["alternates"]) for r in rows]


def index_in(home: Path, embedder, config: FitConfig, name: str | None = None) -> FaqIndex:
    return FaqIndex(chromadb.PersistentClient(str(home / "chroma")), embedder, fit_dir=home / "faq_fit",
                    collection=name or f"faq-{uuid.uuid4().hex[:8]}", fit_config=config)


def test_augmented_phrasings_keep_their_words_mostly():
    rng = random.Random(0)
    text = "How much does the card cost per year?"
    slipped = typo(text, rng)
    assert slipped != text and abs(len(slipped) - len(text)) <= 4
    assert text in padded(text, rng)
    assert augment(text, rng, 0.0) == text


@pytest.fixture(scope="module")
def tuned_home(embedder, tmp_path_factory):
    """A 12-entry FAQ fitted once with the encoder on (the map and classifier off)."""
    home = tmp_path_factory.mktemp("home")
    plain_before = embedder.embed(["Is the debit card free?"])
    index = index_in(home, embedder, FitConfig(**FAST, encoder=True, tune=TUNE))
    index.upsert(bank_entries(12))
    return home, index, plain_before


def test_the_encoder_is_fitted_saved_and_used_for_the_faq_only(tuned_home, embedder):
    home, index, plain_before = tuned_home
    fit = index.last_fit
    assert fit.trained and fit.encoder_used and not fit.used and fit.encoder_top1 > fit.plain_top1
    assert fit.encoder_seconds and fit.encoder_seconds > 0
    weights = home / "faq_fit" / fit.fingerprint / WEIGHTS
    assert weights.exists() and not (weights.parent / "adapter.npy").exists()
    from safetensors.torch import load_file

    state = load_file(str(weights))  # only the trained layers: the top 2 of 6
    assert state and all(".encoder.layer.4." in k or ".encoder.layer.5." in k for k in state)

    snap = index.snapshot()
    assert snap.encoder is not None
    query = "do u charge every year just for havin the card"
    tuned = snap.encoder.embed([query])[0]
    plain = embedder.embed([query])[0]
    assert not np.allclose(tuned, plain, atol=1e-3)  # a different encoder ...
    assert np.allclose(embedder.embed(["Is the debit card free?"]), plain_before, atol=1e-6)  # ... the plain one untouched
    # the dense scores come from the tuned space (the entries re-embedded, the query too); the scope features
    # keep the plain vector
    space = snap.encoder.embed(snap.texts)
    expected = (space - space.mean(0)) / np.linalg.norm(space - space.mean(0), axis=1, keepdims=True)
    assert np.allclose(snap.centred, expected, atol=1e-4)
    assert np.allclose(index.analyse(snap, query).vector, plain, atol=1e-6)

    # reopened from disk (a new process would do the same): the same encoder, the same hits and scores
    reopened = index_in(home, embedder, FitConfig(**FAST, encoder=True, tune=TUNE), name=index.name)
    again = reopened.snapshot()
    assert again.encoder is not None and again.encoder is not snap.encoder
    assert np.allclose(again.encoder.embed([query]), tuned[None], atol=1e-5)
    assert [(h.id, round(h.score, 4)) for h in reopened.search(query, 3)] == \
        [(h.id, round(h.score, 4)) for h in index.search(query, 3)]


def test_an_unchanged_faq_is_not_refitted_and_a_damaged_encoder_is(tuned_home, embedder):
    home, index, _ = tuned_home
    fp = index.last_fit.fingerprint
    weights = home / "faq_fit" / fp / WEIGHTS
    written = weights.stat().st_mtime_ns
    index.upsert(bank_entries(12))
    assert not index.last_fit.trained and index.last_fit.fingerprint == fp and index.last_fit.encoder_used
    assert weights.stat().st_mtime_ns == written
    store = FitStore(home / "faq_fit")
    assert store.load(fp)[3] is not None
    copy = weights.read_bytes()
    weights.write_bytes(b"damaged")
    assert store.load(fp) is None  # refitted, never trusted
    weights.write_bytes(copy)


def test_turning_the_encoder_off_refits_the_same_faq_without_it(tuned_home, embedder):
    home, index, _ = tuned_home
    plain = index_in(home, embedder, FitConfig(**FAST), name=index.name)  # the same collection, RAPPORT_FAQ_ENCODER off
    result = plain.refit()  # its own fit: the stored one asked for an encoder
    assert result.trained and result.fingerprint != index.last_fit.fingerprint and not result.encoder_used
    assert plain.snapshot().encoder is None and index.snapshot().encoder is not None


def test_a_worse_encoder_is_not_used(embedder, tmp_path):
    # a negative temperature pushes each entry's phrasings apart: a real, bad fine-tune
    config = FitConfig(**FAST, encoder=True, tune=TuneConfig(layers=2, min_steps=6, temperature=-0.05, lr=2e-4))
    index = index_in(tmp_path, embedder, config)
    index.upsert(bank_entries(12))
    fit = index.last_fit
    assert fit.trained and not fit.encoder_used and fit.encoder_top1 < fit.plain_top1
    assert not (tmp_path / "faq_fit" / fit.fingerprint / WEIGHTS).exists()
    assert index.snapshot().encoder is None
    index.upsert(bank_entries(12))  # the rejected fit is remembered, not retrained
    assert not index.last_fit.trained
