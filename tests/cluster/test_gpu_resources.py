"""Gang admission counts the extended resource the pods request (`resources.gpuResourceName`), per node.

A kwok node with `amd.com/gpu` is made by the test itself (through the API) and removed afterwards; the dev
cluster's own GPU nodes offer only `nvidia.com/gpu`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from hack import devcluster

from tests.cluster.test_finetunejob import condition, ftj, gpu_pool_free, trainer_pods, wait_phase
from tests.kube_helpers import Cluster, KubectlError, wait_for

pytestmark = pytest.mark.cluster

AMD = "amd.com/gpu"


@pytest.fixture
def amd_node_name(cluster: Cluster) -> Iterator[str]:
    """The name of a kwok node with 4 `amd.com/gpu`, created by the test when it wants it; deleted after."""
    name = f"amd-node-{secrets.token_hex(3)}"
    yield name
    cluster.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)


def create_amd_node(cluster: Cluster, name: str, gpus: int = 4) -> None:
    taint = {"key": AMD, "value": "present", "effect": "NoSchedule"}
    node = devcluster.node_manifest(name, "16", "64Gi", 0, {"amd.com/gpu.present": "true"}, [taint])
    for key in ("capacity", "allocatable"):
        node["status"][key][AMD] = str(gpus)
    cluster.kubectl("create", "-f", "-", input=json.dumps(node))

    def ready() -> bool:
        try:
            body = json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)
        except KubectlError:
            return False
        return devcluster.node_ready(body) and body["status"]["allocatable"].get(AMD) == str(gpus)

    wait_for(ready, 60, f"kwok node {name} with {gpus} {AMD} to be Ready")


def amd_ftj(name: str, gpus: int) -> dict[str, Any]:
    body = ftj(name, gpus=gpus)
    body["spec"]["resources"] = {"gpuResourceName": AMD}
    return body


def test_a_job_asking_for_amd_gpus_waits_naming_them_then_runs_where_they_are(
    cluster: Cluster, namespace: str, operator: Any, amd_node_name: str
) -> None:
    gpu_pool_free(cluster)
    # Every nvidia.com/gpu is taken: a job that were counted against them would have to wait.
    cluster.apply([ftj("nvidia-a"), ftj("nvidia-b")], namespace)
    wait_phase(cluster, namespace, "nvidia-a", "Running")
    wait_phase(cluster, namespace, "nvidia-b", "Running")

    cluster.apply(amd_ftj("on-amd", gpus=4), namespace)
    waiting = wait_phase(cluster, namespace, "on-amd", "Queued")
    admitted = condition(waiting, "Admitted")
    assert admitted["reason"] == "InsufficientGPUs"
    assert AMD in admitted["message"], admitted["message"]
    assert not trainer_pods(cluster, namespace, "on-amd")

    create_amd_node(cluster, amd_node_name)
    running = wait_phase(cluster, namespace, "on-amd", "Running", 90)
    assert running["status"]["admission"]["placement"] == [{"rank": 0, "node": amd_node_name, "gpus": 4}]
    (pod,) = trainer_pods(cluster, namespace, "on-amd", 1)
    assert pod["spec"]["nodeName"] == amd_node_name
    requests = pod["spec"]["containers"][0]["resources"]["requests"]
    assert requests[AMD] == "4"
    assert "nvidia.com/gpu" not in requests

    # The node's 4 are now taken: a second job of 4 waits, though nothing changed on the nvidia side.
    cluster.apply(amd_ftj("second-amd", gpus=4), namespace)
    second = condition(wait_phase(cluster, namespace, "second-amd", "Queued"), "Admitted")
    assert second["message"].startswith(f"needs 1 node \N{MULTIPLICATION SIGN} 4 {AMD}; largest free: 0 on ")
    cluster.kubectl("delete", "finetunejob", "on-amd", "second-amd", "-n", namespace, "--timeout=60s")
    wait_for(lambda: not trainer_pods(cluster, namespace, "on-amd"), 60, "the amd pod to go before its node")
