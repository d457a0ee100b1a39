"""Monitoring: turns per minute, latency p95, thumbs-up and handoff rates over time per adapter version, from the stored
turns (so history survives restarts), drawn as SVG in the page; and the scheduled retraining runs with their verdicts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from markupsafe import Markup, escape

from bot.http.console.access import ConsoleSession, current_session
from bot.http.console.render import render
from bot.http.deps import ServicesDep
from dialogue.store import ActivityBucket
from training.report import BASE
from training.schedule import Schedule, read_runs

router = APIRouter()
SessionDep = Annotated[ConsoleSession, Depends(current_session)]
WINDOWS = {"1h": (timedelta(hours=1), 60), "24h": (timedelta(hours=24), 900), "7d": (timedelta(days=7), 3 * 3600)}
PALETTE = ("#a59a3a", "#2f6fd6", "#2a9d5b", "#c8442a", "#7b4bb7", "#d08a1e", "#1c9aa6", "#9aa3ad")
PANELS = (("turns per minute", "turns_per_min", "{:.2g}"), ("latency p95 (ms)", "p95_ms", "{:.0f}"),
          ("thumbs-up rate of rated replies", "up_rate", "{:.0%}"), ("handoff rate", "handoff_rate", "{:.0%}"))


def point(bucket: ActivityBucket, bucket_s: int) -> dict[str, float | None]:
    """One bucket's figures (None where there is nothing to divide)."""
    rated = bucket.up + bucket.down
    return {"turns_per_min": bucket.turns / (bucket_s / 60), "p95_ms": bucket.latency_p95_ms,
            "up_rate": bucket.up / rated if rated else None, "handoff_rate": bucket.handoffs / bucket.turns}


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], colours: dict[str, str], *, x0: float,
               x1: float, shown: str, width: int = 560, height: int = 200) -> Markup:
    """An SVG line chart: per label a list of (x, y), x in [x0, x1] (epoch seconds), y from 0 to the largest value."""
    left, right, top, bottom = 44, 10, 24, 34
    values = [y for points in series.values() for _, y in points]
    y_top = max(values, default=0.0) or 1.0
    span = (x1 - x0) or 1.0

    def xy(x: float, y: float) -> str:
        return (f"{left + (width - left - right) * (x - x0) / span:.1f},"
                f"{height - bottom - (height - top - bottom) * y / y_top:.1f}")

    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><text x="10" y="16" font-size="12">{escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#ccc"/>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{escape(shown.format(y_top))}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" font-size="10" text-anchor="end">0</text>']
    for x, anchor in ((x0, "start"), (x1, "end")):
        label = datetime.fromtimestamp(x, UTC).strftime("%m-%d %H:%M")
        parts.append(f'<text x="{xy(x, 0).split(",")[0]}" y="{height - bottom + 14}" font-size="10" '
                     f'text-anchor="{anchor}">{label}</text>')
    for n, (label, points) in enumerate(series.items()):
        colour = colours[label]
        if len(points) > 1:
            parts.append(f'<polyline class="series" data-version="{escape(label)}" fill="none" stroke="{colour}" '
                         f'stroke-width="1.5" points="{" ".join(xy(x, y) for x, y in points)}"/>')
        for x, y in points:
            cx, cy = xy(x, y).split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"><title>{escape(label)} '
                         f'{datetime.fromtimestamp(x, UTC):%H:%M}: {escape(shown.format(y))}</title></circle>')
        parts.append(f'<rect x="{left + 90 * n}" y="{height - 12}" width="8" height="8" fill="{colour}"/>'
                     f'<text x="{left + 12 + 90 * n}" y="{height - 4}" font-size="10">{escape(label)}</text>')
    if not values:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" font-size="11" text-anchor="middle">no turns</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def monitoring_view(services, window: str, now: datetime | None = None) -> dict:
    span, bucket_s = WINDOWS[window]
    now = now or datetime.now(UTC)
    start = (now - span).timestamp() // bucket_s * bucket_s  # buckets on round times, the same on every reload
    since = datetime.fromtimestamp(start, UTC)
    buckets = services.store.activity(since=since, bucket_s=bucket_s)
    versions = sorted({b.version for b in buckets})
    labels = {v: v or BASE for v in versions}
    colours = {labels[v]: PALETTE[i % len(PALETTE)] for i, v in enumerate(versions)}
    x1 = now.timestamp()
    charts = []
    for title, key, shown in PANELS:
        found: dict[str, dict[float, float]] = {labels[v]: {} for v in versions}
        for b in buckets:
            value = point(b, bucket_s)[key]
            if value is not None:
                found[labels[b.version]][b.start.timestamp()] = float(value)
        if key == "turns_per_min":  # a bucket without turns is a rate of 0; the other figures have none there
            slots = [start + i * bucket_s for i in range(int((x1 - start) // bucket_s) + 1)]
            found = {label: {x: got.get(x, 0.0) for x in slots} for label, got in found.items()}
        series = {label: [(x + bucket_s / 2, y) for x, y in sorted(got.items())] for label, got in found.items()}
        charts.append(line_chart(title, series, colours, x0=start, x1=x1, shown=shown))
    totals = []
    for v in versions:
        mine = [b for b in buckets if b.version == v]
        turns, handoffs = sum(b.turns for b in mine), sum(b.handoffs for b in mine)
        up, down = sum(b.up for b in mine), sum(b.down for b in mine)
        p95s = [b.latency_p95_ms for b in mine if b.latency_p95_ms is not None]
        totals.append({"version": labels[v], "turns": turns, "per_min": turns / (span.total_seconds() / 60),
                       "up_rate": up / (up + down) if up + down else None, "rated": up + down,
                       "handoff_rate": handoffs / turns if turns else None, "worst_p95": max(p95s, default=None)})
    settings = services.settings
    return {"charts": charts, "totals": totals, "window": window, "windows": list(WINDOWS), "bucket_s": bucket_s,
            "since": since, "schedule": Schedule.of(settings).describe(),
            "runs": list(reversed(read_runs(settings.adapters_dir)))}


@router.get("/monitoring")
async def monitoring_page(request: Request, session: SessionDep, services: ServicesDep, window: str = "24h"):
    window = window if window in WINDOWS else "24h"
    view = await asyncio.to_thread(monitoring_view, services, window)
    return render(request, session, "monitoring.html", active="monitoring", **view)
