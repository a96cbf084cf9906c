"""Prometheus metrics, in their own registry (so tests can make several apps).

Where vLLM has a metric for the same thing, its name and ``model_name`` label are used, so dashboards and
autoscaling rules written for vLLM work unchanged: ``vllm:e2e_request_latency_seconds``,
``vllm:time_to_first_token_seconds``, ``vllm:time_per_output_token_seconds``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``, ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:request_success_total``. Ours: ``fto_server_requests_total`` (route, status code),
``fto_server_request_duration_seconds``, ``fto_server_model_ready``, ``fto_server_quality_gate_passed``,
``fto_server_quality_drop`` and ``fto_server_quality_metric`` (step, metric), ``fto_server_model_size_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        m = ["model_name"]
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", m, registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in a running batch.", m, registry=r)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests admitted and waiting for a batch.", m, registry=r
        )
        self.success = Counter(
            "vllm:request_success", "Finished requests by finish reason.", [*m, "finished_reason"], registry=r
        )
        self.requests = Counter(
            "fto_server_requests_total",
            "HTTP requests by route and status code.",
            ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "fto_server_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_ready = Gauge(
            "fto_server_model_ready", "1 when the model is loaded and passed its gate.", registry=r
        )
        self.gate_passed = Gauge(
            "fto_server_quality_gate_passed",
            "1 when every compression step passed, 0 when one failed.",
            ["step"],
            registry=r,
        )
        self.quality_drop = Gauge(
            "fto_server_quality_drop", "Measured relative quality drop.", ["step", "metric"], registry=r
        )
        self.quality_metric = Gauge(
            "fto_server_quality_metric",
            "Measured quality metric after each step.",
            ["step", "metric"],
            registry=r,
        )
        self.size_bytes = Gauge(
            "fto_server_model_size_bytes", "Size of the served weights.", ["stage"], registry=r
        )
