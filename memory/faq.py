"""The business FAQ: entries in one Chroma collection, hybrid search, and the answer policy for a message.

Every entry is stored as several vectors (its question, each alternate phrasing, its answer); a search scores
each entry by its best vector fused with the centroid of its phrasings (nearest phrasing and the entry's
gist), after centring all vectors on the FAQ's mean so that what every question of one business shares
("bike", "shop") stops counting as similarity, adds a BM25 bonus for shared words and, when the FAQ's fit has
one, the entry classifier's probability (memory/faq_classifier.py). When the fit has its own fine-tuned
encoder (memory/faq_tune.py), the entries and the query are embedded with it for the dense scores; everything
else (the classifier, the scope features) stays on the plain embedder.
`decide` turns the top hits into a level (answer / ground / unknown / none) with a small logistic model
calibrated on `examples/faq` (see `rapport bench faq --calibrate`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path
from typing import Literal

import numpy as np

from memory.errors import InvalidInput, NotFound, RapportError, StoreUnavailable
from memory.faq_files import FaqEntry, make_entry, parse_faq_file
from memory.faq_scope import (NO_TOPICS, OUTSIDE_REPLY, SMALL_TALK, SMALL_TALK_REPLIES, SMALL_TALK_WORDS,
                               ScopeModel, topics_of)
from memory.faq_classifier import EntryClassifier
from memory.faq_fit import CLASSIFIER_WEIGHT, FitConfig, FitResult, FitStore, fingerprint, fit_adapter, fit_encoder
from memory.faq_tune import TunedEncoder
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
NEAREST_WEIGHT = 0.7  # dense = NEAREST_WEIGHT * best phrasing + (1 - it) * centroid (bench/data dev split)


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

    # "smalltalk" and "outside" only in a customer-service deployment (`FaqIndex.classify`)
    level: Literal["answer", "ground", "unknown", "none", "smalltalk", "outside"]
    hits: list[FaqHit]
    confidence: float = 0.0  # P(the FAQ covers this message), from the calibrated model
    small_talk: str = ""  # the kind of small talk (memory/faq_scope.py SMALL_TALK)
    topics: str = ""  # what the FAQ covers, in words, for the replies that steer back to it

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

# Fitted by `rapport bench faq --calibrate` on the dev split of bench/data/faq_bank_* and the calibration half of
# examples/faq's business questions (two businesses, each with its own fit), on the scores with the entry centroid;
# covered_from declines ≥ 93 % of the dev out-of-scope messages (bench/faq_bank.py DECLINE_TARGET), answer gate at
# ≥ 95 % precision.
# Scopes (covered, unknown, smalltalk, outside) × features (score, margin, gap, faq_best, business, chat, smalltalk).
SCOPE_MODEL = ScopeModel(bias=(-1.2487, -1.7633, -1.2368, 4.2488),
                         weights=((2.3274, 3.6746, -6.2951, 4.2205, 2.3431, 2.5099, -8.0887),
                                  (-1.2945, 0.4242, 3.3806, 2.7695, 4.8162, -5.9157, 2.3053),
                                  (-3.0105, -2.3015, 0.9955, -1.4708, -1.6497, 2.5127, 7.9413),
                                  (1.9776, -1.7973, 1.9189, -5.5191, -5.5097, 0.893, -2.1579)),
                         answer_from=0.84, answer_margin=0.15, covered_from=0.64)
SMALL_TALK_ALONE = 0.6  # with no FAQ to compare against, the small-talk similarity that counts as small talk


def grounded_reply(decision: FaqDecision) -> str | None:
    """The fixed reply for `answer` (the entry's own text) and `unknown` (no invention, offer a human)."""
    if decision.level == "answer" and decision.hits:
        return decision.hits[0].answer
    if decision.level == "unknown":
        return UNKNOWN_REPLY
    if decision.level == "smalltalk":
        return SMALL_TALK_REPLIES[decision.small_talk].format(topics=decision.topics or NO_TOPICS)
    if decision.level == "outside":
        return OUTSIDE_REPLY.format(topics=decision.topics or NO_TOPICS)
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
    kinds: np.ndarray  # (N,) "question" | "alternate" | "answer"
    raw: np.ndarray  # (N, 384) unit vectors as stored (the plain embedder's)
    centred: np.ndarray  # (N, 384) unit vectors (mapped by the fit or embedded by its encoder, if one is used)
    # after subtracting the centroid
    centroid: np.ndarray  # (384,)
    bm25: object | None
    stems: list[set[str]]  # per entry: stemmed content words of question, alternates, answer, tags
    surfaces: list[list[str]]  # per entry: those words as written (for embedding)
    fingerprint: str = ""  # the FAQ's content version (memory/faq_fit.py)
    weight: np.ndarray | None = None  # (384, 384) the FAQ's own fit, when one is used
    fit: FitResult | None = None
    centroids: np.ndarray | None = None  # (E, 384) unit centroid of each entry's centred question + alternates
    classifier: EntryClassifier | None = None  # the FAQ's entry classifier, when its fit uses one
    texts: list[str] = field(default_factory=list)  # (N,) the text of each vector
    encoder: TunedEncoder | None = None  # the FAQ's own fine-tuned encoder, when its fit uses one

    def mapped(self, vector: np.ndarray) -> np.ndarray:
        """A plain query vector in the space the entries are compared in (without an encoder of the fit's own)."""
        return vector if self.weight is None else normalise(vector @ self.weight)

    def dense_query(self, query: str, vector: np.ndarray | None) -> np.ndarray:
        """The query in the space of the dense scores: the fit's encoder embeds it itself, else the plain vector."""
        return self.encoder.embed_one(query) if self.encoder is not None else self.mapped(vector)


@dataclass
class Analysis:
    """One query scored against every entry."""

    vector: np.ndarray | None  # (384,) the plain embedder's (None when only ranking was asked for and not needed)
    fused: np.ndarray  # (E,) centred dense + BM25 bonus
    raw_best: float  # best plain cosine to any stored vector (nan without `vector`)


class FaqIndex:
    """The FAQ in one Chroma collection (embeddings passed in, never Chroma's own)."""

    def __init__(self, client, embedder, *, collection: str = COLLECTION, model: DecisionModel = DEFAULT_MODEL,
                 fit_dir: Path | None = None, fit_config: FitConfig = FitConfig(),
                 nearest_weight: float = NEAREST_WEIGHT) -> None:
        self.client = client
        self.embedder = embedder
        self.name = collection
        self.model = model
        self.fits = FitStore(fit_dir) if fit_dir is not None else None  # None: no fitting (plain search)
        self.fit_config = fit_config
        self.nearest_weight = nearest_weight  # 1.0: each entry scored by its best vector alone (the bench's "before")
        self.last_fit: FitResult | None = None  # what the last write's refit did (trained now, or read back)
        self._lock = threading.RLock()
        self._snapshot: Snapshot | None = None
        self._word_vectors: dict[str, np.ndarray] = {}
        self._prototypes: tuple[np.ndarray, np.ndarray] | None = None
        self._small_talk: tuple[np.ndarray, list[str]] | None = None
        self.scope_model = SCOPE_MODEL
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
            self.last_fit = self.refit()
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
            self.last_fit = self.refit()

    def refit(self) -> FitResult | None:
        """Fit the current FAQ version unless it was fitted before; the result, or None without a fit store."""
        if self.fits is None:
            return None
        with self._lock:
            snap = self.snapshot()
            if snap.fit is not None or not snap.entries:
                return snap.fit
            encoder, tuned, tune_s = None, None, None
            if self.fit_config.encoder:
                encoder, tuned, tune_s = fit_encoder(snap.texts, snap.owner, snap.kinds, self.fit_config.tune)
            result, weight, classifier = fit_adapter(snap.raw, snap.owner, snap.kinds, snap.fingerprint,
                                                     self.fit_config, snap.texts, tuned)
            result = replace(result, encoder_seconds=tune_s)
            logger.info("FAQ fit %s: %s (held-out top-1 %s -> map %s, with the classifier %s, own encoder %s; "
                        "%.1f s + encoder %s s)", result.fingerprint, result.reason, result.plain_top1,
                        result.fitted_top1, result.classifier_top1, result.encoder_top1, result.seconds, tune_s)
            self.fits.save(result, weight, classifier, encoder if result.encoder_used else None)
            self._snapshot = None
            return result

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
        got = self.collection.get(include=["metadatas", "embeddings", "documents"])
        metas, vectors, documents = got["metadatas"] or [], got["embeddings"], got["documents"] or []
        mains = sorted((m for m in metas if m.get("kind") == "question"), key=lambda m: m["seq"])
        entries = [FaqEntry(**json.loads(m["entry"])) for m in mains]
        position = {e.id: i for i, e in enumerate(entries)}
        keep = [i for i, m in enumerate(metas) if m.get("entry_id") in position]
        raw = np.asarray(vectors, dtype=np.float32)[keep] if keep else np.zeros((0, 384), np.float32)
        owner = np.array([position[metas[i]["entry_id"]] for i in keep], dtype=np.int64)
        kinds = np.array([metas[i]["kind"] for i in keep])
        fp = fingerprint([m["hash"] for m in mains], self.fit_config.encoder)
        stored = self.fits.load(fp) if self.fits is not None and entries else None
        fit, weight, classifier, encoder = stored if stored is not None else (None, None, None, None)
        texts = [documents[i] for i in keep]
        if encoder is not None:
            space = encoder.embed(texts) if keep else raw
        else:
            space = normalise(raw @ weight) if weight is not None else raw
        centroid = space.mean(axis=0) if len(space) else np.zeros(raw.shape[1], np.float32)
        centred = normalise(space - centroid)
        phrasings = kinds != "answer"
        whole = [" ".join([e.question, *e.alternates, e.answer, *e.tags]) for e in entries]  # per entry, for BM25
        centroids = np.zeros((len(entries), raw.shape[1]), np.float32)
        np.add.at(centroids, owner[phrasings], centred[phrasings])
        bm25 = None
        if entries:
            import bm25s

            logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets itself to DEBUG on import
            bm25 = bm25s.BM25()
            bm25.index([content_words(t) or ["_"] for t in whole], show_progress=False)
        surfaces = [sorted({w for w in WORD.findall(t.lower().replace("'", "")) if w not in STOPWORDS}) for t in whole]
        return Snapshot(revision, entries, owner, kinds, raw, centred, centroid, bm25,
                        [set(content_words(t)) for t in whole], surfaces, fp, weight, fit, normalise(centroids),
                        classifier, texts, encoder)

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

    def analyse(self, snap: Snapshot, query: str, ranking_only: bool = False) -> Analysis:
        """`ranking_only`: only `fused` is wanted (a search); with the fit's own encoder and no classifier the plain
        vector is then not needed, and a search costs one query embedding, not two."""
        plain_needed = not ranking_only or snap.encoder is None or snap.classifier is not None
        vector = self.embedder.embed_one(query) if plain_needed else None
        n = len(snap.entries)
        dense = np.full(n, -1.0, dtype=np.float32)
        query_vector = normalise(snap.dense_query(query, vector) - snap.centroid)
        sims = snap.centred @ query_vector  # (N,)
        np.maximum.at(dense, snap.owner, sims)  # best vector per entry
        if self.nearest_weight < 1.0:
            dense = self.nearest_weight * dense + (1.0 - self.nearest_weight) * (snap.centroids @ query_vector)
        words = [w for w in content_words(query) if w in snap.bm25.vocab_dict] if snap.bm25 is not None else []
        lexical = np.asarray(snap.bm25.get_scores(words), dtype=np.float32) if words else np.zeros(n, np.float32)
        fused = dense + BM25_WEIGHT * lexical / (lexical + BM25_HALF)
        if snap.classifier is not None:
            fused = fused + CLASSIFIER_WEIGHT * snap.classifier.probabilities([query], vector[None])[0]
        return Analysis(vector, fused, float((snap.raw @ vector).max()) if vector is not None else math.nan)

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
        return self._hits(snap, self.analyse(snap, query, ranking_only=True), k)

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

    # -- scope (customer-service deployments) -----------------------------------------------------------

    def verdict(self, query: str, scope: str = "auto") -> FaqDecision | None:
        """`classify` when the bot serves a business (scope "business", or "auto" with a FAQ), else `decide`;
        None for the personal assistant without a FAQ."""
        empty = self.is_empty()
        if scope == "business" or (scope == "auto" and not empty):
            return self.classify(query)
        return None if empty else self.decide(query)

    def small_talk(self, vector: np.ndarray) -> tuple[float, str]:
        """(best cosine to a small-talk prototype, its kind)."""
        if self._small_talk is None:
            kinds = [kind for kind, texts in SMALL_TALK.items() for _ in texts]
            self._small_talk = (self.embedder.embed([t for texts in SMALL_TALK.values() for t in texts]), kinds)
        vectors, kinds = self._small_talk
        sims = vectors @ vector
        best = int(np.argmax(sims))
        return float(sims[best]), kinds[best]

    def scope_features(self, snap: Snapshot, analysis: Analysis, query: str) -> tuple[float, ...]:
        """The classifier's inputs, in `memory.faq_scope.FEATURES` order."""
        score, gap, margin = self.features(snap, analysis, query)
        business, chat = self.kind_scores(analysis)
        small = self.small_talk(analysis.vector)[0] if len(query.split()) <= SMALL_TALK_WORDS else 0.0
        return score, margin, gap, analysis.raw_best, business, chat, small

    def classify(self, query: str) -> FaqDecision:
        """The scope and answer policy of a customer-service deployment: answer or ground from the FAQ, say the
        FAQ does not cover it (unknown, handoff), answer small talk in kind, or decline what is outside."""
        query = " ".join(str(query or "")[:MAX_QUERY_CHARS].split())
        snap = self.snapshot()
        topics = topics_of([e.tags for e in snap.entries], [e.question for e in snap.entries])
        if not query:
            return FaqDecision("smalltalk", [], small_talk="ack", topics=topics)
        if not snap.entries:  # a business without a FAQ yet: small talk, or a person
            vector = self.embedder.embed_one(query)
            similarity, kind = self.small_talk(vector)
            if len(query.split()) <= SMALL_TALK_WORDS and similarity >= SMALL_TALK_ALONE:
                return FaqDecision("smalltalk", [], small_talk=kind, topics=topics)
            return FaqDecision("unknown", [], topics=topics)
        analysis = self.analyse(snap, query)
        features = self.scope_features(snap, analysis, query)
        scope, covered = self.scope_model.scope(features)
        hits = self._hits(snap, analysis, 3)
        if scope == "smalltalk":
            return FaqDecision("smalltalk", [], covered, small_talk=self.small_talk(analysis.vector)[1], topics=topics)
        if scope == "outside":
            return FaqDecision("outside", [], covered, topics=topics)
        if scope == "unknown":
            return FaqDecision("unknown", hits, covered, topics=topics)
        model = self.scope_model
        if covered >= model.answer_from and features[1] >= model.answer_margin:
            return FaqDecision("answer", hits, covered, topics=topics)
        return FaqDecision("ground", hits, covered, topics=topics)


def check_query(query: object) -> str:
    if not isinstance(query, str):
        raise InvalidInput("the query must be text")
    query = " ".join(query.split())
    if not query:
        raise InvalidInput("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidInput(f"the query is {len(query)} characters (limit {MAX_QUERY_CHARS})")
    return query
