"""The business FAQ: entries in one Chroma collection, hybrid search, and the answer policy for a message.

Every entry is stored as several vectors (its question, each alternate phrasing, its answer); a search scores
each entry by its best vector, after centring all vectors on the FAQ's mean so that what every question of
one business shares ("bike", "shop") stops counting as similarity, and adds a BM25 bonus for shared words.
`decide` turns the top hits into a level (answer / ground / unknown / none) with a small logistic model
calibrated on `examples/faq` (see `rapport bench faq --calibrate`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Literal

import numpy as np

from memory.errors import InvalidInput, NotFound, RapportError, StoreUnavailable
from memory.faq_files import FaqEntry, make_entry, parse_faq_file
from memory.faq_text import (BUSINESS_PROTOTYPES, CHAT_PROTOTYPES, STOPWORDS, UNKNOWN_REPLY, WORD,
                             content_words, fact_keys, stated_facts, stem)

__all__ = ["FaqEntry", "FaqHit", "FaqDecision", "DecisionModel", "FaqIndex", "parse_faq_file", "grounded_reply",
           "ungrounded_facts", "checked_reply", "UNKNOWN_REPLY"]

logger = logging.getLogger(__name__)

COLLECTION = "faq"
MAX_QUERY_CHARS = 2000
MAX_K = 50
BM25_WEIGHT = 0.3  # fused = centred cosine + BM25_WEIGHT * bm25 / (bm25 + BM25_HALF)
BM25_HALF = 5.0
MAX_QUERY_TERMS = 16


@dataclass(frozen=True)
class FaqHit:
    """One entry found for a query; `score` is 0..1, higher is better."""

    id: str
    question: str
    answer: str
    score: float
    tags: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The `--json` search item of SPEC: {"id", "text", "score", "meta"}."""
        return {"id": self.id, "text": self.answer, "score": round(self.score, 4),
                "meta": {"question": self.question, "tags": list(self.tags)}}


@dataclass(frozen=True)
class FaqDecision:
    """What the turn should do with a message: answer from the FAQ, ground on it, say it does not know, or chat."""

    level: Literal["answer", "ground", "unknown", "none"]
    hits: list[FaqHit]
    confidence: float = 0.0  # P(the FAQ covers this message), from the calibrated model

    @property
    def handoff(self) -> bool:
        return self.level == "unknown"

    def sources(self) -> list[dict]:
        """`sources` items for a reply: the entries the reply rests on."""
        used = self.hits[:1] if self.level == "answer" else self.hits if self.level == "ground" else []
        return [{"kind": "faq", "id": hit.id, "score": round(hit.score, 4)} for hit in used]


@dataclass(frozen=True)
class DecisionModel:
    """confidence = sigmoid(bias + w_score·score + w_gap·gap + w_margin·margin), thresholds on it."""

    bias: float
    w_score: float
    w_gap: float  # gap: how much a salient word of the message is missing from the top entry (0..1)
    w_margin: float  # margin: top entry's fused score minus the runner-up's
    unknown_below: float
    answer_from: float
    answer_margin: float
    chat_margin: float = 0.0  # "none" when chat-likeness exceeds business-likeness + chat_margin

    def confidence(self, score: float, gap: float, margin: float) -> float:
        z = self.bias + self.w_score * score + self.w_gap * gap + self.w_margin * margin
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


# Fitted by `rapport bench faq --calibrate` on the calibration halves of examples/faq: unknown_below is the
# strictest threshold that turns away ≥ 90 % of the calibration out-of-scope questions while keeping in-scope
# coverage within 3 points of the best such threshold; answer_from/answer_margin the loosest pair whose
# verbatim answers are ≥ 95 % right there.
DEFAULT_MODEL = DecisionModel(bias=-1.34, w_score=8.838, w_gap=-16.599, w_margin=3.319, unknown_below=0.59,
                              answer_from=0.61, answer_margin=0.06, chat_margin=-0.1)


def grounded_reply(decision: FaqDecision) -> str | None:
    """The fixed reply for `answer` (the entry's own text) and `unknown` (no invention, offer a human)."""
    if decision.level == "answer" and decision.hits:
        return decision.hits[0].answer
    if decision.level == "unknown":
        return UNKNOWN_REPLY
    return None


def ungrounded_facts(reply: str, hits: list[FaqHit]) -> list[str]:
    """Numbers, prices, phone numbers, times, dates, emails and URLs in `reply` that no hit states."""
    known = set()
    for hit in hits:
        known |= fact_keys(f"{hit.question}\n{hit.answer}")
    parts = {p for key in known for p in key.split(":", 1)[1].split()}
    out = []
    for written, key in stated_facts(reply):
        if key in known:
            continue
        if key.startswith("date:") and all(p in parts or "num:" + p.lstrip("0") in known for p in key[5:].split()):
            continue  # "25 December" grounded by "25 and 26 December"
        out.append(written)
    return out


def checked_reply(decision: FaqDecision, generated: str) -> tuple[str, list[str]]:
    """A model reply grounded on `decision.hits`, or the safe fixed reply when it states a fact they do not.

    Returns (reply, invented facts). The fallback for `answer` is the entry's own text; for `ground` (the top
    entry may be the wrong one) it is the "I don't know, shall I connect you" reply, which means handoff.
    """
    invented = ungrounded_facts(generated, decision.hits)
    if not invented:
        return generated, []
    if decision.level == "answer" and decision.hits:
        return decision.hits[0].answer, invented
    return UNKNOWN_REPLY, invented


def content_hash(entry: FaqEntry) -> str:
    return sha256(json.dumps(entry.to_json(), sort_keys=True).encode()).hexdigest()[:32]


def normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, 1e-9)


@dataclass
class Snapshot:
    """The collection as read at one revision, with what search needs in memory."""

    revision: str
    entries: list[FaqEntry]
    owner: np.ndarray  # (N,) entry index of each vector
    raw: np.ndarray  # (N, 384) unit vectors as stored
    centred: np.ndarray  # (N, 384) unit vectors after subtracting the centroid
    centroid: np.ndarray  # (384,)
    bm25: object | None
    stems: list[set[str]]  # per entry: stemmed content words of question, alternates, answer, tags
    surfaces: list[list[str]]  # per entry: those words as written (for embedding)


@dataclass
class Analysis:
    """One query scored against every entry."""

    vector: np.ndarray  # (384,)
    fused: np.ndarray  # (E,) centred dense + BM25 bonus
    raw_best: float  # best plain cosine to any stored vector


class FaqIndex:
    """The FAQ in one Chroma collection (embeddings passed in, never Chroma's own)."""

    def __init__(self, client, embedder, *, collection: str = COLLECTION, model: DecisionModel = DEFAULT_MODEL) -> None:
        self.client = client
        self.embedder = embedder
        self.name = collection
        self.model = model
        self._lock = threading.RLock()
        self._snapshot: Snapshot | None = None
        self._word_vectors: dict[str, np.ndarray] = {}
        self._prototypes: tuple[np.ndarray, np.ndarray] | None = None
        try:
            self.collection = client.get_or_create_collection(
                collection, embedding_function=None, configuration={"hnsw": {"space": "cosine"}},
                metadata={"revision": "new"})
        except Exception as exc:
            raise StoreUnavailable(f"cannot open the FAQ collection: {exc}") from exc

    # -- writing -----------------------------------------------------------------------------------------

    def upsert(self, entries: list[FaqEntry]) -> dict:
        """Add new entries, replace changed ones, skip identical ones: {"added", "updated", "unchanged"}."""
        checked = []
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            try:
                entry = make_entry(entry.id, entry.question, entry.answer, entry.tags, entry.alternates)
            except (ValueError, AttributeError) as exc:
                raise InvalidInput(f"FAQ entry {i + 1}: {exc}") from None
            if entry.id in seen:
                raise InvalidInput(f"FAQ entry {i + 1}: duplicate id {entry.id!r}")
            seen.add(entry.id)
            checked.append(entry)
        with self._lock:
            current = {m["entry_id"]: m for m in self._main_metadata()}
            next_seq = max((m["seq"] for m in current.values()), default=-1) + 1
            added, updated, unchanged = [], [], 0
            for entry in checked:
                old = current.get(entry.id)
                if old is None:
                    added.append((entry, next_seq))
                    next_seq += 1
                elif old["hash"] != content_hash(entry):
                    updated.append((entry, old["seq"]))
                else:
                    unchanged += 1
            todo = added + updated
            if todo:
                try:
                    self._write(todo, replace=[e.id for e, _ in updated])
                except RapportError:
                    raise
                except Exception as exc:
                    self._snapshot = None
                    raise StoreUnavailable(f"the FAQ store cannot be written: {exc}") from exc
            return {"added": len(added), "updated": len(updated), "unchanged": unchanged}

    def import_file(self, path: Path) -> dict:
        """Parse and validate the whole file, then upsert it; a bad file changes nothing."""
        return self.upsert(parse_faq_file(Path(path)))

    def delete(self, entry_id: str) -> None:
        """Remove one entry and all its vectors; NotFound if there is none."""
        with self._lock:
            self.get(entry_id)
            self.collection.delete(where={"entry_id": entry_id})
            self._bump()

    def _write(self, todo: list[tuple[FaqEntry, int]], replace: list[str]) -> None:
        ids, texts, metas = [], [], []
        for entry, seq in todo:
            main = {"entry_id": entry.id, "kind": "question", "seq": seq, "hash": content_hash(entry),
                    "entry": json.dumps(entry.to_json(), ensure_ascii=False)}
            rows = [(f"{entry.id}#q", entry.question, main)]
            rows += [(f"{entry.id}#alt{n}", alt, {"entry_id": entry.id, "kind": "alternate"})
                     for n, alt in enumerate(entry.alternates)]
            rows.append((f"{entry.id}#answer", entry.answer, {"entry_id": entry.id, "kind": "answer"}))
            for row_id, text, meta in rows:
                ids.append(row_id)
                texts.append(text)
                metas.append(meta)
        vectors = self.embedder.embed(texts)  # before any write: a failure here leaves the store as it was
        for entry_id in replace:  # an updated entry may have fewer alternates: drop its old vectors first
            self.collection.delete(where={"entry_id": entry_id})
        batch = max(1, min(4000, self._max_batch()))
        for start in range(0, len(ids), batch):
            end = start + batch
            self.collection.upsert(ids=ids[start:end], embeddings=vectors[start:end], documents=texts[start:end],
                                   metadatas=metas[start:end])
        self._bump()

    def _max_batch(self) -> int:
        try:
            return int(self.client.get_max_batch_size())
        except Exception:
            return 1000

    def _bump(self) -> None:
        self.collection.modify(metadata={"revision": uuid.uuid4().hex})
        self._snapshot = None

    # -- reading -----------------------------------------------------------------------------------------

    def _main_metadata(self) -> list[dict]:
        got = self.collection.get(where={"kind": "question"}, include=["metadatas"])
        return got["metadatas"] or []

    def _revision(self) -> str:
        meta = self.client.get_collection(self.name, embedding_function=None).metadata or {}
        return str(meta.get("revision", ""))

    def snapshot(self) -> Snapshot:
        """The in-memory view, rebuilt when another writer (or this one) changed the collection."""
        with self._lock:
            try:
                revision = self._revision()
                if self._snapshot is None or self._snapshot.revision != revision:
                    self._snapshot = self._load(revision)
            except Exception as exc:  # chromadb raises plain ValueError/ConnectionError kinds
                raise StoreUnavailable(f"the FAQ store cannot be read: {exc}") from exc
            return self._snapshot

    def _load(self, revision: str) -> Snapshot:
        got = self.collection.get(include=["metadatas", "embeddings"])
        metas, vectors = got["metadatas"] or [], got["embeddings"]
        mains = sorted((m for m in metas if m.get("kind") == "question"), key=lambda m: m["seq"])
        entries = [FaqEntry(**json.loads(m["entry"])) for m in mains]
        position = {e.id: i for i, e in enumerate(entries)}
        keep = [i for i, m in enumerate(metas) if m.get("entry_id") in position]
        raw = np.asarray(vectors, dtype=np.float32)[keep] if keep else np.zeros((0, 384), np.float32)
        owner = np.array([position[metas[i]["entry_id"]] for i in keep], dtype=np.int64)
        centroid = raw.mean(axis=0) if len(raw) else np.zeros(raw.shape[1], np.float32)
        texts = [" ".join([e.question, *e.alternates, e.answer, *e.tags]) for e in entries]
        bm25 = None
        if entries:
            import bm25s

            logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets itself to DEBUG on import
            bm25 = bm25s.BM25()
            bm25.index([content_words(t) or ["_"] for t in texts], show_progress=False)
        surfaces = [sorted({w for w in WORD.findall(t.lower().replace("'", "")) if w not in STOPWORDS}) for t in texts]
        return Snapshot(revision, entries, owner, raw, normalise(raw - centroid), centroid, bm25,
                        [set(content_words(t)) for t in texts], surfaces)

    def list(self) -> list[FaqEntry]:
        """Every entry, in import order."""
        return list(self.snapshot().entries)

    def get(self, entry_id: str) -> FaqEntry:
        for entry in self.snapshot().entries:
            if entry.id == entry_id:
                return entry
        raise NotFound(f"no FAQ entry {entry_id!r}")

    def is_empty(self) -> bool:
        return not self.snapshot().entries

    # -- searching ---------------------------------------------------------------------------------------

    def analyse(self, snap: Snapshot, query: str) -> Analysis:
        vector = self.embedder.embed_one(query)
        n = len(snap.entries)
        dense = np.full(n, -1.0, dtype=np.float32)
        sims = snap.centred @ normalise(vector - snap.centroid)  # (N,)
        np.maximum.at(dense, snap.owner, sims)  # best vector per entry
        words = [w for w in content_words(query) if w in snap.bm25.vocab_dict] if snap.bm25 is not None else []
        lexical = np.asarray(snap.bm25.get_scores(words), dtype=np.float32) if words else np.zeros(n, np.float32)
        fused = dense + BM25_WEIGHT * lexical / (lexical + BM25_HALF)
        return Analysis(vector, fused, float((snap.raw @ vector).max()))

    def _hits(self, snap: Snapshot, analysis: Analysis, k: int) -> list[FaqHit]:
        order = np.argsort(-analysis.fused, kind="stable")[:k]
        return [FaqHit(snap.entries[i].id, snap.entries[i].question, snap.entries[i].answer,
                       float(np.clip(analysis.fused[i], 0.0, 1.0)), list(snap.entries[i].tags)) for i in order]

    def search(self, query: str, k: int = 5) -> list[FaqHit]:
        """The best `k` entries for `query`, one hit per entry id, best first."""
        query = check_query(query)
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidInput(f"k must be between 1 and {MAX_K}")
        snap = self.snapshot()
        if not snap.entries:
            return []
        return self._hits(snap, self.analyse(snap, query), k)

    def decide(self, query: str) -> FaqDecision:
        """The answer policy for one user message (never raises on odd text: anything unusable is "none")."""
        query = " ".join(str(query or "")[:MAX_QUERY_CHARS].split())
        snap = self.snapshot()
        if not query or not snap.entries:
            return FaqDecision("none", [])
        analysis = self.analyse(snap, query)
        if not self.is_business(analysis):
            return FaqDecision("none", [])
        hits = self._hits(snap, analysis, 3)
        confidence = self.model.confidence(*self.features(snap, analysis, query))
        if confidence < self.model.unknown_below:
            return FaqDecision("unknown", hits, confidence)
        margin = analysis.fused[np.argsort(-analysis.fused)[:2]]
        if confidence >= self.model.answer_from and float(margin[0] - margin[-1]) >= self.model.answer_margin:
            return FaqDecision("answer", hits, confidence)
        return FaqDecision("ground", hits, confidence)

    def features(self, snap: Snapshot, analysis: Analysis, query: str) -> tuple[float, float, float]:
        """(top fused score, salient-word gap, margin to the runner-up) for the decision model."""
        order = np.argsort(-analysis.fused)
        top = int(order[0])
        score = float(analysis.fused[top])
        margin = score - float(analysis.fused[order[1]]) if len(order) > 1 else score
        return score, self.gap(snap, top, analysis.vector, query), margin

    def gap(self, snap: Snapshot, entry: int, query_vector: np.ndarray, query: str) -> float:
        """max over the message's words of salience × (1 − how well the entry covers the word), in 0..1.

        Salience is the word's similarity to the whole message (what the message is about); coverage is 1 when
        the entry has the word and otherwise its best similarity to one of the entry's words. "Do you sell
        electric scooters?" finds the e-bike entry, but "scooters" is salient and not covered: a large gap.
        """
        terms = list(dict.fromkeys(w for w in WORD.findall(query.lower().replace("'", "")) if w not in STOPWORDS))
        terms = [w for w in terms if len(w) > 1 or w.isdigit()][:MAX_QUERY_TERMS]
        if not terms:
            return 1.0
        uncovered = [w for w in terms if stem(w) not in snap.stems[entry]]
        if not uncovered:
            return 0.0
        vectors = self.word_vectors(uncovered + snap.surfaces[entry])
        words = vectors[: len(uncovered)]
        salience = np.clip(words @ query_vector, 0.0, 1.0)
        cover = (words @ vectors[len(uncovered):].T).max(axis=1) if snap.surfaces[entry] else np.zeros(len(uncovered))
        return float(np.max(salience * (1.0 - np.clip(cover, 0.0, 1.0))))

    def word_vectors(self, words: list[str]) -> np.ndarray:
        """(W, 384) vectors of single words, cached for the life of the index (the vocabulary is bounded)."""
        missing = [w for w in dict.fromkeys(words) if w not in self._word_vectors]
        if missing:
            for word, vector in zip(missing, self.embedder.embed(missing)):
                self._word_vectors[word] = vector
        return np.stack([self._word_vectors[w] for w in words])

    def kind_scores(self, analysis: Analysis) -> tuple[float, float]:
        """(business-likeness, chat-likeness): best cosine to the FAQ and generic customer questions, and to
        generic small talk and personal messages."""
        if self._prototypes is None:
            self._prototypes = (self.embedder.embed(list(BUSINESS_PROTOTYPES)), self.embedder.embed(list(CHAT_PROTOTYPES)))
        business, chat = self._prototypes
        return max(float((business @ analysis.vector).max()), analysis.raw_best), float((chat @ analysis.vector).max())

    def is_business(self, analysis: Analysis) -> bool:
        """Is the message asking the business for something, rather than chatting? The nearer prototype wins."""
        business_sim, chat_sim = self.kind_scores(analysis)
        return chat_sim <= business_sim + self.model.chat_margin


def check_query(query: object) -> str:
    if not isinstance(query, str):
        raise InvalidInput("the query must be text")
    query = " ".join(query.split())
    if not query:
        raise InvalidInput("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidInput(f"the query is {len(query)} characters (limit {MAX_QUERY_CHARS})")
    return query
