"""Priority that holds: strict holds for the waiting gang at the head, preemption of the fewest and lowest
lower-priority gangs, the minimum run time, quota and GPU-product boundaries, and the messages."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from finetune_operator.config import OperatorConfig
from finetune_operator.scheduling import (
    DRAINING,
    GPU_PRODUCT_LABEL,
    INSUFFICIENT_GPUS,
    PREEMPTING,
    QUOTA_EXCEEDED,
    AdmissionPolicy,
    Candidate,
    NodeGpus,
    free_gpus_by_node,
    plan_admission,
    select_victims,
)
from finetune_operator.scheduling import preemption as preemption_module
from tests.unit.test_scheduling import GPU_TOLERATION, H100, T0, demand, node, pod

STRICT = AdmissionPolicy.STRICT
BEST_EFFORT = AdmissionPolicy.BEST_EFFORT
A100 = "NVIDIA-A100-SXM4-80GB"
NOW = T0 + timedelta(hours=1)
LONG_AGO = T0
"""Admission time of gangs that have run far longer than any minimum run time here."""


def nodes_with(used: dict[str, int], products: dict[str, str] | None = None) -> list[NodeGpus]:
    """8-GPU nodes with `used` GPUs taken by running pods."""
    products = products or {}
    names = sorted(set(used) | set(products))
    return free_gpus_by_node(
        [node(n, 8, products.get(n, H100)) for n in names], [pod(n, g) for n, g in used.items() if g]
    )


def running(key: str, where: str, gpus: int = 8, **kw: Any) -> Any:
    kw.setdefault("admitted_at", LONG_AGO)
    return demand(key, gpus=gpus, admitted=True, bound_nodes=(where,), **kw)


def later(minutes: int) -> Any:
    return T0 + timedelta(minutes=minutes)


# --- no starvation --------------------------------------------------------------------------------------


def starvation_scenario(policy: AdmissionPolicy) -> Any:
    """The issue's scenario after the first small job ended: gpu-node-0 free, gpu-node-1 still busy."""
    cluster = nodes_with({"gpu-node-0": 0, "gpu-node-1": 8})
    demands = [
        running("ns/small-b", "gpu-node-1", created=later(0)),
        demand("ns/big", nodes=2, priority=100, created=later(1)),
        demand("ns/small-c", created=later(2)),
    ]
    return plan_admission(cluster, demands, policy=policy, now=NOW)


def test_strict_holds_the_freed_node_for_the_waiting_high_priority_gang() -> None:
    plan = starvation_scenario(STRICT)
    assert plan.admit == []
    assert plan.held["ns/big"] == ["gpu-node-0", "gpu-node-1"]
    big = plan.waiting["ns/big"]
    assert big.reason == INSUFFICIENT_GPUS
    assert big.message.endswith(
        "; held for it: gpu-node-0, gpu-node-1 (no job behind it is admitted into their GPUs)"
    )
    small = plan.waiting["ns/small-c"]
    assert small.reason == INSUFFICIENT_GPUS
    assert "gpu-node-0, gpu-node-1 held for ns/big (priority 100)" in small.message
    assert plan.queue_position == {"ns/big": 1, "ns/small-c": 2}


def test_best_effort_lets_the_newer_small_job_take_the_freed_node() -> None:
    plan = starvation_scenario(BEST_EFFORT)
    assert plan.admit == ["ns/small-c"]
    assert plan.placements["ns/small-c"] == ["gpu-node-0"]
    assert plan.held == {}
    assert "held" not in plan.waiting["ns/big"].message


def test_the_held_gang_is_admitted_as_soon_as_its_nodes_are_free() -> None:
    demands = [demand("ns/big", nodes=2, priority=100), demand("ns/small-c", created=later(2))]
    plan = plan_admission(nodes_with({"gpu-node-0": 0, "gpu-node-1": 0}), demands, policy=STRICT)
    assert plan.admit == ["ns/big"]
    assert plan.waiting["ns/small-c"].reason == INSUFFICIENT_GPUS


def test_strict_backfills_onto_nodes_the_held_gang_cannot_use() -> None:
    cluster = nodes_with({"h100-0": 0, "h100-1": 8, "a100-0": 0}, {"a100-0": A100})
    demands = [
        running("ns/busy", "h100-1"),
        demand("ns/big", nodes=2, priority=100),
        demand("ns/on-a100", created=later(1), node_selector={GPU_PRODUCT_LABEL: A100}),
        demand("ns/on-h100", created=later(2)),
    ]
    plan = plan_admission(cluster, demands, policy=STRICT, now=NOW)
    assert plan.admit == ["ns/on-a100"]
    assert plan.placements["ns/on-a100"] == ["a100-0"]
    assert "ns/on-h100" in plan.waiting


def test_strict_backfills_the_spare_gpus_of_a_held_node() -> None:
    """Of a held node's free GPUs only the holder's gpusPerNode are kept back; the rest can't delay it."""
    cluster = nodes_with({"gpu-node-0": 0, "gpu-node-1": 8})
    demands = [
        running("ns/busy", "gpu-node-1"),
        demand("ns/big", nodes=2, gpus=4, priority=100),
        demand("ns/four", gpus=4, created=later(1)),
        demand("ns/one-more", gpus=1, created=later(2)),
    ]
    plan = plan_admission(cluster, demands, policy=STRICT, now=NOW)
    assert plan.admit == ["ns/four"]
    assert plan.placements["ns/four"] == ["gpu-node-0"]
    assert "ns/one-more" in plan.waiting, "the last 4 free GPUs of gpu-node-0 are the big gang's"


def test_a_gang_that_can_never_fit_holds_nothing() -> None:
    demands = [demand("ns/huge", nodes=3, priority=100), demand("ns/small", created=later(1))]
    plan = plan_admission(nodes_with({"gpu-node-0": 0, "gpu-node-1": 8}), demands, policy=STRICT)
    assert plan.admit == ["ns/small"]
    assert "ns/huge" not in plan.held
    assert plan.waiting["ns/huge"].message.endswith("only 2 matching nodes exist")


def test_strict_keeps_equal_priorities_in_order_of_age() -> None:
    demands = [
        running("ns/busy", "gpu-node-1"),
        demand("ns/older-big", nodes=2, created=later(1)),
        demand("ns/younger-small", created=later(2)),
    ]
    cluster = nodes_with({"gpu-node-0": 0, "gpu-node-1": 8})
    assert plan_admission(cluster, demands, policy=STRICT, now=NOW).admit == []
    assert plan_admission(cluster, demands, policy=BEST_EFFORT, now=NOW).admit == ["ns/younger-small"]


def test_strict_holds_quota_for_a_waiting_gang_ahead_in_its_namespace() -> None:
    demands = [
        running("other/busy", "gpu-node-1"),
        demand("team/big", nodes=2, priority=100),
        demand("team/small", created=later(1)),
    ]
    cluster = nodes_with({"gpu-node-0": 0, "gpu-node-1": 8})
    plan = plan_admission(cluster, demands, {"team": 16}, policy=STRICT, now=NOW)
    assert plan.waiting["team/small"].reason == QUOTA_EXCEEDED
    assert plan.waiting["team/small"].message == (
        "needs 8 GPUs; namespace team uses 0 of its quota of 16, and 16 are held for jobs ahead of it"
    )
    plan = plan_admission(cluster, demands, {"team": 16}, policy=BEST_EFFORT, now=NOW)
    assert plan.admit == ["team/small"]


# --- preemption -----------------------------------------------------------------------------------------


def two_small_and_one_big(**big: Any) -> Any:
    big.setdefault("may_preempt", True)
    big.setdefault("priority", 100)
    demands = [
        running("ns/small-a", "gpu-node-0"),
        running("ns/small-b", "gpu-node-1", created=later(1)),
        demand("ns/big", nodes=2, created=later(2), **big),
    ]
    return plan_admission(
        nodes_with({"gpu-node-0": 8, "gpu-node-1": 8}), demands, policy=STRICT, now=NOW, min_run_seconds=300
    )


def test_a_high_priority_gang_preempts_the_two_low_priority_ones_it_needs() -> None:
    plan = two_small_and_one_big()
    assert sorted(plan.preempt) == ["ns/small-a", "ns/small-b"]
    for victim in plan.preempt.values():
        assert victim.preemptor == "ns/big"
        assert victim.message.startswith(
            "preempted by ns/big (priority 100), which needs 2 nodes \N{MULTIPLICATION SIGN} 8 GPUs on "
            "gpu-node-0, gpu-node-1"
        )
    big = plan.waiting["ns/big"]
    assert big.reason == PREEMPTING
    assert big.message.startswith("preempting ns/small-")
    assert plan.held["ns/big"] == ["gpu-node-0", "gpu-node-1"]
    assert plan.admit == []


def test_with_never_nothing_is_preempted() -> None:
    plan = two_small_and_one_big(may_preempt=False)
    assert plan.preempt == {}
    assert plan.waiting["ns/big"].reason == INSUFFICIENT_GPUS


def test_equal_priority_never_preempts() -> None:
    plan = two_small_and_one_big(priority=0)
    assert plan.preempt == {}


def test_minimum_run_time_protects_recently_admitted_gangs_and_says_when() -> None:
    demands = [
        running("ns/small-a", "gpu-node-0", admitted_at=NOW - timedelta(seconds=100)),
        running("ns/small-b", "gpu-node-1", admitted_at=NOW - timedelta(seconds=50)),
        demand("ns/big", nodes=2, priority=100, may_preempt=True),
    ]
    cluster = nodes_with({"gpu-node-0": 8, "gpu-node-1": 8})
    plan = plan_admission(cluster, demands, policy=STRICT, now=NOW, min_run_seconds=300)
    assert plan.preempt == {}
    assert plan.waiting["ns/big"].message.endswith(
        "; may preempt ns/small-b (priority 0), ns/small-a (priority 0) in 250 s, once they have run the "
        "minimum run time of 300 s"
    )
    plan = plan_admission(
        cluster, demands, policy=STRICT, now=NOW + timedelta(seconds=250), min_run_seconds=300
    )
    assert sorted(plan.preempt) == ["ns/small-a", "ns/small-b"]


def test_unknown_admission_time_counts_as_just_admitted() -> None:
    demands = [
        running("ns/small", "gpu-node-0", admitted_at=None),
        demand("ns/big", priority=9, may_preempt=True),
    ]
    plan = plan_admission(nodes_with({"gpu-node-0": 8}), demands, now=NOW, min_run_seconds=60)
    assert plan.preempt == {}


def test_preempts_the_fewest() -> None:
    """Freeing gpu-node-1 takes one victim, gpu-node-0 two."""
    demands = [
        running("ns/half-1", "gpu-node-0", gpus=4),
        running("ns/half-2", "gpu-node-0", gpus=4),
        running("ns/whole", "gpu-node-1"),
        demand("ns/high", priority=10, may_preempt=True),
    ]
    plan = plan_admission(nodes_with({"gpu-node-0": 8, "gpu-node-1": 8}), demands, now=NOW)
    assert list(plan.preempt) == ["ns/whole"]


def test_preempts_the_lowest_before_the_fewest() -> None:
    demands = [
        running("ns/low-1", "gpu-node-0", gpus=4),
        running("ns/low-2", "gpu-node-0", gpus=4),
        running("ns/mid", "gpu-node-1", priority=5),
        demand("ns/high", priority=10, may_preempt=True),
    ]
    plan = plan_admission(nodes_with({"gpu-node-0": 8, "gpu-node-1": 8}), demands, now=NOW)
    assert sorted(plan.preempt) == ["ns/low-1", "ns/low-2"]


def test_among_equals_the_most_recently_admitted_is_preempted() -> None:
    demands = [
        running("ns/old", "gpu-node-0", admitted_at=NOW - timedelta(hours=5)),
        running("ns/recent", "gpu-node-1", admitted_at=NOW - timedelta(hours=1)),
        demand("ns/high", priority=10, may_preempt=True),
    ]
    plan = plan_admission(nodes_with({"gpu-node-0": 8, "gpu-node-1": 8}), demands, now=NOW)
    assert list(plan.preempt) == ["ns/recent"]


def test_higher_priority_running_gangs_are_never_victims() -> None:
    demands = [running("ns/vip", "gpu-node-0", priority=50), demand("ns/high", priority=10, may_preempt=True)]
    plan = plan_admission(nodes_with({"gpu-node-0": 8}), demands, now=NOW)
    assert plan.preempt == {}


def test_preempts_only_on_nodes_of_the_product_it_needs() -> None:
    demands = [
        running("ns/on-a100", "a100-0", node_selector={GPU_PRODUCT_LABEL: A100}),
        running("ns/on-h100", "h100-0"),
        demand("ns/high", priority=10, may_preempt=True),
    ]
    cluster = nodes_with({"a100-0": 8, "h100-0": 8}, {"a100-0": A100})
    assert list(plan_admission(cluster, demands, now=NOW).preempt) == ["ns/on-h100"]
    assert plan_admission(cluster, [demands[0], demands[2]], now=NOW).preempt == {}


def test_a_namespace_at_its_quota_preempts_only_within_itself() -> None:
    cluster = nodes_with({"gpu-node-0": 8, "gpu-node-1": 8})
    team_low = running("team/low", "gpu-node-0")
    other_low = running("other/low", "gpu-node-1")
    high = demand("team/high", priority=100, may_preempt=True)
    plan = plan_admission(cluster, [team_low, other_low, high], {"team": 8}, now=NOW)
    assert list(plan.preempt) == ["team/low"]
    plan = plan_admission(cluster, [other_low, high], {"team": 0}, now=NOW)
    assert plan.preempt == {}
    assert plan.waiting["team/high"].reason == QUOTA_EXCEEDED


def test_a_namespace_under_its_quota_may_preempt_elsewhere() -> None:
    cluster = nodes_with({"gpu-node-0": 8})
    demands = [running("other/low", "gpu-node-0"), demand("team/high", priority=100, may_preempt=True)]
    plan = plan_admission(cluster, demands, {"team": 8}, now=NOW)
    assert list(plan.preempt) == ["other/low"]


def test_after_preemption_the_gang_waits_for_its_victims_and_preempts_no_more() -> None:
    """The next pass: both victims are draining (not admitted, pods saving checkpoints); a third small
    job on another node is left alone, and the freed nodes stay held for the big gang."""
    cluster = nodes_with({"gpu-node-0": 8, "gpu-node-1": 8, "gpu-node-2": 8})
    demands = [
        demand("ns/small-a", draining=True, bound_nodes=("gpu-node-0",)),
        demand("ns/small-b", draining=True, bound_nodes=("gpu-node-1",), created=later(1)),
        running("ns/small-c", "gpu-node-2"),
        demand("ns/big", nodes=2, priority=100, may_preempt=True, created=later(2)),
        demand("ns/newcomer", created=later(3)),
    ]
    plan = plan_admission(cluster, demands, policy=BEST_EFFORT, now=NOW)
    assert plan.preempt == {}
    assert plan.held["ns/big"] == ["gpu-node-0", "gpu-node-1"]
    assert (
        "waiting for GPUs being freed (pods stopping) on gpu-node-0, gpu-node-1"
        in plan.waiting["ns/big"].message
    )
    assert plan.waiting["ns/small-a"].reason == DRAINING
    assert plan.admit == []


def test_gpus_of_deleting_pods_are_being_freed_and_held_for_the_waiting_gang() -> None:
    deleting = pod("gpu-node-0", 8)
    deleting["metadata"] = {"deletionTimestamp": "2026-01-01T00:00:00Z"}
    cluster = free_gpus_by_node([node("gpu-node-0", 8), node("gpu-node-1", 8)], [deleting])
    assert [(n.free, n.terminating) for n in cluster] == [(0, 8), (8, 0)]
    demands = [demand("ns/big", nodes=2, priority=100), demand("ns/small", created=later(1))]
    plan = plan_admission(cluster, demands, policy=BEST_EFFORT)
    assert plan.admit == [], "even best-effort keeps what is being freed for the gang that waits for it"
    assert plan.held["ns/big"] == ["gpu-node-0", "gpu-node-1"]


def test_victims_leave_their_quota_to_the_preemptor_only() -> None:
    cluster = nodes_with({"gpu-node-0": 8, "gpu-node-1": 0})
    demands = [
        running("team/low", "gpu-node-0"),
        demand("team/high", priority=100, may_preempt=True),
        demand("team/other", priority=50, created=later(1), node_selector={}, tolerations=(GPU_TOLERATION,)),
    ]
    plan = plan_admission(cluster, demands, {"team": 8}, now=NOW)
    assert list(plan.preempt) == ["team/low"]
    assert "team/other" not in plan.admit


# --- victim search --------------------------------------------------------------------------------------


def test_greedy_search_beyond_the_budget_still_spares_unneeded_victims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(preemption_module, "MAX_VICTIM_SETS", 1)
    candidates = [
        Candidate("ns/tiny", 0, 2, LONG_AGO, {"a": 2}),
        Candidate("ns/whole", 1, 8, LONG_AGO, {"b": 8}),
        Candidate("ns/half", 0, 4, LONG_AGO, {"a": 4}),
    ]
    found = select_victims({"a": 2, "b": 0}, 1, 8, candidates)
    assert found is not None
    assert set(found.keys) == {"ns/tiny", "ns/half"}
    assert found.placement == ["a"]


def test_no_victims_when_even_all_together_do_not_suffice() -> None:
    candidates = [Candidate("ns/x", 0, 4, LONG_AGO, {"a": 4})]
    assert select_victims({"a": 0}, 1, 8, candidates) is None
    assert select_victims({"a": 4}, 1, 8, candidates, quota_to_free=8) is None


# --- settings -------------------------------------------------------------------------------------------


def test_policy_and_minimum_run_time_come_from_the_environment() -> None:
    assert OperatorConfig.from_env({}).admission_policy is STRICT
    config = OperatorConfig.from_env(
        {"FTO_ADMISSION_POLICY": "best-effort", "FTO_PREEMPTION_MIN_RUN_SECONDS": "30"}
    )
    assert config.admission_policy is BEST_EFFORT
    assert config.preemption_min_run_seconds == 30
    with pytest.raises(ValueError, match="admission_policy"):
        OperatorConfig.from_env({"FTO_ADMISSION_POLICY": "fifo"})


def test_gpus_of_another_resource_are_never_preempted_for() -> None:
    amd = "amd.com/gpu"
    raw = [node("gpu-node-0", 8)]
    raw[0]["status"]["allocatable"][amd] = "8"
    capacity = free_gpus_by_node(raw, [pod("gpu-node-0", 8)]) + free_gpus_by_node(raw, [], amd)
    demands = [
        running("ns/on-amd", "gpu-node-0", gpu_resource=amd),
        demand("ns/high", priority=10, may_preempt=True),
    ]
    plan = plan_admission(capacity, demands, now=NOW)
    assert plan.preempt == {}
    assert plan.waiting["ns/high"].reason == INSUFFICIENT_GPUS
