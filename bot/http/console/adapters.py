"""Adapters (versions with gate metrics, dataset size, lineage and flags; promote, A/B share, rollback; the training
report drawn in the page), the running experiment with its decision and the past ones, and feedback (ratings and
corrections, approved into or kept out of the training data)."""

from __future__ import annotations

import asyncio
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import RedirectResponse
from markupsafe import Markup, escape

from bot.http.console.access import ConsoleSession, checked_form, current_session
from bot.http.console.render import render
from bot.http.deps import ServicesDep
from dialogue.errors import InvalidInput, RapportError
from training.experiment import RULE, current_experiment
from training.registry import Registry
from training.store import TrainingStore
from training.report import BASE, rating_rates

router = APIRouter()
SessionDep = Annotated[ConsoleSession, Depends(current_session)]
Version = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
COLORS = {"active": "#2a9d5b", "candidate": "#2f6fd6", "retired": "#9aa3ad", "rejected": "#c8442a", BASE: "#a59a3a"}
PANELS = (("canary perplexity (lower is better)", "canary_ppl"), ("held-out preference margin", "pref_margin"),
          ("FAQ grounding accuracy", "faq_accuracy"), ("like rate of rated replies", "like_rate"))
BASELINE = {"canary_ppl": ("canary", "baseline_ppl"), "pref_margin": ("preference", "baseline_margin"),
            "faq_accuracy": ("faq", "baseline_accuracy")}  # where a gate run against the base model keeps its figure


def go(url: str, **message: str) -> RedirectResponse:
    return RedirectResponse(url + (f"?{urlencode(message)}" if message else ""), status_code=303)


def registry_of(services) -> Registry:
    return Registry(services.settings.adapters_dir, services.store)


def bar_chart(title: str, bars: list[tuple[str, float | None, str]], *, width: int = 360, height: int = 180) -> Markup:
    """A small SVG bar chart: (label, value or None, colour) per bar, scaled to the largest value."""
    top = max((v for _, v, _ in bars if v is not None), default=0.0) or 1.0
    slot = (width - 20) / max(len(bars), 1)
    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><text x="10" y="16" font-size="12">{escape(title)}</text>']
    for i, (label, value, colour) in enumerate(bars):
        x = 10 + i * slot
        h = 0 if value is None else (height - 60) * value / top
        parts.append(f'<rect x="{x + 4:.1f}" y="{height - 30 - h:.1f}" width="{slot - 8:.1f}" height="{h:.1f}" '
                     f'fill="{colour}"><title>{escape(label)}: {escape(value)}</title></rect>')
        shown = "–" if value is None else f"{value:.3g}"
        parts.append(f'<text x="{x + slot / 2:.1f}" y="{height - 34 - h:.1f}" font-size="10" text-anchor="middle">'
                     f'{escape(shown)}</text><text x="{x + slot / 2:.1f}" y="{height - 14}" font-size="10" '
                     f'text-anchor="middle">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def lineage(state, version: str) -> list[str]:
    """The version and its ancestors, newest first (the parent each was trained from)."""
    chain, seen = [], set()
    item = state.versions.get(version)
    while item is not None and item.version not in seen:
        seen.add(item.version)
        chain.append(item.version)
        item = state.versions.get(item.parent) if item.parent else None
    return chain


def adapters_view(services) -> dict:
    state = registry_of(services).state()
    versions = sorted(state.versions.values(), key=lambda v: v.version)
    rates = rating_rates(services.store)
    base_checks = next((v.gate.get("checks", {}) for v in versions if v.gate.get("baseline") == BASE), {})
    charts = []
    for title, key in PANELS:
        if key == "like_rate":
            base_value = rates.get(BASE, {}).get("like_rate")
        else:
            part, name = BASELINE[key]
            base_value = base_checks.get(part, {}).get(name)
        bars = [(BASE, base_value if isinstance(base_value, int | float) else None, COLORS[BASE])]
        for v in versions:
            value = rates.get(v.version, {}).get("like_rate") if key == "like_rate" else v.metrics.get(key)
            bars.append((v.version, value if isinstance(value, int | float) else None, COLORS.get(v.status, "#2f6fd6")))
        charts.append(bar_chart(title, bars))
    rows = [{"item": v, "share": state.share_of(v.version), "lineage": lineage(state, v.version)[1:],
             "rates": rates.get(v.version, {})} for v in reversed(versions)]
    return {"rows": rows, "charts": charts, "state": state, "base_rates": rates.get(BASE, {})}


@router.get("/adapters")
async def adapters_page(request: Request, session: SessionDep, services: ServicesDep):
    view = await asyncio.to_thread(adapters_view, services)
    q = request.query_params
    return render(request, session, "adapters.html", active="adapters", **view, notice=q.get("notice"),
                  problem=q.get("problem"))


def share_of_form(raw: str) -> float | None:
    if not raw.strip():
        return None
    try:
        share = float(raw) / 100 if float(raw) > 1 else float(raw)
    except ValueError:
        raise InvalidInput("the share is a fraction (0.2) or a percentage (20)") from None
    return None if share >= 1 else share


@router.post("/adapters/{version}/promote")
async def promote(request: Request, version: Version, session: SessionDep, services: ServicesDep):
    """Serve the version to everyone, or (with a share) to that sticky fraction of users: an A/B split."""
    form = await checked_form(request, session)
    back = form.get("back") if form.get("back") in ("/admin/adapters", "/admin/experiments") else "/admin/adapters"
    try:
        share = share_of_form(form.get("share", ""))
        item = await asyncio.to_thread(registry_of(services).promote, version, share)
    except RapportError as exc:
        return go(back, problem=str(exc))
    what = f"{item.version} now serves {share:.0%} of users (A/B)" if share else f"{item.version} is active"
    return go(back, notice=what + "; running processes switch within a second.")


@router.post("/adapters/rollback")
async def rollback(request: Request, session: SessionDep, services: ServicesDep):
    """End the A/B split, or else go back to the previous active version."""
    form = await checked_form(request, session)
    back = form.get("back") if form.get("back") in ("/admin/adapters", "/admin/experiments") else "/admin/adapters"
    try:
        result = await asyncio.to_thread(registry_of(services).rollback, ended="stopped")
    except RapportError as exc:
        return go(back, problem=str(exc))
    if "ended_ab" in result:
        serving = result["active"] or "base"
        return go(back, notice=f"Stopped the A/B split of {result['ended_ab']}; {serving} serves everyone.")
    return go(back, notice=f"Rolled back: {result['retired']} retired, {result['active'] or 'base'} active.")


@router.get("/experiments")
async def experiments_page(request: Request, session: SessionDep, services: ServicesDep):
    report = await asyncio.to_thread(current_experiment, registry_of(services), services.store)
    q = request.query_params
    return render(request, session, "experiments.html", active="experiments", report=report, rule=RULE,
                  notice=q.get("notice"), problem=q.get("problem"))


@router.get("/feedback")
async def feedback_page(request: Request, session: SessionDep, services: ServicesDep, only: str = ""):
    rows = await asyncio.to_thread(services.store.recent_feedback, limit=300)
    if only == "corrections":
        rows = [(r, t) for r, t in rows if r.correction]
    q = request.query_params
    return render(request, session, "feedback.html", active="feedback", rows=rows, only=only,
                  notice=q.get("notice"), problem=q.get("problem"))


REVIEWED = {("correction", "approve"): "approved: the next training run learns from it",
            ("correction", "keep_out"): "kept out: the correction teaches no training run",
            ("correction", "undo"): "undone: the correction waits for review again",
            ("rating", "keep_out"): "kept out: the rating teaches no training run",
            ("rating", "undo"): "undone: the rating counts for training again"}


@router.post("/feedback/{turn_id}/{decision}")
async def review_feedback(request: Request, turn_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
                          decision: Annotated[str, Path(pattern=r"^(approve|keep-out|undo)$")],
                          session: SessionDep, services: ServicesDep):
    """Approve a user's correction into the training data (until then it teaches nothing), keep a rating or a
    correction out of it, or undo either."""
    form = await checked_form(request, session)
    part, decision = form.get("part", "correction"), decision.replace("-", "_")
    back = {"only": "corrections"} if form.get("only") == "corrections" else {}
    try:
        done = await asyncio.to_thread(TrainingStore(services.store).review, turn_id, part, decision)
    except RapportError as exc:
        return go("/admin/feedback", **back, problem=str(exc))
    if not done:
        return go("/admin/feedback", **back, problem=f"turn {turn_id} has no {part}")
    return go("/admin/feedback", **back, notice=REVIEWED[part, decision])
