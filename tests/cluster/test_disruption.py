"""Disruptions on the dev cluster: eviction (the Eviction API, as `kubectl drain` uses it) and node loss (the
Node object deleted) each cost the attempt: whole-gang restart, `attempt` + 1, charged against maxRestarts.

Each test gets two fake GPU nodes of its own, with a GPU product no other node has, so its jobs land only
there and the shared 2 x 8 GPU pool of the other tests is neither needed nor touched; the nodes are deleted
afterwards. Every wait is a deadline for something that must happen, never a measurement.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hack import devcluster

from tests.cluster.test_finetunejob import ftj, running_pods, wait_attempt_running, wait_phase
from tests.kube_helpers import Cluster, kubectl_json, terminate, wait_for

pytestmark = pytest.mark.cluster

#: PodGC deletes the pods of a deleted node after a 40 s quarantine, on a 20 s period; then the restart.
NODE_LOSS_TIMEOUT_S = 180


class GpuNodes(NamedTuple):
    product: str
    names: list[str]


@pytest.fixture
def gpu_nodes(cluster: Cluster) -> Iterator[GpuNodes]:
    """Two fake 8-GPU nodes (kwok) with a GPU product of their own. Request it before `namespace` and
    `operator`, so that it is torn down after them: the test's pods are gone before their nodes."""
    suffix = secrets.token_hex(3)
    product = f"TEST-{suffix.upper()}"
    names = [f"fto-disruption-{suffix}-{side}" for side in ("a", "b")]
    labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product}
    manifests = [
        devcluster.node_manifest(name, "64", "512Gi", 8, labels, [dict(devcluster.GPU_TAINT)])
        for name in names
    ]
    try:
        cluster.kubectl(
            "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests})
        )

        def ready() -> bool:
            nodes = kubectl_json(cluster, "get", "nodes", "-l", f"nvidia.com/gpu.product={product}")["items"]
            return len(nodes) == len(names) and all(devcluster.node_ready(n) for n in nodes)

        wait_for(ready, 60, f"nodes {', '.join(names)} to be Ready and untainted")
        yield GpuNodes(product, names)
    finally:
        cluster.kubectl("delete", "nodes", *names, "--ignore-not-found", "--timeout=60s")


def on(nodes: GpuNodes, manifest: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob, asking for the GPU product only `nodes` have."""
    manifest["spec"]["resources"]["gpuProduct"] = nodes.product
    return manifest


class Watch:
    """Every version of one object as the API server's watch delivers it, including the short-lived ones
    (an evicted pod on a kwok node is gone within a second) that polling would miss."""

    def __init__(self, cluster: Cluster, kind: str, name: str, namespace: str, log: Path) -> None:
        self.args = ["get", kind, name, "-n", namespace, "--watch", "--output-watch-events", "-o", "json"]
        self.cluster = cluster
        self.log = log
        self.what = f"{kind} {namespace}/{name}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Watch:
        cmd = [str(self.cluster.kubectl_path), f"--kubeconfig={self.cluster.kubeconfig}", *self.args]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.events, 30, f"the watch on {self.what} to deliver its current state")
        return self

    def __exit__(self, *exc: object) -> None:
        terminate(self.process, 10)

    def events(self) -> list[dict[str, Any]]:
        text = self.log.read_text(errors="replace")
        decoder, at = json.JSONDecoder(), 0
        events: list[dict[str, Any]] = []
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            if at >= len(text):
                return events
            try:
                event, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return events  # the rest is still being written
            events.append(event)

    def objects(self) -> list[dict[str, Any]]:
        return [e["object"] for e in self.events()]

    def deleted(self) -> bool:
        return any(e["type"] == "DELETED" for e in self.events())


def disruption_of(pod_versions: list[dict[str, Any]]) -> dict[str, Any]:
    """The DisruptionTarget condition some version of the pod had ({} if none)."""
    for pod in pod_versions:
        for item in (pod.get("status") or {}).get("conditions") or []:
            if item["type"] == "DisruptionTarget" and item["status"] == "True":
                return dict(item)
    return {}


def evict(cluster: Cluster, namespace: str, pod: str) -> None:
    """POST a policy/v1 Eviction to pods/eviction, as `kubectl drain` does (kubectl has no `evict` verb)."""
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace},
    }
    cluster.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
    )


def gang_restarts(operator: Any) -> dict[str, float]:
    """finetune_operator_gang_restarts_total by reason, from the operator's /metrics."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(operator.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r'^finetune_operator_gang_restarts_total\{reason="([^"]+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def all_pods(cluster: Cluster, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
    """Pods of one attempt, terminating ones included."""
    selector = f"finetune.dev/job={name},finetune.dev/attempt={attempt}"
    items: list[dict[str, Any]] = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", selector)[
        "items"
    ]
    return items


def test_an_evicted_pod_costs_the_attempt_and_the_next_one_resumes_on_the_same_claim(
    gpu_nodes: GpuNodes, cluster: Cluster, namespace: str, operator: Any, tmp_path: Path
) -> None:
    cluster.apply(on(gpu_nodes, ftj("drained", maxRestarts=2)), namespace)
    wait_phase(cluster, namespace, "drained", "Running")
    claim_uid = kubectl_json(cluster, "get", "pvc", "drained-checkpoints", "-n", namespace)["metadata"]["uid"]
    (victim,) = running_pods(cluster, namespace, "drained", 1, 1)
    pod = victim["metadata"]["name"]

    with (
        Watch(cluster, "pod", pod, namespace, tmp_path / "pod.json") as pod_watch,
        Watch(cluster, "finetunejob", "drained", namespace, tmp_path / "ftj.json") as job_watch,
    ):
        evict(cluster, namespace, pod)
        wait_for(pod_watch.deleted, 60, f"the evicted pod {pod} to be gone")
        body = wait_attempt_running(cluster, namespace, "drained", 2)
        wait_for(lambda: job_watch.objects()[-1]["status"].get("attempt") == 2, 30, "the watch to catch up")

    disruption = disruption_of(pod_watch.objects())
    assert disruption.get("reason") == "EvictionByEvictionAPI", pod_watch.objects()[-1]["status"]
    phases = [o["status"].get("phase") for o in job_watch.objects()]
    assert "Restarting" in phases[phases.index("Running") :], phases
    status = body["status"]
    assert status["restarts"] == 1
    assert pod in status["lastFailure"]
    assert re.search("EvictionByEvictionAPI|DisruptionTarget", status["lastFailure"]), status["lastFailure"]
    assert gang_restarts(operator) == {"disruption": 1.0}, "charged as a disruption, not as exit code 143"
    (second,) = running_pods(cluster, namespace, "drained", 2, 1)
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in second["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["drained-checkpoints"]
    same_claim = kubectl_json(cluster, "get", "pvc", "drained-checkpoints", "-n", namespace)
    assert same_claim["metadata"]["uid"] == claim_uid


def test_losing_the_node_restarts_the_job_on_a_spare_node(
    gpu_nodes: GpuNodes, cluster: Cluster, namespace: str, operator: Any, tmp_path: Path
) -> None:
    cluster.apply(on(gpu_nodes, ftj("stranded", maxRestarts=2)), namespace)
    wait_phase(cluster, namespace, "stranded", "Running")
    (first,) = running_pods(cluster, namespace, "stranded", 1, 1)
    pod, lost = first["metadata"]["name"], first["spec"]["nodeName"]
    (spare,) = set(gpu_nodes.names) - {lost}

    with Watch(cluster, "pod", pod, namespace, tmp_path / "pod.json") as pod_watch:
        cluster.kubectl("delete", "node", lost)
        # Nothing stops the pod's containers (its kubelet went with the node): PodGC fails and deletes it.
        body = wait_attempt_running(cluster, namespace, "stranded", 2, NODE_LOSS_TIMEOUT_S)
        wait_for(pod_watch.deleted, 60, f"pod {pod} of the lost node to be gone")

    disruption = disruption_of(pod_watch.objects())
    assert disruption.get("reason") == "DeletionByPodGC", pod_watch.objects()[-1]["status"]
    status = body["status"]
    assert status["restarts"] == 1
    assert pod in status["lastFailure"]
    assert re.search("DeletionByPodGC|DisruptionTarget", status["lastFailure"]), status["lastFailure"]
    assert gang_restarts(operator) == {"disruption": 1.0}
    (second,) = running_pods(cluster, namespace, "stranded", 2, 1)
    assert second["spec"]["nodeName"] == spare
    assert not all_pods(cluster, namespace, "stranded", 1)


def test_evicting_one_pod_of_a_two_node_gang_replaces_the_whole_gang(
    gpu_nodes: GpuNodes, cluster: Cluster, namespace: str, operator: Any, tmp_path: Path
) -> None:
    cluster.apply(on(gpu_nodes, ftj("pair", nodes=2, maxRestarts=2)), namespace)
    wait_phase(cluster, namespace, "pair", "Running")
    first = running_pods(cluster, namespace, "pair", 1, 2)
    assert sorted(p["spec"]["nodeName"] for p in first) == sorted(gpu_nodes.names)
    victim, bystander = (p["metadata"]["name"] for p in first)

    with Watch(cluster, "pod", victim, namespace, tmp_path / "victim.json") as victim_watch:
        evict(cluster, namespace, victim)
        body = wait_attempt_running(cluster, namespace, "pair", 2)
        wait_for(victim_watch.deleted, 30, f"the evicted pod {victim} to be gone")

    assert disruption_of(victim_watch.objects()).get("reason") == "EvictionByEvictionAPI"
    status = body["status"]
    assert status["restarts"] == 1
    assert victim in status["lastFailure"], "the evicted pod is the cause, not its gang-mate stopped with it"
    # The pod that was not evicted went too, with the Job of attempt 1: the gang is replaced as a whole.
    assert not all_pods(cluster, namespace, "pair", 1), f"{bystander} outlived its gang"
    wait_for(
        lambda: cluster.kubectl("get", "job", "pair-a1", "-n", namespace, check=False).returncode != 0,
        30,
        "the Job of attempt 1 to be gone",
    )
    second = running_pods(cluster, namespace, "pair", 2, 2)
    assert {p["metadata"]["uid"] for p in second}.isdisjoint(p["metadata"]["uid"] for p in first)
    assert {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in second} == {
        "0",
        "1",
    }
    assert sorted(p["spec"]["nodeName"] for p in second) == sorted(gpu_nodes.names)
    assert all(
        e["value"] == "pair-a2-0.pair"
        for p in second
        for e in p["spec"]["containers"][0]["env"]
        if e["name"] == "PET_MASTER_ADDR"
    )
