"""Prometheus metrics of the server, in their own registry (so tests can make several apps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "fto_server_requests_total",
            "HTTP requests by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fto_server_request_duration_seconds",
            "Request latency by route.",
            ["route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "fto_server_completion_tokens_total", "Tokens generated.", registry=self.registry
        )
        self.model_ready = Gauge(
            "fto_server_model_ready", "1 when the model is loaded.", registry=self.registry
        )
