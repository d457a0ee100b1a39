"""Retraining on a schedule: `rapport serve` trains a candidate when enough new training examples arrived (ratings
that enter the dataset, approved corrections) or enough days passed.

The run is `rapport train`'s own (`training.pipeline.train_version`: dataset → LoRA → registry → gate). One run at a
time across every process on this home: an exclusive non-blocking `flock` on `adapters/retrain.lock`; a process that
finds it held skips its turn. Each run and its verdict are kept in `adapters/retrain.json` (newest last, atomically
rewritten under that lock) for the console. A version is promoted only when the gate passed, and only when
`RAPPORT_RETRAIN_PROMOTE_SHARE` says so; otherwise it waits as a candidate for an operator's click.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dialogue.settings import Settings
from dialogue.store import TranscriptStore
from training.pipeline import train_version
from training.registry import Registry
from training.store import TrainingStore
from training.train import TrainConfig

logger = logging.getLogger(__name__)
RUNS_FILE, LOCK_FILE, KEEP_RUNS = "retrain.json", "retrain.lock", 50


@dataclass(frozen=True)
class Schedule:
    """When `serve` retrains: after `min_examples` new examples (`TrainingStore.examples_since`), or `every_days` after
    the last run (0 = off)."""

    min_examples: int = 0
    every_days: float = 0.0
    promote_share: float = 0.0  # 0 = an operator promotes; (0, 1) = an A/B share; 1 = everyone

    @classmethod
    def of(cls, settings: Settings) -> Schedule:
        return cls(settings.retrain_min_examples, settings.retrain_every_days, settings.retrain_promote_share)

    @property
    def enabled(self) -> bool:
        return bool(self.min_examples or self.every_days)

    def describe(self) -> str:
        if not self.enabled:
            return "off (RAPPORT_RETRAIN_MIN_EXAMPLES / RAPPORT_RETRAIN_EVERY_DAYS)"
        parts = ([f"after {self.min_examples} new examples"] if self.min_examples else []) + (
            [f"every {self.every_days:g} days with new examples"] if self.every_days else [])
        promote = ("an operator promotes what passes the gate" if not self.promote_share else
                   f"what passes the gate is served to {self.promote_share:.0%} of users at once")
        return " or ".join(parts) + "; " + promote


def due(schedule: Schedule, *, new_examples: int, last_run_at: datetime | None, now: datetime) -> str | None:
    """Why a run is due now, or None. Nothing new to learn from is never a reason to train again."""
    if not schedule.enabled or new_examples <= 0:
        return None
    if schedule.min_examples and new_examples >= schedule.min_examples:
        return f"{new_examples} new examples (at least {schedule.min_examples})"
    if schedule.every_days and (last_run_at is None or now - last_run_at >= timedelta(days=schedule.every_days)):
        return f"{schedule.every_days:g} days since the last run, {new_examples} new examples"
    return None


def read_runs(adapters_dir: Path) -> list[dict[str, Any]]:
    """The recorded runs, oldest first."""
    try:
        return json.loads((Path(adapters_dir) / RUNS_FILE).read_text())["runs"]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def _write_runs(adapters_dir: Path, runs: list[dict[str, Any]]) -> None:
    path = Path(adapters_dir) / RUNS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": runs[-KEEP_RUNS:]}, indent=1))
    os.replace(tmp, path)


@contextmanager
def retrain_lock(adapters_dir: Path) -> Iterator[bool]:
    """True while this process holds the retraining lock; False (at once, no waiting) when another one does."""
    Path(adapters_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(adapters_dir) / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _parse(stamp: str | None) -> datetime | None:
    return datetime.fromisoformat(stamp) if stamp else None


class RetrainScheduler:
    """Checks the schedule every `settings.retrain_check_seconds` on a thread of its own, and trains when due."""

    def __init__(self, settings: Settings, store: TranscriptStore, *, faq_entries: Callable[[], list] = list,
                 config: TrainConfig | None = None, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings, self.store, self.faq_entries, self.config, self.clock = settings, store, faq_entries, config, clock
        self.schedule = Schedule.of(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def since(self, runs: list[dict[str, Any]]) -> datetime | None:
        """Examples after this count as new: those since the last run started, or since the newest version."""
        if runs:
            return _parse(runs[-1]["started_at"])
        created = [v.created_at for v in Registry(self.settings.adapters_dir).state().versions.values()]
        return _parse(max(created)) if created else None

    def check(self) -> dict[str, Any] | None:
        """One look at the schedule: when a run is due and the lock is free, train, gate, record; the run or None."""
        if not self.schedule.enabled:
            return None
        adapters = self.settings.adapters_dir
        with retrain_lock(adapters) as held:
            if not held:
                logger.info("retraining skipped: another process holds %s", adapters / LOCK_FILE)
                return None
            runs = read_runs(adapters)
            if runs and runs[-1]["status"] == "running":  # we hold the lock, so the process of that run is gone
                runs[-1]["status"] = "interrupted"
                _write_runs(adapters, runs)
            since = self.since(runs)
            new = TrainingStore(self.store).examples_since(since)
            now = self.clock()
            reason = due(self.schedule, new_examples=new, last_run_at=_parse(runs[-1]["started_at"]) if runs else None,
                         now=now)
            if reason is None:
                return None
            run: dict[str, Any] = {"started_at": now.isoformat(), "reason": reason,
                                   "new_examples": new, "status": "running"}
            _write_runs(adapters, [*runs, run])
            logger.info("retraining: %s", reason)
            try:
                result = train_version(self.settings, self.store, faq_entries=self.faq_entries(), config=self.config,
                                       show_progress=False)
            except Exception as exc:  # recorded for the console; the next due check tries again
                logger.exception("retraining failed")
                run.update(status="failed", error=f"{exc.__class__.__name__}: {exc}")
            else:
                gate = result["gate"]
                run.update(status="done", version=result["version"], gate_passed=bool(gate["passed"]),
                           gate_reasons=list(gate.get("reasons") or []), baseline=gate.get("baseline"),
                           examples=result["metrics"].get("examples"), promoted=None)
                if gate["passed"] and self.schedule.promote_share > 0:
                    share = self.schedule.promote_share
                    Registry(adapters, self.store).promote(result["version"], share if share < 1 else None)
                    run["promoted"] = share
            run["finished_at"] = self.clock().isoformat()
            _write_runs(adapters, [*runs, run])
            return run

    def start(self) -> None:
        """Check now and then every `retrain_check_seconds`, on a daemon thread, until `stop`."""
        if not self.schedule.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="rapport-retrain", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.retrain_check_seconds):
            try:
                self.check()
            except Exception:
                logger.exception("retraining check failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
