"""Judging a canary's window: Pass, Fail or Inconclusive, with the figures and the reason in words. Pure.

Pass needs evidence: the thresholds hold over at least `minRequests`. Fewer requests are Inconclusive,
never a pass, with one exception the other way: a breach that more traffic can no longer undo is a Fail
at once. The error budget over `minRequests` is `maxErrorRate * minRequests` errors; once more errors
than that have been answered the canary has failed whatever comes next (likewise for requests slower than
`maxP95LatencyMs`, whose budget is 5 % of `minRequests`). So a canary that answers every request with an
error is rolled back after a handful of requests, not after `minRequests` of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_operator.rollout.samples import PodCounters, certainly_above, quantile

Verdict = Literal["Pass", "Fail", "Inconclusive"]

PASS: Verdict = "Pass"
FAIL: Verdict = "Fail"
INCONCLUSIVE: Verdict = "Inconclusive"

LATENCY_QUANTILE = 0.95

REASON_ERROR_RATE = "ErrorRateExceeded"
REASON_LATENCY = "LatencyExceeded"
REASON_TOO_FEW_REQUESTS = "TooFewRequests"
REASON_NOT_READY = "CanaryNotReady"
REASON_HOLDS = "ThresholdsHold"
REASON_NO_METRICS = "MetricsUnavailable"
REASON_SERVER_FAILED = "CanaryServerFailed"


@dataclass(frozen=True)
class Thresholds:
    """What the canary must hold (from `spec.rollout.canary.analysis`)."""

    min_requests: int
    max_error_rate: float
    max_p95_latency_ms: int | None = None


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str
    message: str
    requests: int
    errors: int
    error_rate: float | None
    p95_latency_ms: float | None


def _percent(value: float) -> str:
    return f"{value * 100:.1f} %"


def judge(
    canary: PodCounters | None,
    thresholds: Thresholds,
    *,
    ready_replicas: int = 1,
    replicas: int = 1,
    server_failure: str | None = None,
) -> Judgement:
    """The verdict on one window of the canary's counts (None: its metrics couldn't be read).
    `server_failure`: a canary server said it can't serve (its model failed to load or its quality gate):
    that is a Fail at once, whatever the traffic."""
    if server_failure is not None:
        return Judgement(
            FAIL, REASON_SERVER_FAILED, f"the canary's server failed: {server_failure}", 0, 0, None, None
        )
    if canary is None:
        return Judgement(
            INCONCLUSIVE, REASON_NO_METRICS, "the canary's metrics could not be read", 0, 0, None, None
        )
    requests, errors = int(canary.requests), int(canary.errors)
    rate = errors / requests if requests else None
    p95 = quantile(LATENCY_QUANTILE, canary.latency_buckets)
    p95_ms = None if p95 is None else p95 * 1000.0
    figures = f"{requests} requests, {errors} errors"
    if rate is not None:
        figures += f" ({_percent(rate)})"
    if p95_ms is not None:
        figures += f", p95 {p95_ms:.0f} ms"

    def result(verdict: Verdict, reason: str, message: str) -> Judgement:
        return Judgement(verdict, reason, message, requests, errors, rate, p95_ms)

    enough = requests >= thresholds.min_requests
    budget_base = max(requests, thresholds.min_requests)
    error_budget = thresholds.max_error_rate * budget_base
    if errors > error_budget:
        limit = _percent(thresholds.max_error_rate)
        over = "" if enough else f" (more than the {limit} of {thresholds.min_requests} requests allowed)"
        return result(FAIL, REASON_ERROR_RATE, f"{figures}: error rate above {limit}{over}")
    if thresholds.max_p95_latency_ms is not None:
        limit_s = thresholds.max_p95_latency_ms / 1000.0
        slow = certainly_above(limit_s, canary.latency_buckets)
        slow_budget = (1 - LATENCY_QUANTILE) * budget_base
        breached = p95_ms is not None and p95_ms > thresholds.max_p95_latency_ms
        if (enough and breached) or slow > slow_budget:
            return result(
                FAIL, REASON_LATENCY, f"{figures}: p95 latency above {thresholds.max_p95_latency_ms} ms"
            )
    if ready_replicas < 1:
        return result(
            INCONCLUSIVE,
            REASON_NOT_READY,
            f"{figures}; the canary has {ready_replicas} of {replicas} replicas ready",
        )
    if not enough:
        return result(
            INCONCLUSIVE,
            REASON_TOO_FEW_REQUESTS,
            f"{figures}; needs at least {thresholds.min_requests} requests to judge",
        )
    return result(PASS, REASON_HOLDS, f"{figures}: thresholds hold")
