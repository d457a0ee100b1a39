"""A FAQ's entry classifier: which entry does a message ask for, learned from the entries' own phrasings.

Nearest-neighbour search asks "which stored phrasing is closest"; this asks "which entry's phrasings does the
message look like, against every other entry's" — a multinomial logistic regression over the entries, on three
views of a text: its sentence vector, TF-IDF of its words and word pairs, and TF-IDF of its character n-grams
(typos: "withdrawls" still shares most of its n-grams with "withdrawals"). The IDF is the FAQ's own, so the
words that tell entries apart ("pending", "declined", "top-up") weigh more than those every entry shares.
Its probabilities join the index's fused score (memory/faq.py) when the fit's held-out phrasings say they help.

Stored beside the map of memory/faq_fit.py: `classifier.npz` (weights, IDF) and `classifier.json` (vocabularies).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORD_TOKENS = r"(?u)\b\w+\b"  # single letters too ("a card"), so "plus" and "premium" stay apart from "pin"
CHAR_NGRAMS = (2, 5)


def _vectorisers():
    from sklearn.feature_extraction.text import TfidfVectorizer

    words = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), token_pattern=WORD_TOKENS, lowercase=True)
    chars = TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=CHAR_NGRAMS, lowercase=True)
    return words, chars


class EntryClassifier:
    """P(entry | text) over a FAQ's entries; `probabilities` takes the texts and their sentence vectors."""

    def __init__(self, words, chars, coef: np.ndarray, intercept: np.ndarray) -> None:
        self.words, self.chars = words, chars
        self.coef = coef.astype(np.float32)  # (E, F): F = word n-grams + char n-grams + 384
        self.intercept = intercept.astype(np.float32)  # (E,)

    @classmethod
    def fit(cls, texts: list[str], vectors: np.ndarray, labels: np.ndarray, n_entries: int,
            c: float = 3.0) -> EntryClassifier:
        """Train on phrasings (`labels`: entry index of each); every entry index < n_entries gets a row."""
        from scipy.sparse import csr_matrix, hstack
        from sklearn.linear_model import LogisticRegression

        words, chars = _vectorisers()
        x = hstack([words.fit_transform(texts), chars.fit_transform(texts), csr_matrix(vectors)]).tocsr()
        model = LogisticRegression(C=c, max_iter=1000).fit(x, labels)
        coef = np.zeros((n_entries, x.shape[1]), np.float32)
        intercept = np.full(n_entries, -1e4, np.float32)  # an entry with no phrasing to learn from is never picked
        coef[model.classes_] = model.coef_
        intercept[model.classes_] = model.intercept_
        return cls(words, chars, coef, intercept)

    def features(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        """(Q, F) dense feature rows (a few thousand columns: fine for the few texts of one turn)."""
        return np.hstack([self.words.transform(texts).toarray(), self.chars.transform(texts).toarray(),
                          np.asarray(vectors, np.float32).reshape(len(texts), -1)]).astype(np.float32)

    def probabilities(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        """(Q, E) softmax over the entries."""
        logits = self.features(texts, vectors) @ self.coef.T + self.intercept  # (Q, E)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        np.savez(directory / "classifier.npz", coef=self.coef, intercept=self.intercept,
                 word_idf=self.words.idf_, char_idf=self.chars.idf_)
        vocab = {"words": {k: int(v) for k, v in self.words.vocabulary_.items()},
                 "chars": {k: int(v) for k, v in self.chars.vocabulary_.items()}}
        (directory / "classifier.json").write_text(json.dumps(vocab, ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path) -> EntryClassifier:
        """Raises OSError/ValueError/KeyError on a missing or damaged classifier."""
        directory = Path(directory)
        vocab = json.loads((directory / "classifier.json").read_text())
        with np.load(directory / "classifier.npz") as arrays:
            words, chars = _vectorisers()
            words.vocabulary_, chars.vocabulary_ = vocab["words"], vocab["chars"]
            words.idf_, chars.idf_ = arrays["word_idf"], arrays["char_idf"]
            classifier = cls(words, chars, arrays["coef"], arrays["intercept"])
        if classifier.coef.shape[1] != len(vocab["words"]) + len(vocab["chars"]) + 384:
            raise ValueError("classifier weights do not match its vocabularies")
        return classifier
