"""Preemption for real: a priority-100 job preempts a running priority-0 one, whose trainer (run on this
machine by hack/pod_runner.py, as in test_lifecycle.py) gets SIGTERM from the graceful pod deletion, saves a
checkpoint and exits 10; the preempted job waits in the queue with its attempt and restarts unchanged, and
when the high-priority job has finished it resumes from that checkpoint and completes the curve."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hack import devcluster, pod_runner
from hack.make_tiny_model import TinyAssets

from finetune_trainer.exit_codes import ExitCode
from tests.e2e.test_lifecycle import (
    claim_dir,
    condition,
    finetunejob,
    get_job,
    running_trainer_pod,
    tiny,  # noqa: F401 (a fixture)
    volume_dir,
    wait_condition,
)
from tests.kube_helpers import Cluster, OperatorProcess, kubectl_json, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(pod_runner.cannot_run_pods() is not None, reason=str(pod_runner.cannot_run_pods())),
]


@pytest.fixture
def one_gpu_node(cluster: Cluster) -> Iterator[str]:
    """A fake node with one GPU of a product of its own: the two jobs compete for it and nothing else.
    Requested before `namespace` and `operator`, so it is deleted after them."""
    product = f"TEST-PREEMPT-{secrets.token_hex(3).upper()}"
    name = f"fto-{product.lower()}"
    labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product}
    manifest = devcluster.node_manifest(name, "16", "64Gi", 1, labels, [dict(devcluster.GPU_TAINT)])
    cluster.kubectl("create", "-f", "-", input=json.dumps(manifest))
    try:
        wait_for(
            lambda: devcluster.node_ready(kubectl_json(cluster, "get", "node", name)), 60, f"node {name}"
        )
        yield product
    finally:
        cluster.kubectl("delete", "node", name, "--ignore-not-found", "--timeout=60s")


def job_on(product: str, name: str, assets: TinyAssets, steps: int, priority: int) -> dict[str, Any]:
    manifest = finetunejob(name, assets.model_dir, assets.data_path, max_steps=steps)
    manifest["spec"]["resources"] = {"gpuProduct": product}
    manifest["spec"]["scheduling"] = {"priority": priority, "maxRestarts": 0}
    return manifest


@pytest.mark.operator_env(FTO_PREEMPTION_MIN_RUN_SECONDS="0")
@pytest.mark.timeout(1500)  # three trainer runs: the preempted one, the preemptor, the resumed one
def test_a_preempted_trainer_checkpoints_waits_and_resumes_from_its_checkpoint(
    one_gpu_node: str,
    cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    tiny: TinyAssets,  # noqa: F811
    tmp_path: Path,
) -> None:
    steps = 600  # long enough that the preemption lands well before the end (see the SIGKILL test)
    cluster.apply(job_on(one_gpu_node, "low", tiny, steps, priority=0), namespace)
    first = running_trainer_pod(cluster, namespace, "low", attempt=1)
    checkpoints = volume_dir(cluster, namespace, first, "/workspace/checkpoints")
    kube = pod_runner.Kube(kubectl=cluster.kubectl_path, kubeconfig=cluster.kubeconfig)
    runs: list[pod_runner.PodRun] = []
    runner = threading.Thread(
        target=lambda: runs.append(
            pod_runner.run_pod(kube, namespace, first["metadata"]["name"], log_path=tmp_path / "low-1.log")
        )
    )
    runner.start()
    wait_for(
        lambda: runs or any(checkpoints.glob("step-*/COMPLETE")),
        300,
        "a first checkpoint of low",
        interval=0.05,
    )
    assert not runs, f"low ended before it was preempted: {runs[0].log()}"

    # maxRestarts 0: had the preemption been charged as a failure, low would fail instead of waiting.
    cluster.apply(job_on(one_gpu_node, "high", tiny, 30, priority=100), namespace)
    runner.join(300)
    [preempted] = runs
    assert preempted.exit_code == ExitCode.PREEMPTED, preempted.log()
    saved = max(int(p.parent.name.removeprefix("step-")) for p in checkpoints.glob("step-*/COMPLETE"))
    assert saved < steps
    low = get_job(cluster, namespace, "low")
    assert low["status"]["phase"] == "Queued", low["status"]
    admitted = condition(low, "Admitted")
    assert admitted is not None
    assert admitted["reason"] == "Preempted", admitted
    assert admitted["message"].startswith(f"preempted by {namespace}/high (priority 100)")
    assert low["status"]["attempt"] == 1
    assert low["status"].get("restarts", 0) == 0

    high = running_trainer_pod(cluster, namespace, "high", attempt=1)
    run = pod_runner.run_pod(kube, namespace, high["metadata"]["name"], log_path=tmp_path / "high.log")
    assert run.exit_code == 0, run.log()
    wait_condition(cluster, namespace, "high", "Succeeded")

    second = running_trainer_pod(cluster, namespace, "low", attempt=2)
    assert volume_dir(cluster, namespace, second, "/workspace/checkpoints") == checkpoints
    run = pod_runner.run_pod(kube, namespace, second["metadata"]["name"], log_path=tmp_path / "low-2.log")
    assert run.exit_code == 0, run.log()
    done = wait_condition(cluster, namespace, "low", "Succeeded")
    assert done["status"]["attempt"] == 2
    assert done["status"].get("restarts", 0) == 0
    assert done["status"]["progress"]["step"] == steps
    output = claim_dir(cluster, namespace, done["status"]["artifact"]["modelCard"]).parent
    events = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    [stopped] = [e for e in events if e["event"] == "preempted"]
    assert stopped["step"] == saved, "the checkpoint on SIGTERM is the newest one"
    [resumed] = [e for e in events if e["event"] == "resume"]
    assert resumed["step"] == saved, "the second attempt resumed from the preemption's checkpoint"
    # The loss curve goes on from there instead of starting again from the untrained model.
    position = events.index(resumed)
    before = [e for e in events[:position] if e["event"] == "train"]
    after = [e for e in events[position:] if e["event"] == "train"]
    assert before
    assert after
    assert after[0]["step"] > saved
    assert after[0]["loss"] < before[0]["loss"], (before[0], after[0])
