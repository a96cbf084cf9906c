"""Canary analysis is pure: readings of the servers' counters, the verdict on a window, the next move and
the traffic split are checked here without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finetune_operator.rollout import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    CanaryPosition,
    Decision,
    PodCounters,
    ServingSample,
    Step,
    Thresholds,
    decide,
    judge,
    parse_pod_metrics,
    replica_split,
    route_split,
    window,
)
from finetune_operator.rollout.samples import certainly_above, quantile

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BOUNDS = (0.1, 0.5, 1.0, 2.5, float("inf"))

EXPOSITION = """\
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 90.0
http_requests_total{handler="/v1/completions",method="POST",status="5xx"} 4.0
http_requests_total{handler="/v1/completions",method="POST",status="4xx"} 6.0
http_requests_total{handler="/v2/health/ready",method="GET",status="2xx"} 500.0
http_requests_total{handler="/metrics",method="GET",status="2xx"} 40.0
# HELP http_request_duration_seconds Latency.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{handler="/v1/completions",le="0.1"} 10.0
http_request_duration_seconds_bucket{handler="/v1/completions",le="0.5"} 80.0
http_request_duration_seconds_bucket{handler="/v1/completions",le="1.0"} 95.0
http_request_duration_seconds_bucket{handler="/v1/completions",le="+Inf"} 100.0
http_request_duration_seconds_count{handler="/v1/completions"} 100.0
http_request_duration_seconds_sum{handler="/v1/completions"} 31.0
http_request_duration_seconds_bucket{handler="/v2/health/ready",le="0.1"} 500.0
http_request_duration_seconds_bucket{handler="/v2/health/ready",le="+Inf"} 500.0
# HELP vllm:num_requests_waiting Requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting 3.0
"""


def counters(requests: int, errors: int = 0, latencies: tuple[float, ...] = ()) -> PodCounters:
    """Counts with a histogram over BOUNDS holding `latencies` (seconds)."""
    cumulative = tuple((bound, float(sum(1 for value in latencies if value <= bound))) for bound in BOUNDS)
    return PodCounters(float(requests), float(errors), cumulative if latencies else ())


THRESHOLDS = Thresholds(min_requests=20, max_error_rate=0.05, max_p95_latency_ms=1000)


# --- samples ----------------------------------------------------------------------------------------------


def test_parse_counts_only_api_routes_and_5xx_as_errors() -> None:
    parsed = parse_pod_metrics(EXPOSITION)
    assert parsed.requests == 100
    assert parsed.errors == 4
    assert parsed.latency_buckets == ((0.1, 10.0), (0.5, 80.0), (1.0, 95.0), (float("inf"), 100.0))


def test_parse_refuses_a_malformed_exposition() -> None:
    with pytest.raises(ValueError, match="could not convert"):
        parse_pod_metrics('http_requests_total{status="2xx" 3\n')


def test_window_subtracts_readings_and_counts_restarted_and_new_pods_from_zero() -> None:
    before = ServingSample({"a": counters(10, 1), "b": counters(50, 5)})
    now = ServingSample({"a": counters(30, 2), "b": counters(7, 0), "c": counters(4, 4)})
    got = window(now, before)
    # a: +20/+1; b restarted (50 -> 7): its 7 all count; c is new: its 4 count.
    assert (got.requests, got.errors) == (31, 5)


def test_window_without_a_baseline_is_everything_counted() -> None:
    got = window(ServingSample({"a": counters(3, 1)}), None)
    assert (got.requests, got.errors) == (3, 1)


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = ((0.1, 10.0), (0.5, 80.0), (1.0, 95.0), (float("inf"), 100.0))
    # rank 95 of 100 is the top of the (0.5, 1.0] bucket.
    assert quantile(0.95, buckets) == pytest.approx(1.0)
    # rank 50: 40 of the 70 in (0.1, 0.5] -> 0.1 + 0.4 * 40/70.
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 40 / 70)
    assert quantile(0.99, buckets) == 1.0, "in +Inf: the highest finite bound"
    assert quantile(0.95, ()) is None


def test_certainly_above_ignores_the_bucket_that_straddles_the_threshold() -> None:
    buckets = ((0.1, 10.0), (0.5, 80.0), (1.0, 95.0), (float("inf"), 100.0))
    assert certainly_above(0.7, buckets) == 5, "only the 5 beyond 1.0 are surely above 0.7"
    assert certainly_above(0.5, buckets) == 20
    assert certainly_above(5.0, buckets) == 0


# --- judge ------------------------------------------------------------------------------------------------


def test_thresholds_holding_over_min_requests_pass() -> None:
    got = judge(counters(40, 1, (0.2,) * 40), THRESHOLDS)
    assert got.verdict == PASS
    assert got.requests == 40
    assert got.error_rate == pytest.approx(1 / 40)
    assert "40 requests, 1 errors" in got.message


def test_too_little_traffic_is_inconclusive_never_a_pass() -> None:
    got = judge(counters(19, 0, (0.2,) * 19), THRESHOLDS)
    assert got.verdict == INCONCLUSIVE
    assert got.reason == "TooFewRequests"
    assert "needs at least 20 requests" in got.message


def test_error_rate_breach_fails() -> None:
    got = judge(counters(100, 6), THRESHOLDS)
    assert got.verdict == FAIL
    assert got.reason == "ErrorRateExceeded"


def test_an_error_budget_already_spent_fails_before_min_requests() -> None:
    # 5 % of 20 is 1 error: a second error can't be diluted by the requests still to come.
    assert judge(counters(2, 2), THRESHOLDS).verdict == FAIL
    assert judge(counters(2, 1), THRESHOLDS).verdict == INCONCLUSIVE


def test_latency_breach_fails() -> None:
    got = judge(counters(40, 0, (0.2,) * 30 + (2.0,) * 10), THRESHOLDS)
    assert got.verdict == FAIL
    assert got.reason == "LatencyExceeded"
    assert got.p95_latency_ms is not None
    assert got.p95_latency_ms > 1000


def test_slow_requests_beyond_the_budget_fail_before_min_requests() -> None:
    # 5 % of 20 = 1 slow request allowed; two surely above 1 s are a breach whatever follows.
    assert judge(counters(3, 0, (0.2, 3.0, 3.0)), THRESHOLDS).verdict == FAIL


def test_unreadable_metrics_and_unready_canary_are_inconclusive() -> None:
    assert judge(None, THRESHOLDS).reason == "MetricsUnavailable"
    got = judge(counters(0), THRESHOLDS, ready_replicas=0, replicas=1)
    assert got.verdict == INCONCLUSIVE
    assert got.reason == "CanaryNotReady"


@given(
    requests=st.integers(min_value=0, max_value=10_000),
    errors=st.integers(min_value=0, max_value=10_000),
    min_requests=st.integers(min_value=1, max_value=10_000),
    rate=st.floats(min_value=0.0, max_value=1.0),
)
def test_never_passes_below_min_requests_or_above_the_error_rate(
    requests: int, errors: int, min_requests: int, rate: float
) -> None:
    errors = min(errors, requests)
    got = judge(counters(requests, errors), Thresholds(min_requests=min_requests, max_error_rate=rate))
    if got.verdict == PASS:
        assert requests >= min_requests
        assert errors <= rate * requests


# --- decide -----------------------------------------------------------------------------------------------

STEPS = (Step(weight=10, pause_seconds=60), Step(weight=50, pause_seconds=60))
AT_STEP_0 = CanaryPosition(step=0, step_started_at=T0)


def decide_at(seconds: float, judgement_of: PodCounters, position: CanaryPosition = AT_STEP_0) -> Decision:
    return decide(
        STEPS,
        position,
        judge(judgement_of, THRESHOLDS),
        T0 + timedelta(seconds=seconds),
        inconclusive_timeout_seconds=120,
    )


def test_a_pass_waits_for_the_pause_then_promotes_step_by_step_then_completes() -> None:
    healthy = counters(40, 0, (0.2,) * 40)
    early = decide_at(30, healthy)
    assert (early.action, early.weight, early.recorded) == ("wait", 10, False)
    promoted = decide_at(61, healthy)
    assert (promoted.action, promoted.step, promoted.weight) == ("promote", 1, 50)
    assert promoted.recorded
    assert "promoted to 50 %" in promoted.message
    done = decide_at(61, healthy, CanaryPosition(step=1, step_started_at=T0))
    assert (done.action, done.weight, done.reason) == ("complete", 100, "CanaryCompleted")


def test_a_breach_rolls_back_at_once_even_inside_the_pause() -> None:
    got = decide_at(1, counters(30, 10))
    assert (got.action, got.weight, got.reason) == ("rollback", 0, "AnalysisFailed")
    assert "error rate above 5.0 %" in got.message


def test_inconclusive_waits_then_fails_after_the_bound() -> None:
    quiet = counters(3, 0, (0.2,) * 3)
    waiting = decide_at(100, quiet)
    assert (waiting.action, waiting.reason) == ("wait", "AnalysisInconclusive")
    assert waiting.recorded, "inconclusive past the pause is a recorded decision"
    timed_out = decide_at(60 + 120, quiet)
    assert (timed_out.action, timed_out.reason) == ("rollback", "AnalysisInconclusiveTimeout")
    assert "never passes" in timed_out.message


@given(
    seconds=st.floats(min_value=0, max_value=10_000),
    requests=st.integers(min_value=0, max_value=19),
)
def test_too_little_traffic_never_promotes(seconds: float, requests: int) -> None:
    got = decide_at(seconds, counters(requests, 0, (0.2,) * requests))
    assert got.action in ("wait", "rollback")


# --- split ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stable", "weight", "expected"),
    [
        (9, 10, (9, 1, 10)),
        (1, 10, (1, 1, 50)),
        (4, 50, (4, 4, 50)),
        (4, 90, (4, 4, 50)),
        (3, 0, (3, 0, 0)),
        (3, 100, (0, 3, 100)),
    ],
)
def test_replica_split_reports_the_effective_weight(
    stable: int, weight: int, expected: tuple[int, ...]
) -> None:
    got = replica_split(stable, weight)
    assert (got.stable_replicas, got.canary_replicas, got.weight) == expected


def test_route_split_keeps_exact_weights() -> None:
    got = route_split(1, 10)
    assert (got.stable_replicas, got.canary_replicas, got.weight) == (1, 1, 10)
    assert route_split(10, 25).canary_replicas == 3


def test_split_refuses_a_weight_that_is_not_a_percentage() -> None:
    with pytest.raises(ValueError, match="not a percentage"):
        replica_split(1, 101)


def test_parse_reads_the_builtin_servers_names() -> None:
    text = """\
# TYPE fto_server_requests_total counter
fto_server_requests_total{route="/v1/completions",code="200"} 8.0
fto_server_requests_total{route="/v1/completions",code="503"} 2.0
fto_server_requests_total{route="/v2/health/ready",code="200"} 70.0
# TYPE fto_server_request_duration_seconds histogram
fto_server_request_duration_seconds_bucket{route="/v1/completions",le="0.5"} 9.0
fto_server_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"} 10.0
fto_server_request_duration_seconds_count{route="/v1/completions"} 10.0
fto_server_request_duration_seconds_sum{route="/v1/completions"} 2.0
"""
    parsed = parse_pod_metrics(text)
    assert (parsed.requests, parsed.errors) == (10, 2)
    assert parsed.latency_buckets == ((0.5, 9.0), (float("inf"), 10.0))


def test_a_canary_server_that_failed_is_a_fail_whatever_the_traffic() -> None:
    got = judge(None, THRESHOLDS, server_failure="model files missing under /mnt/model")
    assert (got.verdict, got.reason) == (FAIL, "CanaryServerFailed")
    assert "model files missing" in got.message
