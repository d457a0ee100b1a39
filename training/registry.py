"""The adapter registry: versions, their status, what is served to whom, and the reader the runtime polls.

State lives in `$RAPPORT_HOME/adapters/registry.json`, replaced atomically (temp file + rename) under an
exclusive `flock` on `registry.lock`, so `serve` and a CLI command can change it at the same time and a
reader always sees a whole file. Adapter directories are immutable: `adapters/v0007/` never changes
after it appears, and a version's serving name carries a hash of its weights ("v0007-1a2b3c4d").
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from memory.errors import InvalidInput, NotFound, RapportError, StoreUnavailable
from training.experiment import split_report

Ref = TypeVar("Ref")  # the runtime's adapter reference, built by the `make_ref` an `AdapterSelector` is handed

logger = logging.getLogger(__name__)

STATE_FILE = "registry.json"
LOCK_FILE = "registry.lock"
STATUSES = ("candidate", "active", "retired", "rejected")
VERSION = re.compile(r"^v?0*(\d{1,6})(?:-[0-9a-f]{8})?$")


class PromotionRejected(RapportError):
    """That version may not be served (rejected or not yet passed by the gate, or trained on an erased user's data)."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def weights_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path / "adapter_model.safetensors", "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:8]


def ab_bucket(user_id: str, version: str) -> float:
    """A user's fixed place in [0, 1) for one A/B test: the same user always lands on the same side."""
    return int(hashlib.sha256(f"ab:{version}:{user_id}".encode()).hexdigest()[:13], 16) / 16**13


@dataclass
class AdapterVersion:
    """One trained adapter: where it is, what made it, how it scored, and whether it may be served."""

    version: str  # "v0007"
    name: str  # "v0007-1a2b3c4d": the serving identity (runtime caches key on it)
    path: str
    status: str = "candidate"
    parent: str | None = None
    dataset_hash: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # "erased_user": trained on a user who was deleted since
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)

    def public(self, share: float | None = None) -> dict[str, Any]:
        """The SPEC shape of `adapters list --json` (plus a few extra fields)."""
        out = {"version": self.version, "status": self.status, "metrics": self.metrics, "created_at": self.created_at,
               "name": self.name, "parent": self.parent, "dataset_hash": self.dataset_hash,
               "gate_passed": self.gate.get("passed"), "flags": self.flags, "updated_at": self.updated_at}
        if share is not None:
            out["share"] = share
        return out


@dataclass
class RegistryState:
    versions: dict[str, AdapterVersion] = field(default_factory=dict)
    active: str | None = None
    ab: dict[str, Any] | None = None  # {"version": "v0008", "share": 0.2}: a candidate served to a sticky share
    previous: list[str] = field(default_factory=list)  # former actives, most recent last: what rollback restores
    erased_user_hashes: list[str] = field(default_factory=list)
    past: list[dict[str, Any]] = field(default_factory=list)  # ended A/B splits, oldest first (`Registry._end_split`)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RegistryState:
        versions = {k: AdapterVersion(**v) for k, v in data.get("versions", {}).items()}
        return cls(versions=versions, active=data.get("active"), ab=data.get("ab"),
                   previous=list(data.get("previous", [])), erased_user_hashes=list(data.get("erased_user_hashes", [])),
                   past=list(data.get("past", [])))

    def to_json(self) -> dict[str, Any]:
        return {"versions": {k: asdict(v) for k, v in self.versions.items()}, "active": self.active, "ab": self.ab,
                "previous": self.previous, "erased_user_hashes": self.erased_user_hashes, "past": self.past}

    def share_of(self, version: str) -> float | None:
        """The fraction of users this version serves now (None when it serves nobody)."""
        ab_share = self.ab["share"] if self.ab else 0.0
        if self.ab and self.ab["version"] == version:
            return ab_share
        return round(1 - ab_share, 4) if version == self.active else None


def read_state(directory: Path) -> RegistryState:
    try:
        return RegistryState.from_json(json.loads((directory / STATE_FILE).read_text()))
    except FileNotFoundError:
        return RegistryState()
    except (ValueError, TypeError, AttributeError) as exc:  # only a hand edit can do this: writes are atomic
        raise StoreUnavailable(f"adapter registry {directory / STATE_FILE} is damaged: {exc}") from exc


def write_state(directory: Path, state: RegistryState) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old state or the new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=".registry.", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state.to_json(), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Registry:
    """Read and change the registry of one adapters directory; every change is one locked transaction.

    `store` (the transcripts) measures an A/B split as it ends, for its record; without one the record has no figures.
    """

    def __init__(self, directory: Path, store=None) -> None:
        self.directory = Path(directory)
        self.store = store

    @contextmanager
    def transaction(self) -> Iterator[RegistryState]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = read_state(self.directory)
                yield state
                write_state(self.directory, state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def state(self) -> RegistryState:
        return read_state(self.directory)

    def list(self) -> list[dict[str, Any]]:
        state = self.state()
        return [v.public(state.share_of(k)) for k, v in sorted(state.versions.items())]

    def resolve(self, state: RegistryState, version: str) -> AdapterVersion:
        match = VERSION.match(str(version).strip())
        key = f"v{int(match.group(1)):04d}" if match else None
        if key is None or key not in state.versions:
            raise NotFound(f"no adapter version {version!r}")
        return state.versions[key]

    def get(self, version: str) -> AdapterVersion:
        return self.resolve(self.state(), version)

    # -- new versions ----------------------------------------------------------------------------

    def claim(self, tmp: Path, *, parent: str | None, dataset_hash: str, metrics: dict[str, Any]) -> AdapterVersion:
        """Move a finished adapter from its temp dir to the next free `v<N>/` and register it as a candidate."""
        digest = weights_hash(tmp)
        with self.transaction() as state:
            number = max([int(k[1:]) for k in state.versions] + _dir_numbers(self.directory) + [0]) + 1
            while True:
                target = self.directory / f"v{number:04d}"
                try:
                    os.rename(tmp, target)  # fails if the name exists: a directory is never overwritten
                    break
                except OSError:
                    number += 1
            version = AdapterVersion(version=target.name, name=f"{target.name}-{digest}", path=str(target),
                                     parent=parent, dataset_hash=dataset_hash, metrics=metrics)
            state.versions[version.version] = version
        logger.info("registered adapter %s", version.name)
        return version

    def record_gate(self, version: str, gate: dict[str, Any], metrics: dict[str, Any]) -> AdapterVersion:
        """Store a gate verdict; a failed gate marks the version rejected (a passed one leaves it alone)."""
        with self.transaction() as state:
            item = self.resolve(state, version)
            item.gate = gate
            item.metrics = {**item.metrics, **metrics}
            if not gate.get("passed") and item.status == "candidate":
                item.status = "rejected"
                if state.ab and state.ab["version"] == item.version:
                    self._end_split(state, "stopped", "rejected by the gate")
            item.updated_at = now()
            return item

    # -- serving ---------------------------------------------------------------------------------

    def promote(self, version: str, share: float | None = None) -> AdapterVersion:
        """Serve `version` to everyone, or with `share` in (0, 1) to that sticky fraction of users."""
        if share is not None and not 0 < share <= 1:
            raise InvalidInput("--share must be in (0, 1]")
        with self.transaction() as state:
            item = self.resolve(state, version)
            if item.status == "rejected":
                raise PromotionRejected(f"{item.version} was rejected by the gate: {', '.join(item.gate.get('reasons', []))}")
            if not item.gate.get("passed"):  # e.g. the process died between training and the gate
                raise PromotionRejected(f"{item.version} has no passing gate record; "
                                        f"run `rapport adapters eval {item.version}` first")
            if "erased_user" in item.flags:
                raise PromotionRejected(f"{item.version} was trained on an erased user's data; "
                                        "retrain with `rapport train --exclude-deleted`")
            if not Path(item.path, "adapter_model.safetensors").is_file():
                raise NotFound(f"{item.version}: adapter files are missing from {item.path}")
            if share is not None and share < 1:
                if item.version == state.active:
                    raise InvalidInput(f"{item.version} is already active")
                self._end_split(state, "stopped", f"replaced by {item.version} at {share:.0%}")
                state.ab = {"version": item.version, "share": share, "started_at": now()}
            else:
                if state.ab and state.ab["version"] == item.version:
                    self._end_split(state, "promoted")
                else:
                    self._end_split(state, "stopped", f"{item.version} promoted to everyone")
                if state.active and state.active != item.version:
                    old = state.versions[state.active]
                    old.status, old.updated_at = "retired", now()
                    state.previous.append(state.active)
                state.active = item.version
                item.status = "active"
            item.updated_at = now()
            return item

    def rollback(self, *, ended: str = "rolled back") -> dict[str, Any]:
        """End a running A/B test (recorded as `ended`: the console's Stop buttons say "stopped"); otherwise retire
        the active version and restore the one before it."""
        with self.transaction() as state:
            if state.ab:
                version = state.ab["version"]
                self._end_split(state, ended)
                return {"ended_ab": version, "active": state.active}
            if not state.active:
                raise NotFound("nothing to roll back: the base model is being served")
            retired = state.active
            _retire_active(state)
            return {"retired": retired, "active": state.active}

    def _end_split(self, state: RegistryState, ended: str, reason: str | None = None) -> None:
        """Stop the running A/B split, if any, and keep its record in `state.past`: the versions (A is the active one
        or "base"), share, start and end, how it ended ("promoted", "stopped", "rolled back") and why, and the
        final per-variant figures with the decision rule's verdict (`training/experiment.py`)."""
        if not state.ab:
            return
        final: dict[str, Any] = {}
        if self.store is not None:
            try:
                final = split_report(state, self.store)
            except Exception:  # ending a split (a bad version, an erasure) never waits on the transcripts
                logger.exception("the A/B split of %s ends unmeasured", state.ab["version"])
        state.past.append({"a": state.active or "base", "b": state.ab["version"], "share": state.ab["share"],
                           "started_at": state.ab.get("started_at"), "ended_at": now(), "ended": ended,
                           "reason": reason, "variants": final.get("variants"),
                           "prob_b_better": final.get("prob_b_better"), "decision": final.get("decision")})
        state.ab = None

    # -- erasure ---------------------------------------------------------------------------------

    def flag_user(self, *user_hashes: str) -> list[str]:
        """Flag every version whose lineage holds this user and stop serving them at once (the A/B split ends; an
        active one gives way to the newest clean version before it, or the base model); remember the user so no
        new dataset has them. The flagged versions wait for retraining and `adapters purge`."""
        flagged = []
        with self.transaction() as state:
            state.erased_user_hashes += [h for h in user_hashes if h not in state.erased_user_hashes]
            for item in state.versions.values():
                if _lineage_users(Path(item.path)) & set(user_hashes) and "erased_user" not in item.flags:
                    item.flags.append("erased_user")
                    item.updated_at = now()
                    flagged.append(item.version)
            if state.ab and "erased_user" in state.versions[state.ab["version"]].flags:
                self._end_split(state, "stopped", "trained on an erased user's data")
            if state.active and "erased_user" in state.versions[state.active].flags:
                _retire_active(state)
        return flagged

    def purge(self) -> list[str]:
        """Delete the files of every version trained on an erased user (adapter, train_meta.json); the registry
        keeps its line, retired (or rejected) with the flag "purged". Never a served version (flagging stopped
        serving them). And the checkpoints of unfinished runs on an erased user's data, or on data no one can tell
        (a checkpoint from before they recorded their users). Returns the versions and checkpoints deleted."""
        purged = []
        with self.transaction() as state:
            for item in state.versions.values():
                if "erased_user" in item.flags and "purged" not in item.flags:
                    shutil.rmtree(item.path, ignore_errors=True)
                    item.flags.append("purged")
                    item.status = "rejected" if item.status == "rejected" else "retired"
                    item.updated_at = now()
                    purged.append(item.version)
            erased = set(state.erased_user_hashes)
            for checkpoint in sorted(self.directory.glob(".checkpoints/*/state.pt")):
                run = checkpoint.parent
                if not (run / "train_meta.json").exists() or _lineage_users(run) & erased:
                    shutil.rmtree(run, ignore_errors=True)
                    purged.append(f"{run.parent.name}/{run.name}")
        return purged


def _retire_active(state) -> None:
    """Retire the active version and serve the newest earlier one that may be served, else the base model."""
    current = state.versions[state.active]
    current.status, current.updated_at = "retired", now()
    restored = None
    while state.previous:
        candidate = state.versions.get(state.previous.pop())
        if candidate and "erased_user" not in candidate.flags and candidate.status != "rejected":
            restored = candidate
            break
    state.active = restored.version if restored else None
    if restored:
        restored.status, restored.updated_at = "active", now()


def _dir_numbers(directory: Path) -> list[int]:
    return [int(p.name[1:]) for p in directory.glob("v[0-9]*") if p.name[1:].isdigit()]


def _lineage_users(path: Path) -> set[str]:
    try:
        meta = json.loads((path / "train_meta.json").read_text())
    except (OSError, ValueError):
        return set()
    return set(meta.get("lineage", {}).get("user_hashes", []))


def flag_user_erased(adapters_dir: Path, user_id: str, store=None) -> list[str]:
    """Call on user deletion: flags (and stops promotion of) every version trained on the user's turns; `store`
    measures an A/B split that ends so."""
    from training.datasets import lineage_salt, user_hash

    # the salted hash, and the unsalted one of versions trained before lineage hashes had a salt
    hashes = user_hash(user_id, lineage_salt(adapters_dir)), user_hash(user_id)
    flagged = Registry(adapters_dir, store).flag_user(*hashes)
    if flagged:
        logger.warning("user erasure: adapter versions %s were trained on their data", ", ".join(flagged))
    return flagged


class AdapterSelector(Generic[Ref]):
    """What the runtime asks every turn: which adapter serves this user. Re-reads the registry when it changes.

    `make_ref(name, path)` builds the runtime's adapter reference (`dialogue.model.worker.AdapterRef`); it is
    handed in so that reading the registry never loads the model runtime.
    """

    def __init__(self, source, *, make_ref: Callable[[str, Path], Ref], interval_s: float = 1.0) -> None:
        self.directory = Path(getattr(source, "adapters_dir", source))  # Settings or the adapters dir itself
        self.make_ref = make_ref
        self.interval_s = interval_s
        self._checked = float("-inf")
        self._signature: tuple | None = None
        self._active: Ref | None = None
        self._ab: tuple[Ref, float, str] | None = None

    def _refresh(self) -> None:
        clock = time.monotonic()
        if clock - self._checked < self.interval_s:
            return
        self._checked = clock
        try:
            stat = (self.directory / STATE_FILE).stat()
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            signature = None
        if signature == self._signature:
            return
        try:
            state = read_state(self.directory)
        except (OSError, StoreUnavailable) as exc:  # keep serving what we had; say why once per change
            logger.warning("adapter registry unreadable (%s); keeping the previous choice", exc)
            self._signature = signature
            return
        self._signature = signature
        self._active = self._ref(state.versions.get(state.active)) if state.active else None
        self._ab = None
        if state.ab and (ref := self._ref(state.versions.get(state.ab["version"]))):
            self._ab = (ref, float(state.ab["share"]), state.ab["version"])
        logger.info("serving adapter %s%s", self._active.name if self._active else "base",
                    f", A/B {self._ab[0].name} at {self._ab[1]:.0%}" if self._ab else "")

    def _ref(self, item: AdapterVersion | None) -> Ref | None:
        if item is None or not Path(item.path, "adapter_model.safetensors").is_file():
            return None
        return self.make_ref(item.name, Path(item.path))

    def adapter_for(self, user_id: str) -> Ref | None:
        self._refresh()
        if self._ab and ab_bucket(user_id, self._ab[2]) < self._ab[1]:
            return self._ab[0]
        return self._active

