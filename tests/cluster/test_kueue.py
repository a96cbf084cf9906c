"""FineTuneJobs with `scheduling.queueName` against a real Kueue (v0.17, tests/kueue_helpers.py) on the dev
cluster: Kueue admits the gang, the operator doesn't.

The operator creates the Job suspended with the label `kueue.x-k8s.io/queue-name`; Kueue makes a Workload
for it, reserves quota in a ClusterQueue and unsuspends the Job; the FineTuneJob's `Admitted` condition
follows (`WaitingForKueue` -> `AdmittedByKueue`). Every wait is a deadline for something that must happen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hack import devcluster

from tests.cluster.test_finetunejob import (
    H100,
    condition,
    end_pod,
    ftj,
    get_ftj,
    gpu_pool_free,
    running_pods,
    wait_phase,
)
from tests.kube_helpers import Cluster, finish_pod, kubectl_json, wait_for
from tests.kueue_helpers import (
    KUEUE_API,
    QUEUE_LABEL,
    KueueManager,
    apply_kueue_crds,
    exclusive,
    kueue_bin_dir,
)

pytestmark = pytest.mark.cluster

GPU = devcluster.GPU_RESOURCE


@pytest.fixture(scope="module")
def kueue(
    cluster: Cluster, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KueueManager]:
    """Kueue's CRDs applied and its manager running; afterwards the manager is stopped. The CRDs stay, like
    ours (the `queues` fixture removes every Kueue object): deleting a CRD seconds after creating it can meet
    the API server's "storage is (re)initializing" and stay Terminating for minutes."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        bin_dir = kueue_bin_dir()  # a cold build shows its progress
    with exclusive(devcluster.Layout.default().root):
        apply_kueue_crds(cluster, bin_dir.parent / "crds")
        manager = KueueManager(bin_dir / "kueue", cluster.kubeconfig, tmp_path_factory.mktemp("kueue"))
        try:
            manager.start()
            yield manager
        finally:
            manager.stop()


@dataclass(frozen=True)
class Queues:
    flavor: str
    cluster_queue: str
    local_queue: str


@pytest.fixture
def queues(
    cluster: Cluster, namespace: str, kueue: KueueManager, request: pytest.FixtureRequest
) -> Iterator[Queues]:
    """A ResourceFlavor for the fake H100 nodes, a ClusterQueue with 8 GPUs of it (held: admits nothing until
    the test lets it), and a LocalQueue in the test namespace. Removed afterwards while Kueue still runs (its
    finalizers), after the FineTuneJobs, their Jobs and Kueue's Workloads are gone."""
    q = Queues(flavor=f"h100-{namespace}", cluster_queue=f"gpus-{namespace}", local_queue="training")
    cluster.apply(
        [
            {
                "apiVersion": KUEUE_API,
                "kind": "ResourceFlavor",
                "metadata": {"name": q.flavor},
                "spec": {
                    "nodeLabels": {"nvidia.com/gpu.product": H100},
                    "nodeTaints": [dict(devcluster.GPU_TAINT)],
                },
            },
            {
                "apiVersion": KUEUE_API,
                "kind": "ClusterQueue",
                "metadata": {"name": q.cluster_queue},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "stopPolicy": "Hold",
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", GPU],
                            "flavors": [
                                {
                                    "name": q.flavor,
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": "64"},
                                        {"name": "memory", "nominalQuota": "512Gi"},
                                        {"name": GPU, "nominalQuota": "8"},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
            {
                "apiVersion": KUEUE_API,
                "kind": "LocalQueue",
                "metadata": {"name": q.local_queue, "namespace": namespace},
                "spec": {"clusterQueue": q.cluster_queue},
            },
        ]
    )
    try:
        yield q
    finally:
        cluster.kubectl("delete", "finetunejobs", "--all", "-n", namespace, "--timeout=60s", check=False)
        cluster.kubectl("delete", "jobs.batch", "--all", "-n", namespace, "--timeout=60s", check=False)
        cluster.kubectl(
            "delete", "workloads.kueue.x-k8s.io", "--all", "-n", namespace, "--timeout=60s", check=False
        )
        cluster.kubectl("delete", "localqueue", q.local_queue, "-n", namespace, "--timeout=60s", check=False)
        cluster.kubectl("delete", "clusterqueue", q.cluster_queue, "--timeout=60s", check=False)
        cluster.kubectl("delete", "resourceflavor", q.flavor, "--timeout=60s", check=False)
        report = getattr(request.node, "report_call", None)
        if report is None or report.failed:
            print(f"----- Kueue log ({kueue.log_path}) -----\n{kueue.logs()[-20000:]}")


def release(cluster: Cluster, queues: Queues) -> None:
    """Let the (held) ClusterQueue admit."""
    cluster.kubectl(
        "patch", "clusterqueue", queues.cluster_queue, "--type=merge", "-p", '{"spec":{"stopPolicy":"None"}}'
    )


def trainer_job(cluster: Cluster, namespace: str, name: str, attempt: int = 1) -> dict[str, Any]:
    """The FineTuneJob's batch Job of `attempt`, once the operator has created it."""
    selector = f"finetune.dev/job={name},finetune.dev/attempt={attempt}"

    def created() -> dict[str, Any] | None:
        items = kubectl_json(cluster, "get", "jobs", "-n", namespace, "-l", selector)["items"]
        return items[0] if items else None

    try:
        job: dict[str, Any] = wait_for(created, 60, f"the batch Job of FineTuneJob {name}, attempt {attempt}")
    except AssertionError as err:
        jobs = kubectl_json(cluster, "get", "jobs", "-n", namespace, "-l", f"finetune.dev/job={name}")[
            "items"
        ]
        seen = [(j["metadata"]["name"], j["metadata"].get("creationTimestamp"), j["status"]) for j in jobs]
        status = get_ftj(cluster, namespace, name).get("status")
        raise AssertionError(f"{err}; its Jobs: {seen}; FineTuneJob status: {status}") from None
    return job


def job_suspended(cluster: Cluster, namespace: str, job: str) -> bool:
    return bool(kubectl_json(cluster, "get", "job", job, "-n", namespace)["spec"].get("suspend"))


def workload_of(cluster: Cluster, namespace: str, job: str) -> dict[str, Any]:
    """Kueue's Workload for the batch Job `job` (the Workload's owner)."""

    def made() -> dict[str, Any] | None:
        for item in kubectl_json(cluster, "get", "workloads", "-n", namespace)["items"]:
            owners = item["metadata"].get("ownerReferences") or []
            if any(o["kind"] == "Job" and o["name"] == job for o in owners):
                return dict(item)
        return None

    workload: dict[str, Any] = wait_for(made, 60, f"Kueue's Workload for Job {job}")
    return workload


def wait_workload_condition(
    cluster: Cluster, namespace: str, job: str, type_: str, status: str
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = workload_of(cluster, namespace, job)
        return last if condition(last, type_).get("status") == status else None

    try:
        return wait_for(reached, 60, f"Workload of Job {job} to have {type_}={status}")
    except AssertionError as err:
        raise AssertionError(f"{err}; its status: {last.get('status')}") from None


def wait_admitted_by_kueue(
    cluster: Cluster, namespace: str, name: str, job: str, attempt: int = 1
) -> dict[str, Any]:
    wait_for(
        lambda: not job_suspended(cluster, namespace, job), 60, f"Kueue to unsuspend Job {job} of {name}"
    )
    body = wait_phase(cluster, namespace, name, "Running")
    admitted = condition(body, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("True", "AdmittedByKueue"), (
        f"FineTuneJob {name}'s Admitted condition once Kueue unsuspended its Job: {admitted}"
    )
    running_pods(cluster, namespace, name, attempt, 1)
    return body


def assert_waiting_for_kueue(cluster: Cluster, namespace: str, name: str, job: str) -> None:
    body = get_ftj(cluster, namespace, name)
    admitted = condition(body, "Admitted")
    assert (admitted.get("status"), admitted.get("reason")) == ("False", "WaitingForKueue"), (
        f"FineTuneJob {name}'s Admitted condition while Kueue holds its Job: {admitted}"
    )
    assert body["status"]["phase"] == "Queued", f"FineTuneJob {name}'s phase while waiting for Kueue"
    assert job_suspended(cluster, namespace, job), f"Job {job} is still suspended while Kueue holds it"
    assert not [
        p for p in kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
    ], f"Job {job} has no pods while suspended"


def largest_free_gpus(cluster: Cluster) -> int:
    """The most free fake GPUs on one node: allocatable minus the requests of non-terminated pods on it."""
    nodes = kubectl_json(cluster, "get", "nodes")["items"]
    free = {n["metadata"]["name"]: int(n["status"].get("allocatable", {}).get(GPU, "0")) for n in nodes}
    for pod in kubectl_json(cluster, "get", "pods", "-A")["items"]:
        node = pod["spec"].get("nodeName")
        if node in free and pod["status"].get("phase") not in ("Succeeded", "Failed"):
            for container in pod["spec"]["containers"]:
                free[node] -= int(container.get("resources", {}).get("requests", {}).get(GPU, "0"))
    return max(free.values(), default=0)


def test_kueue_admits_queued_finetunejobs_and_the_operator_does_not(
    cluster: Cluster, namespace: str, operator: Any, queues: Queues
) -> None:
    gpu_pool_free(cluster)
    ns = namespace

    # A: the operator creates its Job suspended and labelled; Kueue (its ClusterQueue held) admits nothing.
    cluster.apply(ftj("kueue-a", queueName=queues.local_queue), ns)
    job_a = trainer_job(cluster, ns, "kueue-a")
    name_a = job_a["metadata"]["name"]
    assert job_a["metadata"]["labels"].get(QUEUE_LABEL) == queues.local_queue, (
        f"Job {name_a} carries the label {QUEUE_LABEL}={queues.local_queue}: {job_a['metadata']['labels']}"
    )
    assert job_a["spec"].get("suspend") is True, f"Job {name_a} was created suspended: {job_a['spec']}"
    workload_a = workload_of(cluster, ns, name_a)
    assert workload_a["spec"]["queueName"] == queues.local_queue, (
        f"Kueue's Workload {workload_a['metadata']['name']} is in LocalQueue {queues.local_queue}"
    )
    wait_phase(cluster, ns, "kueue-a", "Queued")
    assert_waiting_for_kueue(cluster, ns, "kueue-a", name_a)

    # Kueue may admit: A gets the ClusterQueue's 8 GPUs, its Job is unsuspended, the FineTuneJob runs.
    release(cluster, queues)
    wait_admitted_by_kueue(cluster, ns, "kueue-a", name_a)
    admitted_a = wait_workload_condition(cluster, ns, name_a, "Admitted", "True")
    admission = admitted_a["status"]["admission"]
    assert admission["clusterQueue"] == queues.cluster_queue, f"Workload of {name_a} admitted by: {admission}"
    assert admission["podSetAssignments"][0]["flavors"].get(GPU) == queues.flavor, (
        f"Workload of {name_a} got its GPUs from flavor {queues.flavor}: {admission['podSetAssignments']}"
    )

    # B, same size, same queue: the ClusterQueue's quota is used up, so Kueue keeps it waiting, although a
    # node still has 8 free GPUs: the operator does not admit it on its own.
    cluster.apply(ftj("kueue-b", queueName=queues.local_queue), ns)
    name_b = trainer_job(cluster, ns, "kueue-b")["metadata"]["name"]
    pending_b = wait_workload_condition(cluster, ns, name_b, "QuotaReserved", "False")
    reserved = condition(pending_b, "QuotaReserved")
    assert f"insufficient unused quota for {GPU}" in reserved.get("message", ""), (
        f"Kueue keeps Job {name_b} waiting for GPU quota: {reserved}"
    )
    wait_phase(cluster, ns, "kueue-b", "Queued")
    assert_waiting_for_kueue(cluster, ns, "kueue-b", name_b)
    assert largest_free_gpus(cluster) >= 8, (
        "a node has 8 free GPUs while B waits (only Kueue's quota is full)"
    )

    # A finishes: Kueue sees its Workload finished, frees the quota and admits B.
    (pod_a,) = running_pods(cluster, ns, "kueue-a", 1, 1)
    finish_pod(cluster, ns, pod_a["metadata"]["name"], 0)
    wait_phase(cluster, ns, "kueue-a", "Succeeded")
    wait_workload_condition(cluster, ns, name_a, "Finished", "True")
    wait_admitted_by_kueue(cluster, ns, "kueue-b", name_b)
    wait_workload_condition(cluster, ns, name_b, "Admitted", "True")


def test_a_failed_attempt_restarts_the_gang_through_kueue(
    cluster: Cluster, namespace: str, operator: Any, queues: Queues
) -> None:
    gpu_pool_free(cluster)
    release(cluster, queues)
    cluster.apply(ftj("kueue-r", queueName=queues.local_queue, maxRestarts=1), namespace)
    first = trainer_job(cluster, namespace, "kueue-r", 1)["metadata"]["name"]
    wait_admitted_by_kueue(cluster, namespace, "kueue-r", first)
    (pod,) = running_pods(cluster, namespace, "kueue-r", 1, 1)
    end_pod(cluster, namespace, pod, 1)

    # The whole gang restarts as attempt 2: a new Job, again suspended and labelled, admitted by Kueue.
    second = trainer_job(cluster, namespace, "kueue-r", 2)
    assert second["metadata"]["labels"].get(QUEUE_LABEL) == queues.local_queue, (
        f"attempt 2's Job carries {QUEUE_LABEL}: {second['metadata']['labels']}"
    )
    body = wait_admitted_by_kueue(cluster, namespace, "kueue-r", second["metadata"]["name"], attempt=2)
    assert (body["status"]["attempt"], body["status"]["restarts"]) == (2, 1), (
        f"FineTuneJob kueue-r's attempt and restarts after one failed attempt: {body['status']}"
    )
    wait_workload_condition(cluster, namespace, second["metadata"]["name"], "Admitted", "True")
    jobs = kubectl_json(cluster, "get", "jobs", "-n", namespace, "-l", "finetune.dev/job=kueue-r")["items"]
    assert [j["metadata"]["name"] for j in jobs] == [second["metadata"]["name"]], (
        "attempt 1's Job is gone and not created again; only attempt 2's is left"
    )
