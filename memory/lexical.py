"""Okapi BM25 over one user's memories, kept in memory and updated in place (no rebuild per search).

bm25s builds a static index; memories arrive one turn at a time and must be searchable at once, so this is a
small inverted index with postings in compact arrays, scored with numpy: about a millisecond at 100k documents.
"""

from __future__ import annotations

import functools
import re
import threading
from array import array

import numpy as np

TOKEN = re.compile(r"\w+", re.UNICODE)
# English function words; negations stay (they change a fact) and so do numbers (dates, counts, prices).
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just let me more most my myself of off on once only
or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves s t d ll m re ve o y im ive id
also ok okay oh yeah yes hi hey hello thanks thank please really well just like get got
""".split())


@functools.lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """A light suffix stripper: enough to meet "dogs"/"dog", "moving"/"moved"/"move" halfway."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, keep in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("edly", ""), ("ed", ""), ("es", "e"),
                         ("ly", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: len(word) - len(suffix)] + keep
            break
    if word.endswith("e") and len(word) > 4:  # "move"/"moving" → "mov"
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Content terms of a text, lower-cased and stemmed; "don't" keeps its "not"."""
    text = text.lower().replace("n't", " not").replace("’", "'")
    return [stem(w) for w in TOKEN.findall(text) if w not in STOPWORDS and len(w) < 40]


class LexicalIndex:
    """BM25 over string keys; `add`/`remove` are cheap, removed slots are compacted away when they pile up."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._keys: list[str | None] = []  # slot → key (None = removed)
        self._slot: dict[str, int] = {}
        self._lengths = array("f")  # slot → number of terms (0 once removed)
        self._terms: list[tuple[str, ...]] = []  # slot → its distinct terms (to undo df on removal)
        self._postings: dict[str, tuple[array, array]] = {}  # term → (slots int32, term frequencies float32)
        self._df: dict[str, int] = {}  # term → live documents containing it
        self._total_length = 0.0
        self._dead = 0
        # numpy views pin the arrays' buffers (an append would fail), so readers and writers take turns
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: str) -> bool:
        return key in self._slot

    def add(self, key: str, text: str) -> None:
        with self._lock:
            self._add(key, text)

    def remove(self, key: str) -> None:
        with self._lock:
            self._remove(key)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Up to `k` (key, BM25 score) pairs, best first; only documents sharing a term with the query."""
        with self._lock:
            return self._search(query, k)

    def _add(self, key: str, text: str) -> None:
        if key in self._slot:
            self._remove(key)
        terms = tokenize(text)
        slot = len(self._keys)
        self._keys.append(key)
        self._slot[key] = slot
        self._lengths.append(len(terms))
        self._total_length += len(terms)
        counts: dict[str, int] = {}
        for term in terms:
            counts[term] = counts.get(term, 0) + 1
        self._terms.append(tuple(counts))
        for term, count in counts.items():
            posting = self._postings.get(term)
            if posting is None:
                posting = self._postings[term] = (array("i"), array("f"))
            slots, freqs = posting
            slots.append(slot)
            freqs.append(count)
            self._df[term] = self._df.get(term, 0) + 1

    def _remove(self, key: str) -> None:
        slot = self._slot.pop(key, None)
        if slot is None:
            return
        self._keys[slot] = None
        self._total_length -= self._lengths[slot]
        self._dead += 1
        # df drops now (idf counts live documents); the dead slot's postings go at the next compaction and
        # until then its frequencies are zeroed so it cannot score
        for term in self._terms[slot]:
            self._df[term] -= 1
            slots, freqs = self._postings[term]
            arr = np.frombuffer(slots, dtype=np.int32)
            np.frombuffer(freqs, dtype=np.float32)[int(np.searchsorted(arr, slot))] = 0.0
        self._terms[slot] = ()
        if self._dead > 1000 and self._dead > len(self._keys) // 3:
            self._compact()

    def _compact(self) -> None:
        """Renumber live slots and drop dead postings: O(total postings), run rarely."""
        live = [i for i, key in enumerate(self._keys) if key is not None]
        renumber = np.full(len(self._keys), -1, dtype=np.int32)
        renumber[live] = np.arange(len(live), dtype=np.int32)
        postings = {}
        for term, (slots, freqs) in self._postings.items():
            old = np.frombuffer(slots, dtype=np.int32)
            new = renumber[old]
            keep = new >= 0
            if keep.any():
                kept_freqs = np.frombuffer(freqs, dtype=np.float32)[keep]
                postings[term] = (array("i", new[keep].tobytes()), array("f", kept_freqs.tobytes()))
        self._postings = postings
        self._df = {term: len(slots) for term, (slots, _) in postings.items()}
        self._keys = [self._keys[i] for i in live]
        self._lengths = array("f", [self._lengths[i] for i in live])
        self._terms = [self._terms[i] for i in live]
        self._slot = {key: i for i, key in enumerate(self._keys)}
        self._dead = 0

    def _search(self, query: str, k: int) -> list[tuple[str, float]]:
        live = len(self._slot)
        if not live or k <= 0:
            return []
        terms = set(tokenize(query))
        lengths = np.frombuffer(self._lengths, dtype=np.float32)
        norm = self.k1 * (1 - self.b + self.b * lengths / max(self._total_length / live, 1e-9))  # (N,)
        scores = np.zeros(len(self._keys), dtype=np.float32)
        for term in terms:
            if term not in self._postings or self._df.get(term, 0) <= 0:
                continue
            slots, freqs = self._postings[term]
            slots_np = np.frombuffer(slots, dtype=np.int32)
            tf = np.frombuffer(freqs, dtype=np.float32)
            df = self._df[term]
            idf = np.log(1 + (live - df + 0.5) / (df + 0.5))
            scores[slots_np] += idf * tf * (self.k1 + 1) / (tf + norm[slots_np])
        hits = np.flatnonzero(scores > 0)
        if not len(hits):
            return []
        top = hits[np.argsort(-scores[hits], kind="stable")[:k]]
        return [(self._keys[i], float(scores[i])) for i in top]

