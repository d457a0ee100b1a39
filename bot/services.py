"""Assembles one process's services from settings: backend, stores, dialogue manager."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

from dialogue.model.backend import Backend, open_backend
from dialogue.manager import DialogueManager
from dialogue.recall import TurnRecall
from dialogue.settings import Settings
from dialogue.store import TranscriptStore
from memory.chroma import ChromaHandle, open_chroma
from memory.embeddings import Embedder, shared_embedder
from memory.persona import PersonaStore

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """One process's stores and model; the Chroma-backed stores open on first use."""

    settings: Settings
    backend: Backend
    store: TranscriptStore
    manager: DialogueManager
    closers: list = field(default_factory=list)

    @cached_property
    def embedder(self) -> Embedder:
        return shared_embedder()

    @cached_property
    def chroma(self) -> ChromaHandle:
        """The embedded store (locked to this process) or the Chroma server of `RAPPORT_CHROMA_URL`."""
        handle = open_chroma(path=self.settings.chroma_dir, url=self.settings.chroma_url)
        self.closers.append(handle.close)
        return handle

    @cached_property
    def memory(self):
        """Per-user long-term memory (`memory.memories.MemoryStore`)."""
        from memory.memories import MemoryStore

        return MemoryStore(self.chroma.client, self.embedder)

    @cached_property
    def faq(self):
        """The business FAQ (`memory.faq.FaqIndex`)."""
        from memory.faq import FaqIndex

        return FaqIndex(self.chroma.client, self.embedder)

    @cached_property
    def personas(self) -> PersonaStore:
        return PersonaStore(self.store.engine)

    def export_user(self, user_id: str) -> dict:
        """Everything stored about a user, as one JSON-able document."""
        return {
            "user_id": user_id,
            "persona": self.personas.get(user_id).to_json(),
            "memories": self.memory.for_user(user_id).export(),
            **self.store.export_user(user_id),
        }

    def erase_user(self, user_id: str) -> dict[str, int]:
        """Erase every record about a user (memories, persona, transcripts, ratings); returns counts by kind."""
        from training.registry import flag_user_erased  # lineage: versions trained on them can't be promoted

        counts = {"memories": self.memory.delete_user(user_id)}
        counts.update(self.store.delete_user(user_id))
        counts["adapter_versions_flagged"] = len(flag_user_erased(self.settings.adapters_dir, user_id))
        return counts

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                logger.exception("closing %s failed", close)


def open_services(settings: Settings | None = None, *, backend: Backend | None = None,
                  load_model: bool = True) -> Services:
    """Everything a channel needs; with `load_model` the model starts loading in the background at once,
    otherwise at its first use (commands that only touch the stores never pay for it)."""
    settings = settings or Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    store = TranscriptStore(settings.db_url)
    backend = backend or open_backend(settings, eager=load_model)
    manager = DialogueManager(settings, backend, store)
    services = Services(settings=settings, backend=backend, store=store, manager=manager,
                        closers=[store.close, backend.close])
    recall = TurnRecall(services)
    manager.recall = recall
    manager.after_turn_hooks.append(recall.remember)
    from training.registry import AdapterSelector  # the registry reader: promote/rollback reach running channels

    manager.adapter_for = AdapterSelector(settings).adapter_for
    return services
