"""Prometheus metrics of one API process, in a registry of its own (two apps in one process never clash)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
CHANNELS = frozenset({"api", "openai", "telegram", "chatwoot", "repl"})  # any other channel name counts as "other"
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "interrupted", "error", "handoff", "agent",
                            "agent_untrusted"})
MAX_ADAPTER_LABELS = 32  # distinct adapter versions counted by name per process; later ones count as "other"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class BoundedLabel:
    """Label values from a fixed set, or the first `limit` distinct names that look right; the rest are "other"."""

    def __init__(self, known: frozenset[str] = frozenset(), limit: int = 0) -> None:
        self.known, self.limit, self.seen = known, limit, set()

    def __call__(self, value: str | None, *, none: str = "base") -> str:
        if not value:
            return none
        if value in self.known or value in self.seen:
            return value
        if len(self.seen) < self.limit and ADAPTER_NAME.match(value):
            self.seen.add(value)
            return value
        return "other"


class ApiMetrics:
    """Turns, latencies, tokens, queue depth, ratings, handoffs and HTTP requests."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, handoffs: Mapping[str, int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.channel_label, self.finish_label = BoundedLabel(CHANNELS), BoundedLabel(FINISH_REASONS)
        self.adapter_label = BoundedLabel(limit=MAX_ADAPTER_LABELS)
        self.turns = Counter("rapport_turns", "turns the bot answered, every channel",
                             ["channel", "finish_reason", "adapter_version"], registry=r)
        self.turn_seconds = Histogram("rapport_turn_seconds", "whole turn, first step to last token",
                                      ["channel", "adapter_version"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("rapport_ttft_seconds", "time to the first token", buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.tokens = Counter("rapport_tokens", "model tokens", ["kind"], registry=r)  # prompt | completion
        self.ratings = Counter("rapport_ratings", "ratings received", ["rating"], registry=r)
        r.register(HandoffCounts(handoffs if handoffs is not None else {}))
        self.requests = Counter("rapport_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("rapport_http_request_seconds", "HTTP request duration", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("rapport_queue_depth", "generations queued or running in the model worker",
                                 registry=r)
        self.queue_depth.set_function(queue_depth)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_turn(self, turn) -> None:
        """Count one recorded reply (a `dialogue.store.Turn`): the dialogue manager calls this for every channel."""
        channel, version = self.channel_label(turn.channel, none="other"), self.adapter_label(turn.adapter_version)
        self.turns.labels(channel, self.finish_label(turn.finish_reason, none="stop"), version).inc()
        self.turn_seconds.labels(channel, version).observe(turn.latency_ms / 1000)
        if turn.ttft_ms is not None:
            self.ttft_seconds.observe(turn.ttft_ms / 1000)
        self.tokens.labels("prompt").inc(turn.prompt_tokens or 0)
        self.tokens.labels("completion").inc(turn.completion_tokens or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HandoffCounts:
    """`rapport_handoffs_total{reason}`, read from the handoff desk's own counts when scraped."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = counts

    def collect(self):
        family = CounterMetricFamily("rapport_handoffs", "conversations handed to a human", labels=["reason"])
        for reason, count in sorted(self.counts.items()):
            family.add_metric([reason], count)
        yield family
