"""What routes are handed, as FastAPI dependencies: the process's services and the stores in them.

`create_app` keeps the services on `app.state`; this module is the one place that reads them from there, so a
route names what it uses (`store: StoreDep`) and a test can override any of it (`app.dependency_overrides`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from bot.http.metrics import ApiMetrics
from bot.services import Services
from dialogue.handoff import HandoffDesk
from dialogue.manager import DialogueManager
from dialogue.model.backend import Backend
from dialogue.store import TranscriptStore
from memory.faq import FaqIndex
from memory.memories import MemoryStore
from memory.persona import PersonaStore
from training.registry import Registry


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


ServicesDep = Annotated[Services, Depends(get_services)]


def get_manager(services: ServicesDep) -> DialogueManager:
    return services.manager


def get_desk(services: ServicesDep) -> HandoffDesk:
    return services.desk


def get_store(services: ServicesDep) -> TranscriptStore:
    return services.store


def get_backend(services: ServicesDep) -> Backend:
    return services.backend


def get_personas(services: ServicesDep) -> PersonaStore:
    return services.personas


def get_memory(services: ServicesDep) -> MemoryStore:
    """Opens the Chroma-backed store on first use (a sync dependency: FastAPI runs it in a worker thread)."""
    return services.memory


def get_faq(services: ServicesDep) -> FaqIndex:
    return services.faq


def get_registry(services: ServicesDep) -> Registry:
    return Registry(services.settings.adapters_dir, services.store)


MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
ManagerDep = Annotated[DialogueManager, Depends(get_manager)]
DeskDep = Annotated[HandoffDesk, Depends(get_desk)]
StoreDep = Annotated[TranscriptStore, Depends(get_store)]
BackendDep = Annotated[Backend, Depends(get_backend)]
PersonasDep = Annotated[PersonaStore, Depends(get_personas)]
MemoryDep = Annotated[MemoryStore, Depends(get_memory)]
FaqDep = Annotated[FaqIndex, Depends(get_faq)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
