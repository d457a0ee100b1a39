"""Assembles one process's services from settings: backend, transcript store, dialogue manager."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dialogue.backend import Backend, open_backend
from dialogue.manager import DialogueManager
from dialogue.settings import Settings
from dialogue.store import TranscriptStore

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    backend: Backend
    store: TranscriptStore
    manager: DialogueManager
    closers: list = field(default_factory=list)

    def export_user(self, user_id: str) -> dict:
        """Everything stored about a user, as one JSON-able document."""
        return {"user_id": user_id, **self.store.export_user(user_id)}

    def erase_user(self, user_id: str) -> dict[str, int]:
        """Erase every record about a user; returns what went, by kind."""
        return self.store.delete_user(user_id)

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                logger.exception("closing %s failed", close)


def open_services(settings: Settings | None = None, *, backend: Backend | None = None) -> Services:
    """Everything a channel needs; the model starts loading in the background at once."""
    settings = settings or Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    store = TranscriptStore(settings.db_url)
    backend = backend or open_backend(settings)
    manager = DialogueManager(settings, backend, store)
    return Services(settings=settings, backend=backend, store=store, manager=manager,
                    closers=[store.close, backend.close])
