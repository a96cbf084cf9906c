"""Canary analysis and promotion decisions: samples of the servers' counters, the verdict on a window,
the next move of the rollout and the traffic split. Pure functions; the metric reads are
`finetune_operator.metric_reads`."""

from finetune_operator.rollout.analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Judgement,
    Thresholds,
    Verdict,
    judge,
)
from finetune_operator.rollout.decisions import CanaryPosition, Decision, Step, decide
from finetune_operator.rollout.samples import PodCounters, ServingSample, parse_pod_metrics, window
from finetune_operator.rollout.split import Split, replica_split, route_split

__all__ = [
    "FAIL",
    "INCONCLUSIVE",
    "PASS",
    "CanaryPosition",
    "Decision",
    "Judgement",
    "PodCounters",
    "ServingSample",
    "Split",
    "Step",
    "Thresholds",
    "Verdict",
    "decide",
    "judge",
    "parse_pod_metrics",
    "replica_split",
    "route_split",
    "window",
]
