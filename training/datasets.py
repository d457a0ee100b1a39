"""Training data from the transcript store: rated turns, corrections, agent replies and FAQ entries.

Every example is the exact prompt the model saw (`build_prompt` of the turn's recorded parts) plus a
completion, redacted before anything else touches it. Held-out data is split by conversation (by a hash,
so a conversation stays on the same side in every rebuild), and the lineage records which turns, users
(as hashes) and FAQ entries went where.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dialogue.prompt import Message, PromptParts, build_prompt
from dialogue.store import Rating, TranscriptStore, Turn
from training.redact import redact, redact_messages
from training.store import SKIPPED_FINISH, TrainingStore

logger = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.15


SALT_FILE = "lineage.salt"


def user_hash(user_id: str, salt: str | None = None) -> str:
    """How lineage names a user: enough to find their versions after erasure, not to read their id back. With this
    installation's `salt` (`lineage_salt`) an HMAC, so a dataset's hashes cannot be checked against guessed ids
    (`telegram:12345`) elsewhere; without it the older unsalted form, still matched at erasure."""
    if salt:
        return hmac.new(salt.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(f"rapport-user:{user_id}".encode()).hexdigest()[:32]


def lineage_salt(adapters_dir: Path) -> str:
    """This installation's secret for lineage hashes: made at first use beside the versions (not inside one, so a
    version folder handed on carries none), mode 0600; two processes at once agree on the first one written."""
    path = adapters_dir / SALT_FILE
    if not path.exists():
        adapters_dir.mkdir(parents=True, exist_ok=True)
        partial = adapters_dir / f".{SALT_FILE}.{os.getpid()}.tmp"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(partial, path)  # atomic, and never over another process's salt
        except FileExistsError:
            pass
        finally:
            partial.unlink(missing_ok=True)
    return path.read_text().strip()


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: prompt messages, a completion, and whether it is desirable."""

    messages: list[Message]
    completion: str
    desirable: bool
    source: str  # "liked" | "correction" | "agent" | "faq" | "disliked"
    turn_id: str | None = None
    conversation_id: str | None = None
    user: str | None = None  # user_hash, never the id
    weight: float = 1.0  # the loss weight cleaning gave it (training/clean.py)

    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.messages, self.completion, self.desirable]).encode()).hexdigest()


@dataclass
class Dataset:
    """Train and held-out examples, their content hash, and where every example came from."""

    train: list[Example]
    heldout: list[Example]
    faq_eval: list[dict[str, Any]] = field(default_factory=list)  # held-out FAQ entries for grounding accuracy
    faq_all: list[dict[str, Any]] = field(default_factory=list)  # every FAQ entry: distractors, small-FAQ fallback
    dropped: dict[str, int] = field(default_factory=dict)
    cleaning: dict[str, Any] | None = None  # what training/clean.py dropped or down-weighted, and why

    @property
    def hash(self) -> str:
        digest = hashlib.sha256()
        for name, examples in (("train", self.train), ("heldout", self.heldout)):
            digest.update(name.encode())
            for example in examples:
                digest.update(example.key().encode())
                if example.weight != 1.0:
                    digest.update(f"w{example.weight:.4f}".encode())
        digest.update(json.dumps(self.faq_eval, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def lineage(self) -> dict[str, Any]:
        def ids(examples: list[Example]) -> list[str]:
            return sorted({e.turn_id for e in examples if e.turn_id})

        users = sorted({e.user for e in self.train + self.heldout if e.user})
        return {
            "train_turn_ids": ids(self.train),
            "heldout_turn_ids": ids(self.heldout),
            "user_hashes": users,
            "faq_ids": sorted({e.turn_id for e in self.train if e.source == "faq" and e.turn_id}),
            "counts": self.counts(),
            "dropped": self.dropped,
            "cleaning": self.cleaning,
        }

    def counts(self) -> dict[str, int]:
        counts = Counter(f"train_{e.source}" for e in self.train)
        counts.update(f"heldout_{e.source}" for e in self.heldout)
        return dict(sorted(counts.items()))


def is_heldout(conversation_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Stable across rebuilds: a conversation never moves between train and held-out."""
    value = int(hashlib.sha256(f"heldout:{conversation_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return value < fraction


def turn_messages(turn: Turn, default_system: str) -> list[Message]:
    """The chat messages the model saw for this turn, rebuilt from its recorded prompt parts."""
    try:
        data = json.loads(turn.prompt or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    data.setdefault("system", default_system)
    data.setdefault("user_text", turn.user_text)
    return build_prompt(PromptParts.from_dict(data))


def turn_examples(turn: Turn, rating: Rating | None, default_system: str, salt: str | None = None) -> list[Example]:
    """What one turn teaches: liked/agent/correction replies are desirable, disliked ones undesirable.

    A correction counts only once an admin approved it (`Rating.correction_trusted`), a rating unless an admin kept
    it out (`Rating.kept_out`); an agent reply only when a trusted source recorded it (Chatwoot, an admin key:
    `finish_reason="agent"`)."""
    if turn.model_id == "human":
        if turn.finish_reason != "agent":
            return []
        sources = [("agent", turn.reply, True)]
    elif turn.finish_reason in SKIPPED_FINISH or rating is None:
        return []
    else:
        sources = []
        if (rating.correction and rating.correction.strip() and rating.correction_trusted
                and not rating.correction_kept_out):
            sources.append(("correction", rating.correction, True))
        verdict = 0 if rating.kept_out else rating.rating
        if verdict == 1:
            sources.append(("liked", turn.reply, True))
        elif verdict == -1:
            sources.append(("disliked", turn.reply, False))
    messages = redact_messages(turn_messages(turn, default_system))
    return [
        Example(messages=messages, completion=redact(text.strip()), desirable=desirable, source=source,
                turn_id=turn.id, conversation_id=turn.conversation_id, user=user_hash(turn.user_id, salt))
        for source, text, desirable in sources if text and text.strip()
    ]


def faq_examples(entries: Iterable[Any], system: str) -> list[Example]:
    """Grounded answers: each question (and alternate phrasing) with its entry in context → its answer."""
    examples = []
    for entry in entries:
        item = _faq_dict(entry)
        faq = [{"id": item["id"], "question": item["question"], "answer": item["answer"]}]
        for question in [item["question"], *item.get("alternates", [])]:
            parts = PromptParts(system=system, user_text=question, faq=faq)
            examples.append(Example(messages=redact_messages(build_prompt(parts)), completion=redact(item["answer"]),
                                    desirable=True, source="faq", turn_id=f"faq:{item['id']}"))
    return examples


def _faq_dict(entry: Any) -> dict[str, Any]:
    if isinstance(entry, dict):
        return entry
    return {"id": entry.id, "question": entry.question, "answer": entry.answer,
            "alternates": list(getattr(entry, "alternates", []) or [])}


def build_dataset(store: TranscriptStore, *, system: str, faq_entries: Iterable[Any] = (),
                  exclude_user_hashes: set[str] = frozenset(), heldout_fraction: float = HELDOUT_FRACTION,
                  max_per_user: int | None = None, salt: str | None = None) -> Dataset:
    """The training set and its held-out part from everything rated so far.

    `max_per_user` caps what one user's ratings teach (their oldest examples are kept), so one user rating
    thousands of turns cannot steer the adapter; trusted agents' replies are not counted against it."""
    train: list[Example] = []
    heldout: list[Example] = []
    seen: set[str] = set()
    dropped: Counter = Counter()
    per_user: Counter = Counter()
    for turn, rating in TrainingStore(store).rated_turns():
        if user_hash(turn.user_id, salt) in exclude_user_hashes:
            dropped["erased_user"] += 1
            continue
        if rating is not None and (rating.kept_out or rating.correction_kept_out):
            dropped["kept_out"] += 1  # the rating or its correction: an admin's decision
        for example in turn_examples(turn, rating, system, salt):
            key = example.key()
            if key in seen:
                dropped["duplicate"] += 1
                continue
            if max_per_user is not None and example.source != "agent":
                if per_user[example.user] >= max_per_user:
                    dropped["user_cap"] += 1
                    continue
                per_user[example.user] += 1
            seen.add(key)
            (heldout if is_heldout(turn.conversation_id, heldout_fraction) else train).append(example)
    faq_eval, faq_all = [], []
    for entry in faq_entries:
        item = _faq_dict(entry)
        faq_all.append({"id": item["id"], "question": item["question"], "answer": item["answer"]})
        if is_heldout(f"faq:{item['id']}", heldout_fraction):
            faq_eval.append({"id": item["id"], "question": item["question"], "answer": item["answer"]})
            continue
        for example in faq_examples([item], system):
            if example.key() not in seen:
                seen.add(example.key())
                train.append(example)
    logger.info("dataset: %d train, %d held out, %d FAQ for eval, dropped %s", len(train), len(heldout),
                len(faq_eval), dict(dropped))
    return Dataset(train=train, heldout=heldout, faq_eval=faq_eval, faq_all=faq_all,
                   dropped=dict(dropped))


def example_to_json(example: Example) -> dict[str, Any]:
    return asdict(example)
