"""Priority that holds, on the dev cluster: strict admission never starves the highest-priority waiting gang,
best-effort shows the old behaviour, and a higher-priority gang preempts lower-priority ones, which go back to
the queue unchanged (attempt, restarts) and run again when it has finished.

Each test gets two fake 8-GPU nodes of its own, with a GPU product no other node has (the `gpu_nodes` fixture
of test_disruption.py), so the 2 x 8 GPU pool of the other tests is neither needed nor touched. kwok plays the
kubelet: a preempted pod is deleted gracefully and gone at once (the trainer's checkpoint on SIGTERM is
tested in tests/e2e with real processes). Every wait is a deadline for something that must happen.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.request
from typing import Any

import pytest
from hack import devcluster

from tests.cluster.test_disruption import GpuNodes, gpu_nodes, on  # noqa: F401 (a fixture)
from tests.cluster.test_finetunejob import (
    condition,
    ftj,
    get_ftj,
    running_pods,
    wait_attempt_running,
    wait_phase,
)
from tests.kube_helpers import Cluster, finish_pod, kubectl_json, wait_for

pytestmark = pytest.mark.cluster

NO_MIN_RUN = {"FTO_PREEMPTION_MIN_RUN_SECONDS": "0"}


def job(nodes: GpuNodes, name: str, size: int = 1, **scheduling: Any) -> dict[str, Any]:
    return on(nodes, ftj(name, nodes=size, **scheduling))


def finish(cluster: Cluster, namespace: str, name: str, attempt: int = 1, count: int = 1) -> None:
    for pod in running_pods(cluster, namespace, name, attempt, count):
        finish_pod(cluster, namespace, pod["metadata"]["name"], 0)
    wait_phase(cluster, namespace, name, "Succeeded")


def admitted(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return condition(get_ftj(cluster, namespace, name), "Admitted")


def wait_admitted_reason(cluster: Cluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    """Wait until the job's Admitted condition has `reason` (written by the pass that decided it)."""
    return wait_for(
        lambda: (c := admitted(cluster, namespace, name)).get("reason") == reason and c,
        60,
        f"FineTuneJob {name} to wait with reason {reason}",
    )


def two_small_running(cluster: Cluster, namespace: str, nodes: GpuNodes) -> None:
    cluster.apply([job(nodes, "small-a"), job(nodes, "small-b")], namespace)
    wait_phase(cluster, namespace, "small-a", "Running")
    wait_phase(cluster, namespace, "small-b", "Running")


def metric(operator: Any, name: str) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(operator.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def events_of(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.name={name}"
    return list(
        kubectl_json(cluster, "get", "events", "-n", namespace, "--field-selector", selector)["items"]
    )


# --- no starvation ------------------------------------------------------------------------------------


def starvation(cluster: Cluster, namespace: str, nodes: GpuNodes) -> None:
    """The issue's scenario up to the moment the first small job has ended."""
    two_small_running(cluster, namespace, nodes)
    cluster.apply(job(nodes, "big", size=2, priority=100, preemptionPolicy="Never"), namespace)
    wait_phase(cluster, namespace, "big", "Queued")
    cluster.apply(job(nodes, "small-c"), namespace)
    wait_phase(cluster, namespace, "small-c", "Queued")
    finish(cluster, namespace, "small-a")


def test_strict_the_high_priority_gang_runs_first_once_two_nodes_are_free(
    gpu_nodes: GpuNodes,  # noqa: F811
    cluster: Cluster,
    namespace: str,
    operator: Any,
) -> None:
    starvation(cluster, namespace, gpu_nodes)
    # A pass after small-a's node was freed: it is held for big, and small-c, which came after big
    # started waiting, does not take it.
    held = wait_for(
        lambda: "largest free: 8 on" in (c := admitted(cluster, namespace, "big")).get("message", "") and c,
        60,
        "big to see the freed node",
    )
    assert held["reason"] == "InsufficientGPUs"
    assert "; held for it: " in held["message"], held
    small_c = admitted(cluster, namespace, "small-c")
    assert f"held for {namespace}/big (priority 100)" in small_c["message"], small_c
    assert get_ftj(cluster, namespace, "small-c")["status"]["phase"] == "Queued"
    finish(cluster, namespace, "small-b")
    wait_phase(cluster, namespace, "big", "Running")
    assert get_ftj(cluster, namespace, "small-c")["status"]["phase"] == "Queued"
    finish(cluster, namespace, "big", count=2)
    wait_phase(cluster, namespace, "small-c", "Running")


@pytest.mark.operator_env(FTO_ADMISSION_POLICY="best-effort")
def test_best_effort_the_newer_small_job_passes_the_waiting_gang(
    gpu_nodes: GpuNodes,  # noqa: F811
    cluster: Cluster,
    namespace: str,
    operator: Any,
) -> None:
    starvation(cluster, namespace, gpu_nodes)
    wait_phase(cluster, namespace, "small-c", "Running")
    big = get_ftj(cluster, namespace, "big")
    assert big["status"]["phase"] == "Queued"
    assert "held" not in condition(big, "Admitted")["message"]


# --- preemption ---------------------------------------------------------------------------------------


@pytest.mark.operator_env(**NO_MIN_RUN)
def test_a_high_priority_gang_preempts_two_low_priority_jobs_which_resume_after_it(
    gpu_nodes: GpuNodes,  # noqa: F811
    cluster: Cluster,
    namespace: str,
    operator: Any,
) -> None:
    two_small_running(cluster, namespace, gpu_nodes)
    cluster.apply(job(gpu_nodes, "big", size=2, priority=100), namespace)
    wait_phase(cluster, namespace, "big", "Running")
    for name in ("small-a", "small-b"):
        body = wait_phase(cluster, namespace, name, "Queued")
        reason = condition(body, "Admitted")
        assert reason["reason"] == "Preempted", reason
        assert reason["message"].startswith(f"preempted by {namespace}/big (priority 100)"), reason
        assert body["status"]["attempt"] == 1
        assert body["status"].get("restarts", 0) == 0, "a preemption is not charged as a restart"
        assert "Preempted" in {e["reason"] for e in events_of(cluster, namespace, name)}
    assert "PreemptedLowerPriority" in {e["reason"] for e in events_of(cluster, namespace, "big")}
    assert metric(operator, "finetune_operator_preemptions_total") == 2
    finish(cluster, namespace, "big", count=2)
    for name in ("small-a", "small-b"):
        body = wait_attempt_running(cluster, namespace, name, 2)
        assert body["status"].get("restarts", 0) == 0
        assert condition(body, "Admitted")["reason"] == "GangAdmitted"


@pytest.mark.operator_env(**NO_MIN_RUN)
def test_never_and_equal_priority_preempt_nothing(
    gpu_nodes: GpuNodes,  # noqa: F811
    cluster: Cluster,
    namespace: str,
    operator: Any,
) -> None:
    two_small_running(cluster, namespace, gpu_nodes)
    # The admission pass that writes each reason is the one that would have preempted. One at a time:
    # behind big-never, big-equal would find every node held and preempt nothing for that reason alone.
    cluster.apply(job(gpu_nodes, "big-equal", size=2, priority=0), namespace)
    wait_admitted_reason(cluster, namespace, "big-equal", "InsufficientGPUs")
    cluster.apply(job(gpu_nodes, "big-never", size=2, priority=100, preemptionPolicy="Never"), namespace)
    wait_admitted_reason(cluster, namespace, "big-never", "InsufficientGPUs")
    for name in ("small-a", "small-b"):
        assert get_ftj(cluster, namespace, name)["status"]["phase"] == "Running"
    assert metric(operator, "finetune_operator_preemptions_total") == 0


@pytest.mark.operator_env(FTO_PREEMPTION_MIN_RUN_SECONDS="20")
def test_a_job_is_not_preempted_before_its_minimum_run_time(
    gpu_nodes: GpuNodes,  # noqa: F811
    cluster: Cluster,
    namespace: str,
    operator: Any,
) -> None:
    cluster.apply(job(gpu_nodes, "low"), namespace)
    cluster.apply(job(gpu_nodes, "blocker", priority=100), namespace)
    wait_phase(cluster, namespace, "low", "Running")
    wait_phase(cluster, namespace, "blocker", "Running")
    cluster.apply(job(gpu_nodes, "high", priority=50), namespace)
    waiting = wait_admitted_reason(cluster, namespace, "high", "InsufficientGPUs")
    assert f"may preempt {namespace}/low (priority 0) in " in waiting["message"], waiting
    assert get_ftj(cluster, namespace, "low")["status"]["phase"] == "Running"
    low = wait_admitted_reason(cluster, namespace, "low", "Preempted")
    assert low["message"].startswith(f"preempted by {namespace}/high (priority 50)")
    wait_phase(cluster, namespace, "high", "Running")
    assert get_ftj(cluster, namespace, "blocker")["status"]["phase"] == "Running", "higher priority"


@pytest.mark.operator_env(FTO_GPU_QUOTA_PER_NAMESPACE="{namespace}=8", **NO_MIN_RUN)
def test_a_namespace_at_its_quota_preempts_within_itself_although_gpus_are_free(
    gpu_nodes: GpuNodes,  # noqa: F811
    cluster: Cluster,
    namespace: str,
    operator: Any,
) -> None:
    cluster.apply(job(gpu_nodes, "low"), namespace)
    wait_phase(cluster, namespace, "low", "Running")
    cluster.apply(job(gpu_nodes, "high", priority=100), namespace)
    wait_phase(cluster, namespace, "high", "Running")
    low = wait_admitted_reason(cluster, namespace, "low", "Preempted")
    assert low["message"].startswith(f"preempted by {namespace}/high (priority 100)")


@pytest.mark.operator_env(**NO_MIN_RUN)
def test_a_job_preempts_only_on_nodes_of_the_gpu_product_it_needs(
    gpu_nodes: GpuNodes,  # noqa: F811
    cluster: Cluster,
    namespace: str,
    operator: Any,
) -> None:
    other = f"TEST-OTHER-{secrets.token_hex(3).upper()}"
    name = f"fto-priority-{other.lower()}"
    labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": other}
    manifest = devcluster.node_manifest(name, "64", "512Gi", 8, labels, [dict(devcluster.GPU_TAINT)])
    cluster.kubectl("create", "-f", "-", input=json.dumps(manifest))
    try:
        wait_for(
            lambda: devcluster.node_ready(kubectl_json(cluster, "get", "node", name)), 60, f"node {name}"
        )
        elsewhere = ftj("elsewhere")
        elsewhere["spec"]["resources"]["gpuProduct"] = other
        # Both of the product's nodes are taken by a job of equal priority; a lower one runs elsewhere.
        cluster.apply([elsewhere, job(gpu_nodes, "peer", size=2, priority=100)], namespace)
        wait_phase(cluster, namespace, "elsewhere", "Running")
        wait_phase(cluster, namespace, "peer", "Running")
        cluster.apply(job(gpu_nodes, "high", priority=100), namespace)
        wait_admitted_reason(cluster, namespace, "high", "InsufficientGPUs")
        assert get_ftj(cluster, namespace, "elsewhere")["status"]["phase"] == "Running"
        assert metric(operator, "finetune_operator_preemptions_total") == 0
    finally:
        cluster.kubectl("delete", "ftj", "elsewhere", "-n", namespace, "--ignore-not-found", "--timeout=60s")
        cluster.kubectl("delete", "node", name, "--ignore-not-found", "--timeout=60s")
