"""A FAQ's own fit: a linear map on the sentence embedder, learned from the entries' phrasings.

Each entry's question and alternates are phrasings of one intent. A 384×384 map W (started at the identity)
is trained contrastively (supervised InfoNCE: a phrasing's neighbours should be the other phrasings of its
entry) on the stored vectors, so the directions that tell close entries apart ("top-up" vs "card" payments,
"pending" vs "declined") count for more. The last alternate of every entry is held out: the fit is used only
when it finds those held-out phrasings' entries more often than the plain embedder does. The entry classifier
(memory/faq_classifier.py) is judged the same way: trained on the training phrasings, it is used when adding its
probabilities finds more held-out phrasings' entries than the dense scores alone; once judged, it is trained
again on every phrasing. The FAQ's own encoder (memory/faq_tune.py: MiniLM's top layers fine-tuned on the
training phrasings) is judged the same way, alone and with the classifier, and is used only when it finds more
held-out phrasings' entries than every option without it.

A fit is versioned by the FAQ's content fingerprint and stored as `$RAPPORT_HOME/faq_fit/<fingerprint>/`
(`adapter.npy`, `classifier.npz`/`.json`, `encoder.safetensors`,
`fit_meta.json`); a rejected fit keeps its meta too, so an unchanged FAQ is never refitted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

import numpy as np

from memory.faq_classifier import EntryClassifier
from memory.faq_tune import WEIGHTS, TuneConfig, TunedEncoder, train_encoder

logger = logging.getLogger(__name__)

KEEP_FITS = 3  # fit directories kept: the current FAQ's and two before it
MIN_HELD_OUT = 8  # held-out phrasings needed to judge a fit at all
CLASSIFIER_WEIGHT = 0.3  # fused score += CLASSIFIER_WEIGHT * P(entry) (bench/data dev split: 0.2-0.4 tie)


@dataclass(frozen=True)
class FitConfig:
    """How the map is trained; recorded in every fit's meta."""

    steps: int = 150  # full-batch Adam steps (a few hundred phrasings fit in one batch)
    lr: float = 0.01
    temperature: float = 0.05
    seed: int = 0
    classifier: bool = True  # also fit the entry classifier (memory/faq_classifier.py)
    classifier_c: float = 3.0  # its inverse L2 strength (dev split: 3 and 10 tie; 3 fits 3x faster)
    # also fine-tune the FAQ's own encoder (memory/faq_tune.py). Off unless asked (RAPPORT_FAQ_ENCODER): it finds
    # more held-out entries (top-1 0.788 -> 0.831) but the answer policy, calibrated on the map's scores, then
    # answers fewer of them with the right entry (0.703 -> 0.644)
    encoder: bool = False
    tune: TuneConfig = TuneConfig()


@dataclass(frozen=True)
class FitResult:
    """What `fit_adapter` learned and how it did on the held-out phrasings."""

    fingerprint: str
    used: bool
    reason: str
    held_out: int
    plain_top1: float | None
    fitted_top1: float | None
    seconds: float
    trained: bool = True  # False when the result was read back from an earlier fit
    classifier_used: bool = False
    classifier_top1: float | None = None  # held-out top-1 with the classifier's probabilities added
    config: dict | None = None
    created_at: str = ""
    encoder_used: bool = False  # the FAQ's own fine-tuned encoder replaces the plain embedder (and the map)
    encoder_top1: float | None = None  # held-out top-1 of the best option with the encoder
    encoder_seconds: float | None = None  # its training (and embedding the FAQ with it)

    def to_json(self) -> dict:
        return asdict(self)


def fingerprint(content_hashes: list[str], encoder: bool = False) -> str:
    """The FAQ's version: a hash of its entries' content hashes, in order-free form, and of whether its fit may
    train an encoder (so turning RAPPORT_FAQ_ENCODER on or off refits an unchanged FAQ)."""
    return sha256("\n".join([*sorted(content_hashes), *(["encoder"] if encoder else [])]).encode()).hexdigest()[:24]


def split_phrasings(owner: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices over the question/alternate rows: each entry's last alternate is held out
    when the entry keeps at least two phrasings for training."""
    rows = np.flatnonzero(kinds != "answer")
    held = []
    for entry in np.unique(owner[rows]):
        mine = rows[owner[rows] == entry]
        alternates = [r for r in mine if kinds[r] == "alternate"]
        if len(mine) >= 3 and alternates:
            held.append(alternates[-1])
    held_set = set(held)
    return np.array([r for r in rows if r not in held_set], dtype=np.int64), np.array(held, dtype=np.int64)


def entry_scores(queries: np.ndarray, vectors: np.ndarray, owner: np.ndarray, n_entries: int) -> np.ndarray:
    """(Q, E) each entry's best cosine over its vectors (-1 for an entry with none)."""
    sims = queries @ vectors.T  # (Q, N)
    best = np.full((len(queries), n_entries), -1.0, dtype=np.float32)
    for j, entry in enumerate(owner):
        best[:, entry] = np.maximum(best[:, entry], sims[:, j])
    return best


def entry_top1(queries: np.ndarray, vectors: np.ndarray, owner: np.ndarray, gold: np.ndarray, n_entries: int) -> float:
    """Share of `queries` whose best vector (one score per entry: its best phrasing) belongs to `gold`."""
    return float(np.mean(entry_scores(queries, vectors, owner, n_entries).argmax(axis=1) == gold))


def normalise(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-9)


def train_map(vectors: np.ndarray, labels: np.ndarray, config: FitConfig) -> np.ndarray:
    """(384, 384) W minimising supervised InfoNCE over normalise(vectors @ W); CPU, one batch."""
    import torch

    torch.manual_seed(config.seed)
    x = torch.tensor(vectors, dtype=torch.float32)  # (N, 384)
    y = torch.tensor(labels)
    weight = torch.nn.Parameter(torch.eye(x.shape[1]))
    optimiser = torch.optim.Adam([weight], lr=config.lr)
    eye = torch.eye(len(y))
    positives = (y[:, None] == y[None, :]).float() - eye  # (N, N) other phrasings of the same entry
    counts = positives.sum(-1).clamp(min=1)
    for _ in range(config.steps):
        z = torch.nn.functional.normalize(x @ weight, dim=-1)
        log_p = (z @ z.T / config.temperature - eye * 1e9).log_softmax(-1)  # a phrasing never picks itself
        loss = (-(log_p * positives).sum(-1) / counts).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return weight.detach().numpy().astype(np.float32)


def fit_encoder(texts: list[str], owner: np.ndarray, kinds: np.ndarray, config: TuneConfig
                ) -> tuple[TunedEncoder | None, np.ndarray | None, float]:
    """The encoder fine-tuned on the training phrasings and every row embedded with it, for `fit_adapter` to
    judge: (encoder, (N, 384) vectors, seconds); (None, None, 0) when too few phrasings are held out."""
    started = time.perf_counter()
    train, held = split_phrasings(owner, kinds)
    if len(held) < MIN_HELD_OUT:
        return None, None, 0.0
    encoder = train_encoder([texts[i] for i in train], owner[train], config)
    vectors = encoder.embed(texts)
    return encoder, vectors, round(time.perf_counter() - started, 2)


def fit_adapter(vectors: np.ndarray, owner: np.ndarray, kinds: np.ndarray, fp: str,
                config: FitConfig = FitConfig(), texts: list[str] | None = None, tuned: np.ndarray | None = None
                ) -> tuple[FitResult, np.ndarray | None, EntryClassifier | None]:
    """Train on the training phrasings, judge on the held-out ones: (result, W or None, classifier or None),
    each None when not used. `texts` (one per vector) are needed for the classifier; `tuned` are the same rows
    embedded by the FAQ's own encoder (`fit_encoder`), judged too (`result.encoder_used`)."""
    started = time.perf_counter()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    train, held = split_phrasings(owner, kinds)
    if len(held) < MIN_HELD_OUT:
        result = FitResult(fp, False, f"too few phrasings to judge a fit ({len(held)} held out, need {MIN_HELD_OUT}): "
                                      "give entries alternates", len(held), None, None, 0.0, config=asdict(config),
                           created_at=now)
        return result, None, None
    n_entries = int(owner.max()) + 1
    weight = train_map(vectors[train], owner[train], config)
    mapped = normalise(vectors @ weight)
    spaces = {"plain": vectors, "map": mapped, **({"encoder": tuned} if tuned is not None else {})}
    alone = {name: entry_top1(space[held], space[train], owner[train], owner[held], n_entries)
             for name, space in spaces.items()}
    plain, fitted = alone["plain"], alone["map"]
    # options (held-out top-1, space, with the classifier), simplest first: max keeps the first of equals, so a
    # part is used only when it finds strictly more held-out phrasings' entries than everything before it
    options = [(plain, "plain", False), (fitted, "map", False)]
    classifier, with_classifier, boosted = None, None, {}
    if config.classifier and texts is not None:
        judged = EntryClassifier.fit([texts[i] for i in train], vectors[train], owner[train], n_entries,
                                     config.classifier_c)
        p = CLASSIFIER_WEIGHT * judged.probabilities([texts[i] for i in held], vectors[held])  # (H, E)
        boosted = {name: float(np.mean((entry_scores(space[held], space[train], owner[train], n_entries) + p)
                                       .argmax(axis=1) == owner[held])) for name, space in spaces.items()}
        options += [(boosted["plain"], "plain", True), (boosted["map"], "map", True)]
    if tuned is not None:
        options.append((alone["encoder"], "encoder", False))
        if boosted:
            options.append((boosted["encoder"], "encoder", True))
    best = max(options, key=lambda o: o[0])
    used, encoder_used = best[1] == "map", best[1] == "encoder"
    if encoder_used:
        reason = "the FAQ's own encoder" + (" with the entry classifier" if best[2] else "") + \
            " best on the held-out phrasings"
    elif best[2]:
        reason = ("map and " if used else "plain embedder with ") + "entry classifier best on the held-out phrasings"
    else:
        reason = "better on the held-out phrasings" if used else \
            "not better on the held-out phrasings than the plain embedder"
        reason += "; entry classifier not better on them" if boosted else ""
    if boosted:
        with_classifier = boosted[best[1]] if best[2] else max(boosted[name] for name in ("plain", "map"))
    if best[2]:
        rows = np.concatenate([train, held])
        classifier = EntryClassifier.fit([texts[i] for i in rows], vectors[rows], owner[rows], n_entries,
                                         config.classifier_c)
    encoder_top1 = None
    if tuned is not None:
        encoder_top1 = max(alone["encoder"], boosted.get("encoder", 0.0))
    result = FitResult(fp, used, reason, len(held), round(plain, 4), round(fitted, 4),
                       round(time.perf_counter() - started, 2), config=asdict(config), created_at=now,
                       classifier_used=classifier is not None,
                       classifier_top1=None if with_classifier is None else round(with_classifier, 4),
                       encoder_used=encoder_used, encoder_top1=None if encoder_top1 is None else round(encoder_top1, 4))
    return result, weight if used else None, classifier


class FitStore:
    """Fits on disk, one directory per FAQ fingerprint."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._encoder: tuple[tuple, TunedEncoder] | None = None  # the last encoder loaded: one model, not one a read

    def load(self, fp: str) -> tuple[FitResult, np.ndarray | None, EntryClassifier | None, TunedEncoder | None] | None:
        """The stored fit for `fp` (W, classifier and encoder only if used), or None if this FAQ version was never
        fitted."""
        directory = self.root / fp
        try:
            meta = json.loads((directory / "fit_meta.json").read_text())
            result = FitResult(**{**meta, "trained": False})
            weight = np.load(directory / "adapter.npy", allow_pickle=False) if result.used else None
            classifier = EntryClassifier.load(directory) if result.classifier_used else None
            encoder = self.encoder(fp) if result.encoder_used else None
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, OSError) as exc:  # a damaged fit is refitted, never trusted
            logger.warning("FAQ fit %s unreadable (%s); it will be refitted", fp, exc)
            return None
        if weight is not None and (weight.ndim != 2 or weight.shape[0] != weight.shape[1]):
            return None
        return result, weight, classifier, encoder

    def encoder(self, fp: str) -> TunedEncoder:
        """The stored encoder of `fp`, built once while its file stays the same."""
        stat = (self.root / fp / WEIGHTS).stat()
        key = (fp, stat.st_mtime_ns, stat.st_size)
        if self._encoder is None or self._encoder[0] != key:
            self._encoder = (key, TunedEncoder.load(self.root / fp))
        return self._encoder[1]

    def save(self, result: FitResult, weight: np.ndarray | None, classifier: EntryClassifier | None = None,
             encoder: TunedEncoder | None = None) -> None:
        """Write into a temporary directory, then rename: a reader sees a whole fit or none."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / result.fingerprint
        staging = self.root / f".{result.fingerprint}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        if weight is not None:
            np.save(staging / "adapter.npy", weight)
        if classifier is not None:
            classifier.save(staging)
        if encoder is not None:
            encoder.save(staging)
        meta = {k: v for k, v in result.to_json().items() if k != "trained"}
        (staging / "fit_meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if encoder is not None:
            stat = (final / WEIGHTS).stat()
            self._encoder = ((result.fingerprint, stat.st_mtime_ns, stat.st_size), encoder)
        self.prune(keep=result.fingerprint)

    def prune(self, keep: str) -> None:
        fits = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [p for p in fits if p.name != keep][KEEP_FITS - 1:]:
            shutil.rmtree(old, ignore_errors=True)
