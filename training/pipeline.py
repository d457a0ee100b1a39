"""The learning loop's steps end to end: dataset → cleaning → LoRA (optionally chosen by a search) → registry →
gate; and re-evaluating a version."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dialogue.settings import Settings
from dialogue.store import TranscriptStore
from training.clean import CleanConfig, clean_dataset
from training.datasets import Dataset, build_dataset, lineage_salt
from training.gate import GateConfig, run_gate
from training.registry import AdapterVersion, Registry, now
from training.search import SearchConfig, choose_config
from training.train import TrainConfig, library_versions, train_adapter, write_meta

logger = logging.getLogger(__name__)


def dataset_for(settings: Settings, store: TranscriptStore, faq_entries: Iterable[Any] = ()) -> Dataset:
    """Everything rated so far, minus every user erased since (their hashes stay in the registry)."""
    erased = set(Registry(settings.adapters_dir).state().erased_user_hashes)
    return build_dataset(store, system=settings.system_prompt, faq_entries=list(faq_entries),
                         exclude_user_hashes=erased, max_per_user=settings.train_max_examples_per_user,
                         salt=lineage_salt(settings.adapters_dir))


def baseline_of(registry: Registry, exclude: str | None = None) -> tuple[str, Path] | None:
    state = registry.state()
    if state.active and state.active != exclude:
        active = state.versions[state.active]
        return active.version, Path(active.path)
    return None


def train_version(settings: Settings, store: TranscriptStore, *, faq_entries: Iterable[Any] = (),
                  config: TrainConfig | None = None, gate_config: GateConfig | None = None,
                  exclude_deleted: bool = False, show_progress: bool = True, clean: CleanConfig | None = CleanConfig(),
                  search: SearchConfig | None = None) -> dict[str, Any]:
    """Train a candidate on the current data, register it, gate it; returns `train --json`'s document.

    `clean=None` trains on the raw pool (for measuring what the gate alone catches); with `search`, the grid's
    trials choose learning rate, epochs and the disliked weight, unless the pool already fails the data check.
    """
    config = config or TrainConfig()
    gate_config = gate_config or GateConfig()
    registry = Registry(settings.adapters_dir)
    dataset = dataset_for(settings, store, faq_entries)
    started = time.perf_counter()
    if clean is not None:
        raw = len(dataset.train)
        dataset = clean_dataset(settings, dataset, clean)
        if raw and not dataset.train:
            from memory.errors import InvalidInput

            raise InvalidInput(f"cleaning dropped every training example: {dataset.cleaning['reasons']}")
    clean_s = time.perf_counter() - started
    state = registry.state()
    replaces = sorted(k for k, v in state.versions.items() if "erased_user" in v.flags) if exclude_deleted else []
    parent = state.active
    started = time.perf_counter()
    searched = None
    pool_ok = dataset.cleaning is None or dataset.cleaning["dropped_share"] <= gate_config.max_drop_share
    if search is not None and pool_ok:
        result, searched = choose_config(settings, dataset, config, search, gate_config)
        config = result.config
    else:
        result = train_adapter(settings, dataset, config, show_progress=show_progress)
    train_s = time.perf_counter() - started
    write_meta(result.path, {
        "config": asdict(config), "base_model": settings.model or "embedded:smollm2-135m-instruct",
        "dataset_hash": dataset.hash, "lineage": dataset.lineage(), "parent": parent,
        "libraries": library_versions(), "metrics": result.metrics, "replaces_erased": replaces,
        "search": searched, "trained_at": now(),
    })
    # Registered before the gate runs: a crash in between leaves a candidate without a gate record, which
    # `promote` refuses until `adapters eval` has gated it.
    version = registry.claim(result.path, parent=parent, dataset_hash=dataset.hash, metrics=result.metrics)
    started = time.perf_counter()
    gate, metrics = run_gate(settings, dataset, Path(version.path), baseline_of(registry), gate_config)
    gate_s = time.perf_counter() - started
    metrics = {**metrics, "clean_s": round(clean_s, 1), "train_s": round(train_s, 1), "gate_s": round(gate_s, 1),
               "tokens_per_s": result.metrics["tokens_per_s"], "train_tokens": result.metrics["train_tokens"],
               "examples": result.metrics["examples"], "heldout": len(dataset.heldout),
               "loss_last": result.metrics["loss_last"], "learning_rate": config.learning_rate,
               "epochs": config.epochs, "undesirable_weight": config.undesirable_weight}
    if searched:
        metrics["search"] = searched
    if dataset.cleaning is not None:
        metrics["cleaning"] = {k: dataset.cleaning[k] for k in ("scored", "dropped", "downweighted", "dropped_share",
                                                                "reasons")}
    version = registry.record_gate(version.version, gate, metrics)
    logger.info("%s: gate %s", version.name, "passed" if gate["passed"] else "failed")
    return {"version": version.version, "name": version.name, "status": version.status, "dataset_hash": dataset.hash,
            "counts": dataset.counts(), "gate": gate, "metrics": version.metrics}


def evaluate_version(settings: Settings, store: TranscriptStore, version: str, *, faq_entries: Iterable[Any] = (),
                     gate_config: GateConfig | None = None) -> dict[str, Any]:
    """Re-run the gate for `version` against what is served now (or the base model) on today's held-out data."""
    registry = Registry(settings.adapters_dir, store)
    item: AdapterVersion = registry.get(version)
    dataset = clean_dataset(settings, dataset_for(settings, store, faq_entries))
    gate, metrics = run_gate(settings, dataset, Path(item.path), baseline_of(registry, exclude=item.version),
                             gate_config or GateConfig())
    if item.status == "candidate":
        registry.record_gate(item.version, gate, metrics)
    return {"version": item.version, "name": item.name, "status": registry.get(item.version).status, "gate": gate,
            "metrics": metrics}
