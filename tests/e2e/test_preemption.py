"""Preemption for real: a priority-100 job preempts a running priority-0 one, whose trainer (run on this
machine by the local node's agent, as in test_lifecycle.py) gets SIGTERM from the graceful pod deletion, saves
a checkpoint and exits 10; the preempted job waits in the queue with its attempt and restarts unchanged, and
when the high-priority job has finished it resumes from that checkpoint and completes the curve."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hack.make_tiny_model import TinyAssets

from tests.e2e.test_lifecycle import (
    claim_dir,
    condition,
    ended_pod,
    exit_code,
    finetunejob,
    get_job,
    running_trainer_pod,
    tiny,  # noqa: F401 (a fixture)
    trainer_log,
    volume_dir,
    wait_condition,
)
from tests.kube_helpers import Cluster, LocalNode, OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GPU = "nvidia.com/gpu"


@pytest.fixture
def one_free_gpu(cluster: Cluster, namespace: str, local_node: LocalNode) -> None:
    """The local node with one GPU free: a pod of this test's namespace holds the others, so that the two
    jobs compete for that one."""
    node = kubectl_json(cluster, "get", "node", local_node.name)
    others = int(node["status"]["allocatable"][GPU]) - 1
    if not others:
        return
    filler = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gpu-filler"},
        "spec": {
            **LocalNode.placement(),
            "containers": [
                {
                    "name": "sleep",
                    "image": "busybox",
                    "command": ["sleep", "3600"],
                    "resources": {"limits": {GPU: str(others)}},
                }
            ],
            "terminationGracePeriodSeconds": 1,
        },
    }
    cluster.apply(filler, namespace)
    cluster.kubectl("wait", "--for=condition=Ready", "pod/gpu-filler", "-n", namespace, "--timeout=60s")


def job_on(name: str, assets: TinyAssets, steps: int, priority: int) -> dict[str, Any]:
    manifest = finetunejob(name, assets.model_dir, assets.data_path, max_steps=steps)
    manifest["spec"]["scheduling"] = {"priority": priority, "maxRestarts": 0}
    return manifest


@pytest.mark.operator_env(FTO_PREEMPTION_MIN_RUN_SECONDS="0")
@pytest.mark.timeout(1500)  # three trainer runs: the preempted one, the preemptor, the resumed one
def test_a_preempted_trainer_checkpoints_waits_and_resumes_from_its_checkpoint(
    one_free_gpu: None,
    cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    tiny: TinyAssets,  # noqa: F811
) -> None:
    steps = 600  # long enough that the preemption lands well before the end (see the SIGKILL test)
    cluster.apply(job_on("low", tiny, steps, priority=0), namespace)
    first = running_trainer_pod(cluster, namespace, "low", attempt=1)
    checkpoints = volume_dir(cluster, namespace, first, "/workspace/checkpoints")

    def low_state() -> str | None:
        phase = kubectl_json(cluster, "get", "pod", first["metadata"]["name"], "-n", namespace)["status"]
        if phase.get("phase") in ("Succeeded", "Failed"):
            return "ended"
        return "checkpointed" if any(checkpoints.glob("step-*/COMPLETE")) else None

    state = wait_for(low_state, 300, "a first checkpoint of low", interval=0.05)
    assert state == "checkpointed", (
        f"low ended before it was preempted: {trainer_log(cluster, namespace, first['metadata']['name'])}"
    )

    # maxRestarts 0: had the preemption been charged as a failure, low would fail instead of waiting.
    cluster.apply(job_on("high", tiny, 30, priority=100), namespace)
    # The graceful deletion ends low's trainer (SIGTERM: it checkpoints and exits 10) and the pod goes; the
    # exit code shows in the trainer's own record below ("preempted" at the saved step).
    wait_for(
        lambda: (
            not cluster.kubectl(
                "get", "pod", first["metadata"]["name"], "-n", namespace, "--ignore-not-found", "-o", "name"
            ).stdout.strip()
        ),
        300,
        "low's preempted pod to be gone",
    )
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
    ended = ended_pod(cluster, namespace, high["metadata"]["name"])
    assert exit_code(ended) == 0, trainer_log(cluster, namespace, high["metadata"]["name"])
    wait_condition(cluster, namespace, "high", "Succeeded")

    second = running_trainer_pod(cluster, namespace, "low", attempt=2)
    assert volume_dir(cluster, namespace, second, "/workspace/checkpoints") == checkpoints
    ended = ended_pod(cluster, namespace, second["metadata"]["name"])
    assert exit_code(ended) == 0, trainer_log(cluster, namespace, second["metadata"]["name"])
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
