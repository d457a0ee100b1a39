"""The composition root: one process's settings wired to its backend, stores, dialogue manager and adapter selector."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from bot.http.chatwoot import ChatwootApi, ChatwootNotes
from bot.http.webhook import WebhookNotifier
from dialogue.handoff import HandoffDesk, Listener
from dialogue.integrations import IntegrationStore
from dialogue.manager import DialogueManager
from dialogue.model.backend import Backend, LocalBackend
from dialogue.model.worker import AdapterRef
from dialogue.recall import TurnRecall
from dialogue.settings import Settings, reveal
from dialogue.store import TranscriptStore
from memory.chroma import ChromaHandle, open_chroma
from memory.embeddings import Embedder, shared_embedder
from memory.faq import FaqIndex
from memory.faq_fit import FitConfig
from memory.memories import MemoryStore
from memory.persona import PersonaStore
from training.registry import AdapterSelector, flag_user_erased

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """One process's stores and model; the Chroma-backed stores open on first use."""

    settings: Settings
    backend: Backend
    store: TranscriptStore
    closers: list = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)  # told of each handoff, besides those the settings name
    manager: DialogueManager = field(init=False)
    desk: HandoffDesk = field(init=False)  # the handoff gate's desk: every channel's turns pass it
    chatwoot: ChatwootApi | None = field(init=False)  # Chatwoot's REST API, when the settings name an installation

    def __post_init__(self) -> None:
        s = self.settings
        recall = TurnRecall(s, self.personas, memory=lambda: self.memory, faq=lambda: self.faq,
                            count_tokens=self.backend.count_tokens, owed=self.store.owes_memory)
        # The registry reader: a promotion or rollback reaches running channels within a second.
        selector = AdapterSelector(s, make_ref=AdapterRef)
        self.chatwoot = ChatwootApi(s.chatwoot_base_url, reveal(s.chatwoot_bot_token)) \
            if s.chatwoot_base_url and s.chatwoot_bot_token else None
        listeners = list(self.listeners)
        # the integrations' webhook: handoff events, and the console's agent replies (bot/http/console/delivery.py)
        self.webhook = WebhookNotifier(s.handoff_webhook_url, reveal(s.handoff_webhook_secret)) \
            if s.handoff_webhook_url else None
        if self.webhook is not None:
            listeners.append(self.webhook)
        if self.chatwoot is not None:
            listeners.append(ChatwootNotes(self.chatwoot))
        self.desk = HandoffDesk(self.store, system_prompt=s.system_prompt, after_negative=s.handoff_after_negative_ratings,
                                listeners=listeners)
        self.manager = DialogueManager(s, self.backend, self.store, recall=recall, after_turn=[recall.remember],
                                       learn=recall.learn, adapter_for=selector.adapter_for, desk=self.desk)
        self.closers.append(self.manager.close)  # closed first: no lease renewed on a closed store

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
    def memory(self) -> MemoryStore:
        """Per-user long-term memory."""
        store = MemoryStore(self.chroma.client, self.embedder, shared=self.settings.chroma_url is not None)
        self.closers.append(store.close)  # an owed compaction of the embedded store, before its lock is let go
        return store

    @cached_property
    def faq(self) -> FaqIndex:
        """The business FAQ."""
        return FaqIndex(self.chroma.client, self.embedder, fit_dir=self.settings.home / "faq_fit",
                        fit_config=FitConfig(encoder=self.settings.faq_encoder))

    @cached_property
    def integrations(self) -> IntegrationStore:
        """The API's integrations and their hashed keys."""
        return IntegrationStore(self.store)

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

    def history_file(self, user_id: str) -> Path:
        """The user's REPL input history (one file per user, erased with them)."""
        return self.settings.home / "history" / hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]

    def erase_user(self, user_id: str) -> dict[str, int]:
        """Erase every record about a user (memories, persona, transcripts, ratings, files); returns counts by
        kind. One resumable job: the tombstone first (their messages refused, turns in flight not recorded),
        then vectors, files and rows; a failure half-way is finished by `resume_erasures`."""
        self.store.tombstone(user_id)
        return self._erase(user_id)

    def resume_erasures(self) -> list[str]:
        """Finish the erasures a failure or a crash left half done; returns whose."""
        users = self.store.unfinished_erasures()
        for user_id in users:
            self._erase(user_id)
        return users

    async def tidy(self) -> None:
        """A serving process's round of repairs, every lease period: erasures a failure left half done are
        finished, memory writes that recorded turns still owe are retried (`DialogueManager.flush_outbox`)."""
        if await asyncio.to_thread(self.resume_erasures):
            logger.info("finished erasures a failure had left half done")
        flushed = await self.manager.flush_outbox()
        if any(flushed.values()):
            logger.info("memory outbox: %s", flushed)

    def _erase(self, user_id: str) -> dict[str, int]:
        counts = {"memories": self.memory.delete_user(user_id)}
        self.memory.finish_compaction()  # an erasure is final on disk at once (a forget may wait COMPACT_INTERVAL_S)
        history = self.history_file(user_id)
        counts["files"] = int(history.exists())
        history.unlink(missing_ok=True)
        counts.update(self.store.delete_user(user_id))
        # lineage: versions trained on their turns can no longer be promoted
        counts["adapter_versions_flagged"] = len(flag_user_erased(self.settings.adapters_dir, user_id, self.store))
        self.store.erasure_done(user_id)
        return counts

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                logger.exception("closing %s failed", close)


def open_backend(settings: Settings, *, eager: bool = True) -> Backend:
    """The configured backend; `eager` starts loading the model now instead of at the first request."""
    if settings.backend == "openai":
        from dialogue.model.openai_backend import OpenAIBackend

        return OpenAIBackend(settings)
    return LocalBackend(settings, eager=eager)


def open_services(settings: Settings | None = None, *, backend: Backend | None = None, load_model: bool = True,
                  listeners: list[Listener] | None = None) -> Services:
    """Everything a channel needs; with `load_model` the model starts loading in the background at once,
    otherwise at its first use (commands that only touch the stores never pay for it). `listeners` are told of
    each handoff besides the webhook and Chatwoot that the settings name."""
    settings = settings or Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    # the REPL history earlier versions shared between users (now per user, `history_file`): it holds erased
    # users' input, so it goes
    (settings.home / "repl_history").unlink(missing_ok=True)
    store = TranscriptStore(settings.db_url)
    backend = backend or open_backend(settings, eager=load_model)
    return Services(settings=settings, backend=backend, store=store, closers=[store.close, backend.close],
                    listeners=list(listeners or []))
