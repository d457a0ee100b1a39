"""Leases on pending turns: the process writing a turn says so every few seconds, so another can tell it died.

A turn is on disk as `pending` from the moment its message comes in (`DialogueManager.receive`) until its
reply is written. While the process lives, a thread renews the lease (the row's `finished_at`) of each turn
it holds every third of `RAPPORT_TURN_LEASE_S`; a pending turn whose lease is older than that was left by a
process that died (kill -9, a crash, a deploy), whichever host it ran on, and is closed as `interrupted` by
the next sweep (`DialogueManager.close_abandoned`), once.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from dialogue.store import TranscriptStore, utcnow

logger = logging.getLogger(__name__)


class TurnLeases:
    """The pending turns one process is writing, with a daemon thread renewing their leases."""

    def __init__(self, store: TranscriptStore, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, turn_id: str) -> None:
        with self._lock:
            self._held.add(turn_id)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._renew, name="rapport-turn-leases", daemon=True)
                self._thread.start()

    def release(self, turn_id: str) -> None:
        with self._lock:
            self._held.discard(turn_id)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def stale_before(self) -> datetime:
        """A pending turn whose lease was last renewed before this moment has no live writer."""
        return utcnow() - timedelta(seconds=self.lease_s)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.store.renew_leases(self.held())
            except Exception:  # the database may be back at the next tick; the lease has slack
                logger.warning("could not renew the leases of pending turns", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
