"""Rating rates per adapter version (from the transcript store) and `adapters report`'s PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dialogue.store import TranscriptStore
from training.registry import Registry
from training.store import TrainingStore

BASE = "base"


def version_of(adapter_name: str | None) -> str:
    """'v0003-1a2b3c4d' → 'v0003'; no adapter → 'base'."""
    return adapter_name.split("-", 1)[0] if adapter_name else BASE


def rating_rates(store: TranscriptStore) -> dict[str, dict[str, Any]]:
    """Per version: turns served, ratings up and down, and the share of rated turns that were liked."""
    rates: dict[str, dict[str, Any]] = {}
    for name, turns, rated, up in TrainingStore(store).rating_counts():
        entry = rates.setdefault(version_of(name), {"turns": 0, "rated": 0, "up": 0})
        entry["turns"] += turns
        entry["rated"] += rated
        entry["up"] += up
    for entry in rates.values():
        entry["down"] = entry["rated"] - entry["up"]
        entry["like_rate"] = round(entry["up"] / entry["rated"], 4) if entry["rated"] else None
    return rates


def write_report(registry: Registry, store: TranscriptStore, path: Path) -> dict[str, Any]:
    """A 2x2 PNG: canary perplexity, preference margin, FAQ accuracy and like rate across versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = sorted(registry.state().versions.values(), key=lambda v: v.version)
    rates = rating_rates(store)
    labels = [BASE] + [v.version for v in versions]
    colors = {"active": "tab:green", "candidate": "tab:blue", "retired": "tab:gray", "rejected": "tab:red"}
    bar_colors = ["tab:olive"] + [colors.get(v.status, "tab:blue") for v in versions]
    panels = [("canary perplexity (lower is better)", "canary_ppl"), ("held-out preference margin", "pref_margin"),
              ("FAQ grounding accuracy", "faq_accuracy")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, key) in zip(axes.flat, panels):
        values = [None] + [v.metrics.get(key) for v in versions]
        base_value = next((v.gate.get("checks", {}) for v in versions if v.gate.get("baseline") == BASE), {})
        values[0] = _baseline_metric(base_value, key)
        ax.bar(labels, [x if x is not None else 0 for x in values], color=bar_colors)
        ax.set_title(title)
    like = [rates.get(label, {}).get("like_rate") for label in labels]
    ax = axes.flat[3]
    ax.bar(labels, [x if x is not None else 0 for x in like], color=bar_colors)
    for i, label in enumerate(labels):
        rated = rates.get(label, {}).get("rated", 0)
        ax.annotate(f"n={rated}", (i, (like[i] or 0)), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title("like rate of rated replies (live turns)")
    for ax in axes.flat:
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle("Rapport adapter versions (green active, blue candidate, gray retired, red rejected)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"path": str(path), "versions": labels, "rating_rates": rates}


def _baseline_metric(checks: dict[str, Any], key: str) -> float | None:
    """The base model's figure, as recorded by a gate that compared against it."""
    source = {"canary_ppl": ("canary", "baseline_ppl"), "pref_margin": ("preference", "baseline_margin"),
              "faq_accuracy": ("faq", "baseline_accuracy")}[key]
    return checks.get(source[0], {}).get(source[1])
