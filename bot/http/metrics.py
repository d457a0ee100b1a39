"""Prometheus metrics of one API process, in a registry of its own (two apps in one process never clash)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
# The `channel` label takes these values only: clients name the channel, and each new name would be new series.
CHANNELS = ("api", "openai", "chatwoot", "telegram", "repl")


class ApiMetrics:
    """Turns, latencies, tokens, queue depth, ratings, handoffs and HTTP requests."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, handoffs: Mapping[str, int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.turns = Counter("rapport_turns", "turns answered", ["channel", "finish_reason"], registry=r)
        self.turn_seconds = Histogram("rapport_turn_seconds", "whole turn, request to last token", ["channel"],
                                      buckets=LATENCY_BUCKETS, registry=r)
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

    def observe_turn(self, reply, channel: str, seconds: float, ttft_s: float | None) -> None:
        """Count one finished (or cut short) reply."""
        channel = channel if channel in CHANNELS else "other"
        self.turns.labels(channel, reply.finish_reason or "stop").inc()
        self.turn_seconds.labels(channel).observe(seconds)
        if ttft_s is not None:
            self.ttft_seconds.observe(ttft_s)
        usage = reply.usage
        self.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
        self.tokens.labels("completion").inc(usage.get("completion_tokens", 0))

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
