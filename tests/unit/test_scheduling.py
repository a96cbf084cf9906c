"""Admission logic: free GPUs, gang placement, order, quota and the waiting message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.scheduling import (
    GPU_PRODUCT_LABEL,
    GangDemand,
    admission_order,
    free_gpus_by_node,
    place_gang,
    plan_admission,
    pod_gpu_request,
)
from finetune_operator.scheduling.capacity import tolerates
from finetune_operator.scheduling.queue import TIMES

H100 = "NVIDIA-H100-80GB-HBM3"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def node(
    name: str, gpus: int, product: str = H100, *, ready: bool = True, taint: bool = True
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {GPU_PRODUCT_LABEL: product}},
        "spec": {"taints": [GPU_TAINT] if taint else []},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "32"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(
    node_name: str | None, gpus: int, phase: str = "Running", *, limits_only: bool = False
) -> dict[str, Any]:
    resources = (
        {"limits": {"nvidia.com/gpu": gpus}} if limits_only else {"requests": {"nvidia.com/gpu": gpus}}
    )
    spec: dict[str, Any] = {"containers": [{"name": "c", "resources": resources}]}
    if node_name:
        spec["nodeName"] = node_name
    return {"spec": spec, "status": {"phase": phase}}


def demand(key: str, nodes: int = 1, gpus: int = 8, **kw: Any) -> GangDemand:
    kw.setdefault("created", T0)
    kw.setdefault("priority", 0)
    kw.setdefault("node_selector", {GPU_PRODUCT_LABEL: H100})
    kw.setdefault("tolerations", (GPU_TOLERATION,))
    return GangDemand(key=key, namespace=key.split("/")[0], nodes=nodes, gpus_per_node=gpus, **kw)


def test_free_gpus_subtracts_non_terminated_pods_only() -> None:
    nodes = [node("gpu-node-0", 8), node("gpu-node-1", 8), node("cpu-node-0", 0)]
    pods = [
        pod("gpu-node-0", 4),
        pod("gpu-node-0", 2, "Succeeded"),
        pod("gpu-node-1", 3, "Failed"),
        pod(None, 8, "Pending"),
        pod("gpu-node-1", 1, limits_only=True),
    ]
    free = {n.name: n.free for n in free_gpus_by_node(nodes, pods)}
    assert free == {"gpu-node-0": 4, "gpu-node-1": 7}


def test_not_ready_nodes_offer_nothing() -> None:
    free = free_gpus_by_node([node("a", 8, ready=False), node("b", 8)], [])
    assert [n.name for n in free] == ["b"]


def test_init_container_request_counts_when_larger() -> None:
    body = pod("n", 1)
    body["spec"]["initContainers"] = [{"name": "i", "resources": {"requests": {"nvidia.com/gpu": "4"}}}]
    assert pod_gpu_request(body) == 4


def test_toleration_semantics() -> None:
    assert tolerates([GPU_TOLERATION], GPU_TAINT)
    assert tolerates([{"operator": "Exists"}], GPU_TAINT)
    assert not tolerates([{"key": "nvidia.com/gpu", "value": "absent"}], GPU_TAINT)
    assert not tolerates([], GPU_TAINT)


def test_place_gang_uses_distinct_nodes_best_fit() -> None:
    assert place_gang({"a": 8, "b": 4, "c": 6}, 2, 4) == ["b", "c"]
    assert place_gang({"a": 8, "b": 4}, 2, 8) is None
    assert place_gang({"a": 16}, 2, 8) is None, "two pieces never share one node"
    assert place_gang({"a": 8, "b": 8}, 1, 8, exclude=["a"]) == ["b"]


def test_three_single_node_jobs_on_two_nodes_one_waits_with_message() -> None:
    nodes = free_gpus_by_node([node("gpu-node-0", 8), node("gpu-node-1", 8)], [pod("gpu-node-0", 4)])
    demands = [demand("ns/a", created=T0), demand("ns/b", created=T0 + timedelta(seconds=1))]
    plan = plan_admission(nodes, demands)
    assert plan.admit == ["ns/a"]
    assert plan.waiting["ns/b"].reason == "InsufficientGPUs"
    assert plan.waiting["ns/b"].message == (
        f"needs 1 node {TIMES} 8 GPUs ({GPU_PRODUCT_LABEL}={H100}); "
        "largest free: 4 on gpu-node-0, 0 on gpu-node-1"
    )


def test_admitted_jobs_without_pods_keep_their_gpus_reserved() -> None:
    nodes = free_gpus_by_node([node("gpu-node-0", 8), node("gpu-node-1", 8)], [pod("gpu-node-1", 8)])
    demands = [
        demand("ns/a", admitted=True),  # admitted, Job not created yet: no pod anywhere
        demand("ns/b", admitted=True, bound_nodes=("gpu-node-1",)),  # its pod is counted via the pod list
        demand("ns/c"),
    ]
    plan = plan_admission(nodes, demands)
    assert plan.admit == [], "a's reservation holds gpu-node-0 although a has no pod yet"
    assert plan.waiting["ns/c"].reason == "InsufficientGPUs"
    assert plan_admission(nodes, demands[1:]).admit == ["ns/c"]


def test_two_node_gang_needs_two_whole_nodes() -> None:
    nodes = free_gpus_by_node([node("gpu-node-0", 8), node("gpu-node-1", 8)], [pod("gpu-node-0", 4)])
    plan = plan_admission(nodes, [demand("ns/big", nodes=2)])
    assert plan.waiting["ns/big"].message.startswith(f"needs 2 nodes {TIMES} 8 GPUs")
    assert "8 on gpu-node-1, 4 on gpu-node-0" in plan.waiting["ns/big"].message
    plan = plan_admission(
        free_gpus_by_node([node("gpu-node-0", 8), node("gpu-node-1", 8)], []), [demand("ns/big", nodes=2)]
    )
    assert plan.admit == ["ns/big"]


def test_priority_then_age_orders_admission() -> None:
    old = demand("ns/old", created=T0)
    new_high = demand("ns/high", created=T0 + timedelta(minutes=5), priority=10)
    newer = demand("ns/newer", created=T0 + timedelta(minutes=1))
    assert [d.key for d in admission_order([newer, old, new_high])] == ["ns/high", "ns/old", "ns/newer"]
    nodes = free_gpus_by_node([node("gpu-node-0", 8)], [])
    plan = plan_admission(nodes, [old, new_high])
    assert plan.admit == ["ns/high"]
    assert plan.queue_position["ns/old"] == 2


def test_smaller_job_backfills_behind_a_big_waiting_one() -> None:
    nodes = free_gpus_by_node([node("gpu-node-0", 8), node("gpu-node-1", 8)], [pod("gpu-node-0", 8)])
    plan = plan_admission(
        nodes, [demand("ns/big", nodes=2), demand("ns/small", gpus=4, created=T0 + timedelta(1))]
    )
    assert plan.admit == ["ns/small"]
    assert "ns/big" in plan.waiting


def test_product_selector_and_taints_restrict_nodes() -> None:
    nodes = free_gpus_by_node([node("a100", 8, product="NVIDIA-A100"), node("h100", 8)], [])
    plan = plan_admission(nodes, [demand("ns/x", nodes=2)])
    assert plan.waiting["ns/x"].message.endswith("largest free: 8 on h100; only 1 matching node exists")
    untolerated = demand("ns/y", tolerations=())
    plan = plan_admission(nodes, [untolerated])
    assert plan.waiting["ns/y"].message.endswith("no GPU node matches its node selector and tolerations")


def test_namespace_quota() -> None:
    nodes = free_gpus_by_node([node("gpu-node-0", 8), node("gpu-node-1", 8)], [])
    demands = [
        demand("team/a", admitted=True, bound_nodes=("gpu-node-0",)),
        demand("team/b"),
        demand("other/c"),
    ]
    plan = plan_admission(nodes, demands, {"team": 8})
    assert plan.waiting["team/b"].reason == "GPUQuotaExceeded"
    assert "uses 8 of its quota of 8" in plan.waiting["team/b"].message
    assert plan.admit == ["other/c"]


def test_gpu_free_jobs_are_admitted_without_placement() -> None:
    plan = plan_admission([], [demand("ns/cpu", gpus=0, node_selector={})])
    assert plan.admit == ["ns/cpu"]


AMD = "amd.com/gpu"
AMD_TOLERATION = {"key": AMD, "operator": "Exists", "effect": "NoSchedule"}


def amd_node(name: str, gpus: int) -> dict[str, Any]:
    body = node(name, 0, taint=False)
    body["metadata"]["labels"] = {}
    body["status"]["allocatable"] = {AMD: str(gpus)}
    return body


def test_capacity_is_counted_for_the_resource_the_pods_request() -> None:
    nodes = [node("gpu-node-0", 8), amd_node("amd-0", 4)]
    pods = [
        pod("gpu-node-0", 8),
        {
            "spec": {
                "nodeName": "amd-0",
                "containers": [{"name": "c", "resources": {"requests": {AMD: "1"}}}],
            },
            "status": {"phase": "Running"},
        },
    ]
    assert {n.name: n.free for n in free_gpus_by_node(nodes, pods)} == {"gpu-node-0": 0}
    assert {n.name: n.free for n in free_gpus_by_node(nodes, pods, AMD)} == {"amd-0": 3}
    assert pod_gpu_request(pods[1], AMD) == 1
    assert pod_gpu_request(pods[1]) == 0


def test_a_job_is_placed_only_on_capacity_of_its_own_resource() -> None:
    raw = [node("gpu-node-0", 8, taint=False), amd_node("amd-0", 4)]
    capacity = free_gpus_by_node(raw, []) + free_gpus_by_node(raw, [], AMD)
    on_amd = demand("ns/amd", gpus=4, node_selector={}, tolerations=(AMD_TOLERATION,), gpu_resource=AMD)
    too_big = demand("ns/amd-big", gpus=8, node_selector={}, tolerations=(AMD_TOLERATION,), gpu_resource=AMD)
    plan = plan_admission(capacity, [on_amd, too_big])
    assert plan.admit == ["ns/amd"]
    assert plan.placements["ns/amd"] == ["amd-0"]
    # 8 nvidia.com/gpu are free on an untainted node, but they are not what the pods ask for.
    assert plan.waiting["ns/amd-big"].message == f"needs 1 node {TIMES} 8 {AMD}; largest free: 0 on amd-0"
    nvidia = demand("ns/nvidia", gpus=8, node_selector={})
    assert plan_admission(capacity, [on_amd, nvidia]).placements == {
        "ns/amd": ["amd-0"],
        "ns/nvidia": ["gpu-node-0"],
    }


def test_a_job_asking_for_a_resource_no_node_has_says_so() -> None:
    capacity = free_gpus_by_node([node("gpu-node-0", 8)], [])
    mig = "nvidia.com/mig-1g.10gb"
    plan = plan_admission(capacity, [demand("ns/mig", gpus=1, node_selector={}, gpu_resource=mig)])
    assert plan.waiting["ns/mig"].reason == "InsufficientGPUs"
    assert plan.waiting["ns/mig"].message == f"needs 1 node {TIMES} 1 {mig}; no ready node has {mig} capacity"
