"""What one server pod has counted so far, read from its Prometheus text (`/metrics`). Pure.

The servers' counters are cumulative since the pod started; an analysis window is the difference of two
readings (`window`). Both runtimes are read alike: vLLM's OpenAI server exports
prometheus-fastapi-instrumentator's `http_requests_total{handler,status}` and
`http_request_duration_seconds`; `finetune_server` exports `fto_server_requests_total{route,code}` and
`fto_server_request_duration_seconds`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUEST_COUNTERS = ("http_requests_total", "fto_server_requests_total")
"""Counters of answered requests, in order of preference (a server exporting both is read through the
first); label `status` or `code` is the code (`503`) or its class (`5xx`)."""
LATENCY_HISTOGRAMS = ("http_request_duration_seconds", "fto_server_request_duration_seconds")
"""Histograms of request latency, in the same order."""
ROUTE_LABELS = ("handler", "route")
"""The label naming the route, whichever the server uses."""
API_PREFIX = "/v1/"
"""Only API requests count: probes and scrapes (`/v2/health/*`, `/metrics`) say nothing of the model."""


@dataclass(frozen=True)
class PodCounters:
    """Cumulative counts of one pod's API requests."""

    requests: float = 0.0
    errors: float = 0.0
    """Requests answered with a 5xx status."""
    latency_buckets: tuple[tuple[float, float], ...] = ()
    """(upper bound in seconds, cumulative count) of the latency histogram, ascending, `+Inf` last."""


@dataclass(frozen=True)
class ServingSample:
    """One reading of a revision's pods: counters by pod name."""

    pods: Mapping[str, PodCounters] = field(default_factory=dict)


def _is_api(labels: Mapping[str, str]) -> bool:
    route = next((labels[name] for name in ROUTE_LABELS if name in labels), None)
    return route is None or route.startswith(API_PREFIX)


def _is_error(labels: Mapping[str, str]) -> bool:
    status = labels.get("status") or labels.get("code") or ""
    return status.startswith("5")


def parse_pod_metrics(text: str) -> PodCounters:
    """The API request counters in one pod's exposition text. Unknown metrics are ignored; a malformed
    exposition raises `ValueError` (the reading is then missing, never zero)."""
    requests: dict[str, list[float]] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not _is_api(sample.labels):
                continue
            if sample.name in REQUEST_COUNTERS:
                requests.setdefault(sample.name, []).append(sample.value)
                if _is_error(sample.labels):
                    errors[sample.name] = errors.get(sample.name, 0.0) + sample.value
            elif sample.name.removesuffix("_bucket") in LATENCY_HISTOGRAMS and sample.name.endswith(
                "_bucket"
            ):
                per_bound = buckets.setdefault(sample.name.removesuffix("_bucket"), {})
                bound = float(sample.labels["le"])
                per_bound[bound] = per_bound.get(bound, 0.0) + sample.value
    counter = next((name for name in REQUEST_COUNTERS if name in requests), None)
    histogram = next((name for name in LATENCY_HISTOGRAMS if name in buckets), None)
    return PodCounters(
        requests=sum(requests[counter]) if counter else 0.0,
        errors=errors.get(counter, 0.0) if counter else 0.0,
        latency_buckets=tuple(sorted(buckets[histogram].items())) if histogram else (),
    )


def subtract(now: PodCounters, before: PodCounters | None) -> PodCounters:
    """Counts between two readings of one pod. A pod that wasn't there before, or whose counters went
    down (it restarted), counts from zero: everything it has counted happened inside the window."""
    if before is None or now.requests < before.requests or now.errors < before.errors:
        return now
    old = dict(before.latency_buckets)
    if any(count < old.get(bound, 0.0) for bound, count in now.latency_buckets):
        return now
    return PodCounters(
        requests=now.requests - before.requests,
        errors=now.errors - before.errors,
        latency_buckets=tuple((b, c - old.get(b, 0.0)) for b, c in now.latency_buckets),
    )


def total(counters: Iterable[PodCounters]) -> PodCounters:
    """The counts of several pods together (histograms with the same bounds add up bucket by bucket)."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for item in counters:
        requests += item.requests
        errors += item.errors
        for bound, count in item.latency_buckets:
            buckets[bound] = buckets.get(bound, 0.0) + count
    return PodCounters(requests, errors, tuple(sorted(buckets.items())))


def window(now: ServingSample, before: ServingSample | None) -> PodCounters:
    """A revision's counts between two readings; pods gone since `before` took their counts with them
    (a lost pod's last requests are missing, so a window can only undercount, making it inconclusive
    longer, never pass sooner)."""
    base = before.pods if before else {}
    return total(subtract(counters, base.get(pod)) for pod, counters in now.pods.items())


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated inside its bucket as Prometheus'
    `histogram_quantile` does (so pods' own metrics and a Prometheus query give the same figure); the
    highest finite bound when it falls in `+Inf`; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    count = buckets[-1][1]
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower_bound
            if cumulative == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (cumulative - lower_count)
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def certainly_above(threshold: float, buckets: tuple[tuple[float, float], ...]) -> float:
    """Observations certainly above `threshold`: those beyond the first bucket bound at or above it (the
    bucket that straddles the threshold may hold either kind)."""
    if not buckets:
        return 0.0
    count = buckets[-1][1]
    at_or_below = next((cumulative for bound, cumulative in buckets if bound >= threshold), count)
    return max(0.0, count - at_or_below)
