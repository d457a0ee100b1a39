"""Per-user long-term memory: one Chroma collection per user, dense + BM25 search that knows speakers, erasure.

Isolation is by construction: `MemoryStore.for_user(user_id)` is the only way to a user's memories and the
`UserMemory` it returns is bound to that one collection; no method below it takes a user id.

What the user said is evidence. The assistant's words are not facts about the user: `remember_turn` stores
only the user's text, and imported lines spoken by the assistant are kept (marked by speaker, listed and
exported) but never returned by `search` or `recall`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from memory.embeddings import DIMENSIONS, VectorIndex
from memory.errors import InvalidInput, NotFound, StoreUnavailable
from memory.facts import memory_text
from memory.lexical import LexicalIndex, tokenize
from memory.text import clean_text, strip_controls, validate_id

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4000
MAX_META_CHARS = 8000
MAX_SPEAKER_CHARS = 64
# speakers whose words are context, never evidence about the user
ASSISTANT_SPEAKERS = frozenset({"assistant", "bot", "system", "rapport", "ai", "model", "agent"})
# BM25's share of the score (its best match counting 1, cosine counting 1): on the conversation set of
# bench/memory_conv.py 0.2, 0.1, 0.05, 0 gave recall@5 0.79, 0.83, 0.84, 0.84; a little is kept for names of things
LEXICAL_WEIGHT = 0.05
DENSE_POOL = 200  # nearest statements scored, before a named speaker's lines are lifted
SPEAKER_BONUS = 0.15  # cosine added to the lines of the speaker a query names
RECENCY_BONUS = 0.05  # cosine added to the newest statement (0 to the oldest) when the query asks about now
CURRENT_CUE = re.compile(r"\b(now|nowadays|currently|current|these days|at the moment|at present|presently|"
                         r"today|latest|recently|still|anymore|any more)\b", re.IGNORECASE)
SUPERSEDED_COSINE = 0.4  # two statements of one speaker this close are about the same matter
PERSON_WORDS = frozenset({"user", "i", "me", "you", "we", "he", "she", "they", "it", "my", "your"})
TOKEN_NAME = re.compile(r"[^\W\d_][\w.'’-]*")
RECALL_MIN_SIMILARITY = 0.2  # below this cosine, with no shared word, off-topic (kept 94% of bench evidence)
DUPLICATE_COSINE = 0.85  # with identical content terms (numbers, names, negations): a rephrasing
COLLECTION_PREFIX = "mem-"
ERASED_VECTOR = np.full(DIMENSIONS, DIMENSIONS ** -0.5, dtype=np.float32)  # written over a vector before deletion
SHARED_RELOAD_S = 60.0  # on a shared store, a user's mirror is read in full again after this many seconds
COMPACT_TRIES = 4  # a compaction that fails beside one of Chroma's own reads is made again this many times at most
COMPACT_INTERVAL_S = 10.0  # at most one compaction of the shared SQLite file per this many seconds (see scrub_disk)
UUID_DIR = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def collection_name(user_id: str) -> str:
    """A Chroma-safe name for any user id (`telegram:123`, emails, unicode): a hash, never the id itself."""
    return COLLECTION_PREFIX + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:48]


def parse_timestamp(value: object) -> datetime | None:
    """ISO 8601 (a zone-less time is taken as UTC) or epoch seconds; always returned in UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or not 0 <= value < 32503680000:  # up to year 3000
            raise InvalidInput(f"timestamp {value!r} is not a plausible epoch time in seconds")
        moment = datetime.fromtimestamp(value, tz=timezone.utc)
    elif isinstance(value, str):
        text = value.strip()
        try:
            moment = datetime.fromtimestamp(float(text), tz=timezone.utc) if re.fullmatch(r"\d+(\.\d+)?", text) \
                else datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except (ValueError, OverflowError, OSError):
            raise InvalidInput(f"timestamp {value[:40]!r} is neither ISO 8601 nor epoch seconds") from None
    else:
        raise InvalidInput("timestamp must be an ISO 8601 string or epoch seconds")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


@dataclass(frozen=True)
class MemoryItem:
    """One thing to remember: a line of `memory import` JSONL, or the user's side of a turn."""

    text: str
    speaker: str = "user"
    timestamp: datetime | None = None
    meta: dict = field(default_factory=dict)
    turn_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", clean_text(self.text, max_chars=MAX_TEXT_CHARS))
        speaker = self.speaker if self.speaker is not None else "user"
        if not isinstance(speaker, str) or not speaker.strip() or len(speaker) > MAX_SPEAKER_CHARS:
            raise InvalidInput(f"speaker must be a non-empty string of at most {MAX_SPEAKER_CHARS} characters")
        object.__setattr__(self, "speaker", speaker.strip())
        object.__setattr__(self, "timestamp", parse_timestamp(self.timestamp))
        if not isinstance(self.meta, dict):
            raise InvalidInput("meta must be a JSON object")
        try:
            encoded = json.dumps(self.meta, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            raise InvalidInput("meta must be plain JSON (no NaN, no non-string keys)") from None
        if len(encoded) > MAX_META_CHARS:
            raise InvalidInput(f"meta is {len(encoded)} characters of JSON; the limit is {MAX_META_CHARS}")
        if self.turn_id is not None and (not isinstance(self.turn_id, str) or len(self.turn_id) > 128):
            raise InvalidInput("turn_id must be a string of at most 128 characters")

    @property
    def is_evidence(self) -> bool:
        return self.speaker.lower() not in ASSISTANT_SPEAKERS

    @classmethod
    def from_json(cls, data: object) -> MemoryItem:
        """From `{"text", "speaker"?, "timestamp"?, "meta"?}`; raises InvalidInput with the reason."""
        if not isinstance(data, dict):
            raise InvalidInput("each memory must be a JSON object")
        unknown = set(data) - {"text", "speaker", "timestamp", "meta", "turn_id"}
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(map(str, unknown)))[:80]}")
        if "text" not in data:
            raise InvalidInput('missing "text"')
        meta = data.get("meta")
        return cls(text=data["text"], speaker=data.get("speaker", "user"), timestamp=data.get("timestamp"),
                   meta={} if meta is None else meta, turn_id=data.get("turn_id"))


@dataclass(frozen=True)
class MemoryHit:
    """A stored memory as the outside sees it; `score` is higher-is-better (about the cosine similarity)."""

    id: str
    text: str
    score: float
    meta: dict
    speaker: str
    timestamp: str | None
    turn_id: str | None

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "score": round(self.score, 4), "meta": self.meta,
                "speaker": self.speaker, "timestamp": self.timestamp, "turn_id": self.turn_id}


@dataclass
class Record:
    """The in-process mirror of one stored memory (everything but its vector)."""

    id: str
    text: str
    speaker: str
    evidence: bool
    seq: int
    added: float
    ts: float | None
    turn_id: str | None
    meta_json: str
    signature: str
    count: int = 1

    @classmethod
    def from_chroma(cls, memory_id: str, text: str, md: dict) -> Record:
        fields = json.loads(md.get("r") or "{}")
        return cls(id=memory_id, text=text, speaker=fields.get("speaker", "user"),
                   evidence=bool(fields.get("evidence", True)), seq=int(fields.get("seq", 0)),
                   added=float(fields.get("added", 0.0)), ts=fields.get("ts"), turn_id=fields.get("turn_id"),
                   meta_json=fields.get("meta", "{}"), signature=fields.get("sig", ""),
                   count=int(fields.get("count", 1)))

    def metadata(self) -> dict:
        """Chroma metadata: one JSON string. Chroma keeps a row per metadata key, and reading 8 keys × 100k
        rows back made a cold start take ~50 s here; one key is 2-3× faster (nothing filters on them)."""
        fields = {"speaker": self.speaker, "evidence": self.evidence, "seq": self.seq, "added": self.added,
                  "ts": self.ts, "turn_id": self.turn_id, "meta": self.meta_json, "sig": self.signature,
                  "count": self.count}
        return {"r": json.dumps(fields, ensure_ascii=False)}

    @property
    def when(self) -> float:
        return self.ts if self.ts is not None else self.added

    def hit(self, score: float = 0.0) -> MemoryHit:
        stamp = datetime.fromtimestamp(self.ts, tz=timezone.utc).isoformat() if self.ts is not None else None
        return MemoryHit(id=self.id, text=self.text, score=score, meta=json.loads(self.meta_json),
                         speaker=self.speaker, timestamp=stamp, turn_id=self.turn_id)


def signature(text: str, speaker: str, meta_json: str) -> str:
    """Two items with this in common say the same thing: same content terms, same speaker, same meta."""
    terms = " ".join(sorted(set(tokenize(text))))
    return hashlib.sha1(f"{speaker.lower()}\x00{meta_json}\x00{terms}".encode()).hexdigest()[:20]


class UserState:
    """One user's collection plus its in-process mirror and BM25 index (loaded once, updated in place)."""

    def __init__(self, collection) -> None:
        self.collection = collection
        self.records: dict[str, Record] = {}
        self.by_signature: dict[str, str] = {}
        self.lexical = LexicalIndex()
        self.vectors = VectorIndex()  # the evidence's vectors, searched exactly in process
        self.speakers: dict[str, str] = {}  # a speaker's name, or first name, lower-cased → the speaker as stored
        self.speaker_pattern: re.Pattern | None = None  # finds those names in a query
        self.first = self.last = None  # the oldest and newest statement's time (seconds)
        self.next_seq = 0
        self.lock = threading.RLock()
        self.loaded_at = time.monotonic()
        self._load()

    def _load(self) -> None:
        start, offset, page = time.perf_counter(), 0, 5000
        while True:
            batch = self.collection.get(include=["documents", "metadatas", "embeddings"], limit=page, offset=offset)
            for memory_id, text, md, vector in zip(batch["ids"], batch["documents"], batch["metadatas"],
                                                   batch["embeddings"]):
                self._mirror(Record.from_chroma(memory_id, text or "", md or {}), np.asarray(vector, dtype=np.float32))
            if len(batch["ids"]) < page:
                break
            offset += page
        if self.records:
            logger.info("loaded %d memories in %.2f s", len(self.records), time.perf_counter() - start)

    def refresh(self) -> None:
        """Catch up with writes of other processes: the ids in the collection against the mirror's (one ids-only
        read, ~5 ms for 2,000 memories on a server); memories added elsewhere are read in, forgotten ones dropped.
        A merge elsewhere (same id, newer wording or count) shows after the next full reload (`SHARED_RELOAD_S`)."""
        ids, offset, page = set(), 0, 5000
        while True:
            batch = self.collection.get(include=[], limit=page, offset=offset)["ids"]
            ids.update(batch)
            if len(batch) < page:
                break
            offset += page
        with self.lock:
            for memory_id in self.records.keys() - ids:
                self._unmirror(memory_id)
            new = sorted(ids - self.records.keys())
            for start in range(0, len(new), page):
                got = self.collection.get(ids=new[start:start + page], include=["documents", "metadatas", "embeddings"])
                for memory_id, text, md, vector in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"]):
                    self._mirror(Record.from_chroma(memory_id, text or "", md or {}), np.asarray(vector, dtype=np.float32))

    def _mirror(self, record: Record, vector: np.ndarray | None) -> None:
        self.records[record.id] = record
        self.by_signature[record.signature] = record.id
        self.next_seq = max(self.next_seq, record.seq + 1)
        if record.evidence:
            self.lexical.add(record.id, record.text)
            if vector is not None:
                self.vectors.add(record.id, vector)
            self._learn_speaker(record.speaker)
            self._saw_time(record.when)

    def _saw_time(self, when: float) -> None:
        self.first = when if self.first is None else min(self.first, when)
        self.last = when if self.last is None else max(self.last, when)

    def time_span(self) -> tuple[float, float]:
        return (self.first or 0.0), (self.last or 0.0)

    def _learn_speaker(self, speaker: str) -> None:
        """Remember a named speaker ("Melanie", "Jon Smith" also as "jon") so that a query naming them is seen."""
        names = {speaker.lower()} | ({speaker.split()[0].lower()} if " " in speaker else set())
        names = {name for name in names if len(name) >= 2 and name not in PERSON_WORDS and TOKEN_NAME.fullmatch(name)}
        if names <= self.speakers.keys():
            return
        for name in names:
            self.speakers.setdefault(name, speaker)
        alternatives = "|".join(re.escape(name) for name in sorted(self.speakers, key=len, reverse=True))
        self.speaker_pattern = re.compile(rf"\b({alternatives})(?:'s|’s|s'|')?(?!\w)", re.IGNORECASE)

    def _unmirror(self, memory_id: str) -> Record | None:
        record = self.records.pop(memory_id, None)
        if record is not None:
            if self.by_signature.get(record.signature) == memory_id:
                del self.by_signature[record.signature]
            self.lexical.remove(memory_id)
            self.vectors.remove(memory_id)
        return record


class MemoryStore:
    """Everyone's memories in one Chroma (embedded or server); a collection per user, reached via `for_user`."""

    def __init__(self, client, embedder, *, shared: bool = False, cache_users: int = 32, sync_threshold: int = 1,
                 compact_interval_s: float = COMPACT_INTERVAL_S) -> None:
        self.client = client
        self.embedder = embedder
        # `shared`: other processes write to this store too (a Chroma server). Each use of a user's in-process
        # mirror then first catches up with the collection (`UserState.refresh`), so a memory written or forgotten
        # through another process is seen at once
        self.shared = shared
        # HNSW files are rewritten (and Chroma's write log purged) every `sync_threshold` writes; 1 makes a
        # forgotten vector leave the disk at once, at the price of rewriting the index file on each write
        self.sync_threshold = sync_threshold
        self._cache: OrderedDict[str, UserState] = OrderedDict()
        self._cache_size = cache_users
        self._lock = threading.Lock()
        settings = client.get_settings()
        self.persist_dir = Path(settings.persist_directory) if getattr(settings, "is_persistent", False) else None
        self.compact_interval_s = compact_interval_s
        # this process's Chroma writes and compactions take turns: a VACUUM under a write fails Chroma's own
        # log compaction ("Failed to apply logs to the metadata segment"); never taken before `_compact_lock`,
        # always before a user's `UserState.lock`
        self.write_lock = threading.RLock()
        self._compact_lock = threading.Lock()
        self._compact_timer: threading.Timer | None = None
        self._last_compaction = -math.inf
        self._owed_marker = self.persist_dir / "compaction.owed" if self.persist_dir is not None else None
        self._dropped_folders: set[Path] = set()  # HNSW folders of segments this process dropped
        self.finish_compaction()  # one a process that died before its timer fired still owed

    def for_user(self, user_id: str) -> UserMemory:
        """The one way to reach a user's memories."""
        return UserMemory(self, validate_id(user_id, "user id"))

    def delete_user(self, user_id: str) -> int:
        """Erase every memory of a user: the collection, its vectors, and their traces on disk.

        Found and dropped under the write lock: a write that asked whether it is still wanted (`UserMemory.add`)
        has landed before, or asks after and hears no; none makes the collection again behind the drop."""
        user_id = validate_id(user_id, "user id")
        with self._lock:
            self._cache.pop(user_id, None)
        with self.write_lock:
            try:
                collection = self.client.get_collection(collection_name(user_id), embedding_function=None)
            except Exception:  # chromadb raises NotFoundError or ValueError depending on the client kind
                return 0
            self._check_owner(collection, user_id)
            count = collection.count()
            folders = self._delete(collection)
        self._scrub(folders)
        logger.info("erased %d memories", count)
        return count

    def owners(self) -> dict[str, str | None]:
        """Every memory collection by name, with its owner's user id (None: no owner, or one whose id does not
        name this collection: vectors nobody can reach)."""
        found = {}
        try:
            collections = self.client.list_collections()
        except Exception as exc:
            raise StoreUnavailable(f"memory store unavailable: {exc}") from exc
        for collection in collections:
            if not collection.name.startswith(COLLECTION_PREFIX):
                continue
            owner = (collection.metadata or {}).get("owner")
            found[collection.name] = owner if isinstance(owner, str) and collection_name(owner) == collection.name \
                else None
        return found

    def drop_orphan(self, name: str) -> None:
        """Delete a memory collection without an owner (`owners`), and its traces on disk."""
        if self.owners().get(name, "") is not None:
            raise InvalidInput(f"{name} is not an orphaned memory collection")
        self._drop(self.client.get_collection(name, embedding_function=None))

    # -- internals used by UserMemory ---------------------------------------------------------------

    def _state(self, user_id: str, *, create: bool = True) -> UserState | None:
        with self._lock:
            state = self._cache.get(user_id)
            if state is not None:
                self._cache.move_to_end(user_id)
        if state is not None and self.shared:
            try:
                if time.monotonic() - state.loaded_at > SHARED_RELOAD_S:
                    raise LookupError("reload")
                state.refresh()
            except Exception:  # reloaded: too old, or the collection was dropped (erased) by another process
                self._forget_state(user_id)
                state = None
        if state is not None:
            return state
        collection = self._collection(user_id, create=create)
        if collection is None:
            return None
        state = UserState(collection)
        with self._lock:
            state = self._cache.setdefault(user_id, state)
            self._cache.move_to_end(user_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return state

    def _collection(self, user_id: str, *, create: bool):
        name = collection_name(user_id)
        try:
            if not create:
                try:
                    collection = self.client.get_collection(name, embedding_function=None)
                except Exception:
                    return None
            else:
                with self.write_lock:
                    collection = self.client.get_or_create_collection(
                        name, embedding_function=None, metadata={"owner": user_id, "kind": "rapport.memory"},
                        # inner product on unit vectors is cosine, and keeps stored vectors byte-exact (checkable)
                        configuration={"hnsw": {"space": "ip", "sync_threshold": self.sync_threshold}})
        except Exception as exc:
            raise StoreUnavailable(f"memory store unavailable: {exc}") from exc
        self._check_owner(collection, user_id)
        return collection

    @staticmethod
    def _check_owner(collection, user_id: str) -> None:
        owner = (collection.metadata or {}).get("owner")
        if owner != user_id:  # a hash collision or a foreign collection: refuse rather than mix users
            raise StoreUnavailable(f"memory collection {collection.name} belongs to another owner")

    def _forget_state(self, user_id: str) -> None:
        with self._lock:
            self._cache.pop(user_id, None)

    def _drop(self, collection) -> None:
        """Delete a collection, then its HNSW folders: only those of its own segments, read before the drop (a
        collection created meanwhile, say a new user's first memory during an erasure, keeps its folder)."""
        with self.write_lock:
            folders = self._delete(collection)
        self._scrub(folders)

    def _delete(self, collection) -> list[Path]:
        """Delete a collection (the caller holds the write lock); returns its segments' folders."""
        folders = self._segment_folders(collection.id)
        self.client.delete_collection(collection.name)
        return folders

    def _scrub(self, folders: list[Path]) -> None:
        """After a drop, outside the write lock (a compaction takes it after `_compact_lock`)."""
        self._dropped_folders.update(folders)  # removed again at each compaction: segment ids are never reused,
        self._remove_dropped_folders()  # so a folder Chroma writes late for a dropped segment is never anyone's
        self.scrub_disk()

    def _remove_dropped_folders(self) -> None:
        for path in list(self._dropped_folders):
            shutil.rmtree(path, ignore_errors=True)

    def _segment_folders(self, collection_id) -> list[Path]:
        if self.persist_dir is None:
            return []  # a Chroma server removes its own files
        try:
            with closing(sqlite3.connect(self.persist_dir / "chroma.sqlite3", timeout=30)) as conn:
                rows = conn.execute("SELECT id FROM segments WHERE collection = ?", (str(collection_id),)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"could not read the memory store's segments: {exc}") from exc
        return [self.persist_dir / row[0] for row in rows if UUID_DIR.match(row[0])]

    def scrub_disk(self) -> None:
        """Make deletions final in the embedded store: Chroma leaves deleted rows in SQLite free pages and its
        full-text index until something compacts them. Compacting (FTS optimize + VACUUM) rewrites the whole
        shared file, so it runs at most once per `compact_interval_s`: at once when the last one is older,
        otherwise when that time is up (a timer thread), so a loop of forgets costs one compaction per interval
        rather than one each. An owed compaction is marked on disk and done on the next open if the process
        dies first."""
        if self.persist_dir is None:
            return  # a Chroma server compacts its own storage
        with self._compact_lock:
            wait = self._last_compaction + self.compact_interval_s - time.monotonic()
            if wait > 0:
                if self._compact_timer is None:
                    self._owed_marker.touch()
                    self._compact_timer = threading.Timer(wait, self._compact_owed)
                    self._compact_timer.daemon = True
                    self._compact_timer.start()
                return
            self._compact()

    def finish_compaction(self) -> None:
        """Do an owed compaction now (before closing, or to be sure a deletion has left the disk)."""
        if self.persist_dir is None:
            return
        with self._compact_lock:
            if self._compact_timer is not None or self._owed_marker.exists():
                self._compact()

    def close(self) -> None:
        self.finish_compaction()

    def _compact_owed(self) -> None:
        try:
            self.finish_compaction()
        except StoreUnavailable:
            logger.exception("owed compaction of the memory store failed; it is retried on the next open")

    def _compact(self) -> None:
        """FTS optimize + VACUUM; the caller holds `_compact_lock`."""
        if self._compact_timer is not None:
            self._compact_timer.cancel()
            self._compact_timer = None
        self._remove_dropped_folders()
        database = self.persist_dir / "chroma.sqlite3"
        try:
            for attempt in range(1, COMPACT_TRIES + 1):
                try:
                    with self.write_lock, closing(sqlite3.connect(database, timeout=30, isolation_level=None)) as conn:
                        try:
                            conn.execute("INSERT INTO embedding_fulltext_search(embedding_fulltext_search) "
                                         "VALUES('optimize')")
                        except sqlite3.OperationalError as exc:
                            logger.warning("full-text index not optimised: %s", exc)
                        conn.execute("VACUUM")
                    break
                except sqlite3.Error as exc:
                    # Chroma's own core reads (and writes its log) outside our write lock; a VACUUM beside one can
                    # fail ("disk I/O error", seen in CI) and succeeds when made again
                    if attempt == COMPACT_TRIES:
                        raise StoreUnavailable(f"could not compact the memory store after erasure: {exc}") from exc
                    logger.warning("compacting the memory store failed (%s); trying again", exc)
                    time.sleep(0.5 * attempt)
        finally:
            self._last_compaction = time.monotonic()
        self._owed_marker.unlink(missing_ok=True)


class UserMemory:
    """One user's memories; bound to that user at construction."""

    def __init__(self, store: MemoryStore, user_id: str) -> None:
        self._store = store
        self._user_id = user_id

    @property
    def user_id(self) -> str:
        return self._user_id

    def _state(self, create: bool = True) -> UserState | None:
        return self._store._state(self._user_id, create=create)

    # -- writing ------------------------------------------------------------------------------------

    def add(self, items: list[MemoryItem], *, wanted: Callable[[], bool] | None = None) -> list[str]:
        """Store items (one id per item, in order); an item saying what a stored one says merges into it.

        `wanted` is asked under the write lock, right before the write, which the owner's erasure takes to drop
        the collection (`MemoryStore.delete_user`): False (the erasure has begun) writes nothing, not even the
        collection."""
        if not items:
            return []
        for item in items:
            if not isinstance(item, MemoryItem):
                raise InvalidInput("add() takes MemoryItem objects")
        state = self._state(create=False)
        vectors = self._store.embedder.embed([item.text for item in items])  # (N, 384), unit length
        with self._store.write_lock:
            if wanted is not None and not wanted():
                return []
            state = state or self._state()  # the first memory makes the collection
            with state.lock:
                return self._write(state, items, vectors)

    def _write(self, state: UserState, items: list[MemoryItem], vectors: np.ndarray) -> list[str]:
        now = time.time()
        ids: list[str] = []
        fresh: dict[str, tuple[Record, np.ndarray]] = {}
        merged: dict[str, tuple[Record, np.ndarray]] = {}
        for item, vector in zip(items, vectors):
            meta_json = json.dumps(item.meta, ensure_ascii=False)
            sig = signature(item.text, item.speaker, meta_json)
            ts = item.timestamp.timestamp() if item.timestamp else None
            same = state.by_signature.get(sig)
            pending = fresh.get(same) if same else None
            if same and (pending is not None or self._close(state, same, vector)):
                record = pending[0] if pending else merged[same][0] if same in merged else state.records[same]
                record.count += 1
                if ts is not None and (record.ts is None or ts >= record.ts):
                    record.ts, record.text, record.turn_id = ts, item.text, item.turn_id or record.turn_id
                    if pending is not None:
                        fresh[same] = (record, vector)
                    else:
                        merged[same] = (record, vector)  # the newest wording, with its own vector
                elif pending is None and same not in merged:
                    merged[same] = (record, None)
                ids.append(same)
                continue
            record = Record(id=uuid.uuid4().hex, text=item.text, speaker=item.speaker, evidence=item.is_evidence,
                            seq=state.next_seq, added=now, ts=ts, turn_id=item.turn_id, meta_json=meta_json,
                            signature=sig)
            state.next_seq += 1
            state.by_signature[sig] = record.id
            fresh[record.id] = (record, vector)
            ids.append(record.id)
        batch = self._store.client.get_max_batch_size()
        rows = list(fresh.values())
        try:
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                state.collection.add(ids=[r.id for r, _ in chunk], embeddings=np.stack([v for _, v in chunk]),
                                     documents=[r.text for r, _ in chunk], metadatas=[r.metadata() for r, _ in chunk])
            for key, (record, vector) in merged.items():
                if vector is None:  # only the count changed
                    state.collection.update(ids=[key], metadatas=[record.metadata()])
                else:
                    state.collection.update(ids=[key], embeddings=[vector], documents=[record.text],
                                            metadatas=[record.metadata()])
        except Exception as exc:
            self._store._forget_state(self._user_id)  # the mirror may be ahead of the store: reload next time
            raise StoreUnavailable(f"memory store write failed: {exc}") from exc
        for record, vector in rows:
            state._mirror(record, vector)
        for record, vector in merged.values():
            if record.evidence:
                state.lexical.add(record.id, record.text)  # the newest wording
                state._saw_time(record.when)
                if vector is not None:
                    state.vectors.add(record.id, vector)
        return ids

    def _close(self, state: UserState, memory_id: str, vector: np.ndarray) -> bool:
        """Whether a stored memory's vector is close enough to be the same statement."""
        got = state.collection.get(ids=[memory_id], include=["embeddings"])
        if not len(got["ids"]):
            return False
        return float(np.dot(np.asarray(got["embeddings"][0], dtype=np.float32), vector)) >= DUPLICATE_COSINE

    def remember_turn(self, *, turn_id: str, user_text: str, reply: str, timestamp: datetime,
                      wanted: Callable[[], bool] | None = None) -> list[str]:
        """Keep the user's side of a finished turn; the reply is the assistant's, never evidence, so not kept.
        Only its statements are kept (`memory.facts`): questions, requests and small talk tell nothing lasting
        about the user. Long messages are split. (Imported memories, `add`, are kept as given.) `wanted`: as `add`."""
        text = memory_text(strip_controls(user_text or "").strip()) or ""
        if not tokenize(text):
            return []
        items = [MemoryItem(text=chunk, speaker="user", timestamp=timestamp, turn_id=turn_id)
                 for chunk in split_text(text)]
        return self.add(items, wanted=wanted)

    # -- reading ------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, *, mode: str = "hybrid") -> list[MemoryHit]:
        """The user's own statements that best match `query`, best first: BM25 and dense ranks fused (RRF);
        `mode` "dense" or "lexical" uses one retriever alone (for benchmarks)."""
        query = clean_text(query, "query", max_chars=MAX_TEXT_CHARS)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100:
            raise InvalidInput("k must be an integer from 1 to 100")
        if mode not in ("hybrid", "dense", "lexical"):
            raise InvalidInput(f"unknown search mode {mode!r}")
        state = self._state(create=False)
        if state is None or not state.records:
            return []
        ranked, _, _ = self._ranked(state, query, k, mode)
        return [state.records[key].hit(score) for key, score in ranked]

    def _ranked(self, state: UserState, query: str, k: int, mode: str = "hybrid"):
        """(best `k` (id, score) pairs, cosine similarity by id, ids BM25 matched).

        The score is the cosine similarity to the query with the speaker's name taken out, plus a small share of
        BM25 (divided by the best BM25 score), plus a lift for the lines of a speaker the query names, plus, when
        the query asks how things are now, a lift for newer statements. Lines that say the same thing as a
        better one (small talk said again) are left out, so the top k holds k different things."""
        content, named = query_parts(query, state)
        pool = max(DENSE_POOL, 2 * k)
        vector = self._store.embedder.embed_one(content) if mode != "lexical" else None
        similarity = self._dense(state, vector, pool) if vector is not None else {}
        lexical = dict(state.lexical.search(content, pool)) if mode != "dense" else {}
        if vector is not None and lexical:  # a BM25 match outside the dense pool still has a cosine
            missing = [key for key in lexical if key not in similarity]
            if missing:
                similarity.update(zip(missing, (state.vectors.rows(missing) @ vector).tolist()))
        top = max(lexical.values(), default=1.0)
        weight = LEXICAL_WEIGHT if mode == "hybrid" else 1.0
        now = bool(CURRENT_CUE.search(query))
        recent = recency(state) if now else None
        scores = {}
        for key in similarity.keys() | lexical.keys():
            record = state.records[key]
            score = similarity.get(key, 0.0) + weight * lexical.get(key, 0.0) / top
            if named and record.speaker in named:
                score += SPEAKER_BONUS
            if recent is not None:
                score += RECENCY_BONUS * recent(record.when)
            scores[key] = score
        # equal scores: the more recent statement first (a fact restated later usually supersedes)
        ranked, seen = [], set()
        for key, score in sorted(scores.items(), key=lambda kv: (-kv[1], -state.records[kv[0]].when)):
            record = state.records[key]
            said = (record.speaker, " ".join(record.text.lower().split()))
            if said not in seen:
                seen.add(said)
                ranked.append((key, score))
                if len(ranked) == (2 * k if now else k):
                    break
        if now:
            ranked = superseded_last(state, ranked)[:k]
        return ranked, similarity, set(lexical)

    @staticmethod
    def _dense(state: UserState, vector: np.ndarray, wanted: int) -> dict[str, float]:
        """Up to `wanted` of the user's own statements nearest to `vector`: id → cosine similarity, best first."""
        keys, sims = state.vectors.scores(vector)  # (N,): exact cosine against every statement
        n = min(wanted, len(sims))
        if n <= 0:
            return {}
        top = np.argpartition(-sims, n - 1)[:n]
        top = top[np.argsort(-sims[top], kind="stable")]
        return {keys[i]: float(sims[i]) for i in top if keys[i] is not None}

    def recall(self, query: str, *, k: int = 6) -> list[MemoryHit]:
        """What goes into the prompt for this turn: up to `k` of the user's own statements that bear on it
        (a shared content word, or a cosine similarity of at least RECALL_MIN_SIMILARITY), best first.
        The user's earlier questions tell nothing about them: the same question asked before is left out,
        other questions come after statements."""
        if not isinstance(query, str) or not query.strip():
            return []
        try:
            query = clean_text(query[:MAX_TEXT_CHARS], "query", max_chars=MAX_TEXT_CHARS)
        except InvalidInput:
            return []
        state = self._state(create=False)
        if state is None or not state.records:
            return []
        ranked, similarity, matched = self._ranked(state, query, max(1, min(k, 100)) * 2)
        asked = set(tokenize(query))
        kept = []
        for key, score in ranked:
            record = state.records[key]
            if key not in matched and similarity.get(key, 0.0) < RECALL_MIN_SIMILARITY:
                continue
            if is_question(record.text):
                if set(tokenize(record.text)) == asked:
                    continue
                score /= 2
            kept.append((key, score))
        kept.sort(key=lambda kv: -kv[1])
        return [state.records[key].hit(score) for key, score in kept[:k]]

    def list(self, limit: int | None = None) -> list[MemoryHit]:
        """Everything stored for this user, newest first."""
        state = self._state(create=False)
        if state is None:
            return []
        with state.lock:  # a concurrent write must not change the dict under the sort
            records = sorted(state.records.values(), key=lambda r: (r.when, r.seq), reverse=True)
        return [record.hit(1.0) for record in records[:limit]]

    def export(self) -> list[dict]:
        """Everything stored for this user as JSON-able dicts, oldest first."""
        return [{key: value for key, value in hit.to_json().items() if key != "score"} for hit in reversed(self.list())]

    # -- forgetting ---------------------------------------------------------------------------------

    def forget(self, memory_id: str) -> None:
        """Forget one memory of this user; NotFound if this user has no memory with that id."""
        if not isinstance(memory_id, str) or not memory_id or len(memory_id) > 128:
            raise NotFound("no such memory")
        state = self._state(create=False)
        if state is None or memory_id not in state.records:
            raise NotFound(f"no memory {memory_id[:40]!r}")
        with self._store.write_lock, state.lock:  # in `add`'s order
            try:
                # overwrite first: HNSW only marks a deleted vector, so its bytes would otherwise stay on disk
                state.collection.update(ids=[memory_id], embeddings=[ERASED_VECTOR],
                                        documents=["-"], metadatas=[{"erased": True}])
                state.collection.delete(ids=[memory_id])
            except Exception as exc:
                self._store._forget_state(self._user_id)
                raise StoreUnavailable(f"memory store write failed: {exc}") from exc
            state._unmirror(memory_id)
        self._store.scrub_disk()

    def forget_all(self) -> int:
        """Forget every memory of this user; returns how many there were."""
        return self._store.delete_user(self._user_id)


def query_parts(query: str, state: UserState) -> tuple[str, set[str]]:
    """The query without the names of this user's speakers, and the speakers it named.

    "What does Jon do for a living?" is asked about Jon, but Jon's own words never say "Jon": it is the other
    speaker's lines ("Thanks Jon!") that do, and both retrievers would match those. So the name selects a speaker
    and the rest of the question is what is searched for."""
    if state.speaker_pattern is None:
        return query, set()
    named = {state.speakers[m.group(1).lower()] for m in state.speaker_pattern.finditer(query)}
    if not named:
        return query, named
    content = re.sub(r"\s+", " ", state.speaker_pattern.sub(" ", query)).strip(" ,")
    return (content if tokenize(content) else query), named


def superseded_last(state: UserState, ranked: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """For a question about now: a statement that a newer one of the same speaker on the same matter (cosine at
    least SUPERSEDED_COSINE) follows goes just below that newer one ("I live in Lyon" after "We moved to Porto")."""
    if len(ranked) < 2:
        return ranked
    keys = [key for key, _ in ranked]
    vectors = state.vectors.rows(keys)
    close = vectors @ vectors.T  # (n, n) cosine between the hits
    scores = dict(ranked)
    for i, older in enumerate(keys):
        a = state.records[older]
        for j, newer in enumerate(keys):
            b = state.records[newer]
            if i != j and close[i, j] >= SUPERSEDED_COSINE and a.speaker == b.speaker and b.when > a.when:
                scores[older] = min(scores[older], scores[newer] - 1e-4)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def recency(state: UserState):
    """when → 0 for the user's oldest statement … 1 for the newest."""
    first, last = state.time_span()
    span = max(last - first, 1.0)
    return lambda when: (when - first) / span


def is_question(text: str) -> bool:
    """A short message that asks rather than tells ("What is my name?")."""
    return text.rstrip().endswith("?") and len(text) < 200


def split_text(text: str, limit: int = MAX_TEXT_CHARS) -> list[str]:
    """Pieces of at most `limit` characters, cut at whitespace where possible."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit)
        cut = cut if cut > limit // 2 else limit
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        pieces.append(text)
    return pieces


def parse_jsonl(data: bytes) -> list[MemoryItem]:
    """All items of a `memory import` file, or InvalidInput naming the first bad line (nothing half-imported)."""
    items = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidInput(f"line {number}: not UTF-8 text") from None
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise InvalidInput(f"line {number}: not JSON ({exc.msg})") from None
        try:
            items.append(MemoryItem.from_json(value))
        except InvalidInput as exc:
            raise InvalidInput(f"line {number}: {exc}") from None
    return items
