"""FineTuneJob against the dev cluster: admission, gang placement, priority, restarts, exit codes,
suspend/resume, deadline, TTL, deletion, the trainer's permissions, and the operator-trainer contract.

Fake nodes (hack/devcluster): gpu-node-0 and gpu-node-1 with 8 GPUs each, product
NVIDIA-H100-80GB-HBM3, tainted nvidia.com/gpu=present:NoSchedule. kwok runs pods until a test ends them
(finish_pod). Every wait is a deadline for something that must happen, never a measurement.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_trainer.config import TrainerConfig
from finetune_trainer.launch import pod_command
from tests.kube_helpers import EXIT_CODE_ANNOTATION, Cluster, finish_pod, kubectl_json, wait_for

pytestmark = pytest.mark.cluster

H100 = "NVIDIA-H100-80GB-HBM3"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMES = "\N{MULTIPLICATION SIGN}"
CHILD_KINDS = "serviceaccounts,roles,rolebindings,configmaps,services,persistentvolumeclaims,jobs"


def ftj(name: str, nodes: int = 1, gpus: int = 8, **scheduling: Any) -> dict[str, Any]:
    scheduling.setdefault("backoffSeconds", 0)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "model": {"source": "file:///models/tiny"},
            "dataset": {"source": "file:///data/tiny.jsonl"},
            "distributed": {
                "nodes": nodes,
                "gpusPerNode": gpus,
                **({"precision": "fp32"} if not gpus else {}),
            },
            "resources": {"gpuProduct": H100} if gpus else {},
            "scheduling": scheduling,
        },
    }


def get_ftj(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = kubectl_json(cluster, "get", "finetunejob", name, "-n", namespace)
    return body


def finalizers(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return list(get_ftj(cluster, namespace, name)["metadata"].get("finalizers") or [])


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    for item in (body.get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    return {}


def wait_phase(
    cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 120
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = get_ftj(cluster, namespace, name)
        return last if (last.get("status") or {}).get("phase") == phase else None

    try:
        return wait_for(reached, timeout, f"FineTuneJob {name} to be {phase}")
    except AssertionError as err:
        raise AssertionError(f"{err}; status: {json.dumps(last.get('status'), indent=1)}") from None


def gpu_pool_free(cluster: Cluster) -> None:
    """Wait until no pod (of any namespace: other tests share the dev cluster) holds a fake GPU, since
    these tests reason about the whole 2 x 8 pool."""

    def free() -> bool:
        pods = kubectl_json(cluster, "get", "pods", "-A", "--field-selector", "status.phase=Running")["items"]
        return not any(
            c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu")
            for p in pods
            for c in p["spec"]["containers"]
        )

    wait_for(free, 300, "every fake GPU to be free (other tests finish)", interval=2)


def wait_attempt_running(
    cluster: Cluster, namespace: str, name: str, attempt: int, timeout: float = 90
) -> dict[str, Any]:
    """Wait until the FineTuneJob runs attempt `attempt`; return its body."""

    def reached() -> dict[str, Any] | None:
        body = get_ftj(cluster, namespace, name)
        status = body.get("status") or {}
        return body if status.get("attempt") == attempt and status.get("phase") == "Running" else None

    return wait_for(reached, timeout, f"FineTuneJob {name} to run attempt {attempt}")


def end_pod(cluster: Cluster, namespace: str, pod: dict[str, Any], exit_code: int) -> None:
    """Make kwok end the pod with `exit_code`, without waiting: the operator may delete it at once."""
    name = pod["metadata"]["name"]
    cluster.kubectl("annotate", "pod", name, "-n", namespace, f"{EXIT_CODE_ANNOTATION}={exit_code}")


def trainer_pods(
    cluster: Cluster, namespace: str, name: str, attempt: int | None = None
) -> list[dict[str, Any]]:
    selector = f"finetune.dev/job={name}" + (f",finetune.dev/attempt={attempt}" if attempt else "")
    items: list[dict[str, Any]] = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", selector)[
        "items"
    ]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def running_pods(
    cluster: Cluster, namespace: str, name: str, attempt: int, count: int
) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = [
            p
            for p in trainer_pods(cluster, namespace, name, attempt)
            if p["status"].get("phase") == "Running"
        ]
        return pods if len(pods) == count else None

    return wait_for(ready, 60, f"{count} running pods of {name} attempt {attempt}")


def test_three_single_node_jobs_on_two_nodes_one_waits_then_is_admitted(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    gpu_pool_free(cluster)
    cluster.apply([ftj("first"), ftj("second")], namespace)
    wait_phase(cluster, namespace, "first", "Running")
    wait_phase(cluster, namespace, "second", "Running")
    cluster.apply(ftj("third"), namespace)
    waiting = wait_phase(cluster, namespace, "third", "Queued")
    admitted = condition(waiting, "Admitted")
    assert admitted["status"] == "False"
    assert admitted["reason"] == "InsufficientGPUs"
    prefix = f"needs 1 node {TIMES} 8 GPUs (nvidia.com/gpu.product={H100}); largest free: "
    assert admitted["message"].startswith(prefix), admitted["message"]
    largest = re.fullmatch(
        r"(\d+) on gpu-node-[01], (\d+) on gpu-node-[01]", admitted["message"][len(prefix) :]
    )
    assert largest is not None, admitted["message"]
    assert all(int(free) < 8 for free in largest.groups())
    assert waiting["status"]["queuedSince"]
    assert not trainer_pods(cluster, namespace, "third"), "a waiting job has no pods"

    (pod,) = trainer_pods(cluster, namespace, "first", 1)
    finish_pod(cluster, namespace, pod["metadata"]["name"], 0)
    done = wait_phase(cluster, namespace, "first", "Succeeded")
    assert condition(done, "Succeeded")["status"] == "True"
    assert done["status"]["completionTime"]
    third = wait_phase(cluster, namespace, "third", "Running")
    assert condition(third, "Admitted")["reason"] == "GangAdmitted"
    assert "queuedSince" not in third["status"]
    assert third["status"]["attempt"] == 1
    events = kubectl_json(
        cluster, "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=third"
    )
    assert {"InsufficientGPUs", "AllPodsRunning"} <= {e["reason"] for e in events["items"]}


def test_two_node_gang_gets_one_pod_per_node_wired_for_torchrun(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    gpu_pool_free(cluster)
    cluster.apply(ftj("gang", nodes=2), namespace)
    body = wait_phase(cluster, namespace, "gang", "Running")
    pods = running_pods(cluster, namespace, "gang", 1, 2)
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["gpu-node-0", "gpu-node-1"]
    placement = body["status"]["admission"]["placement"]
    assert sorted(p["node"] for p in placement) == ["gpu-node-0", "gpu-node-1"]
    ranks = set()
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["PET_NNODES"]["value"] == "2"
        assert env["PET_NPROC_PER_NODE"]["value"] == "8"
        assert env["PET_MASTER_ADDR"]["value"] == "gang-a1-0.gang"
        assert pod["spec"]["subdomain"] == "gang"
        ranks.add(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
        assert (
            pod["spec"]["hostname"]
            == f"gang-a1-{pod['metadata']['annotations']['batch.kubernetes.io/job-completion-index']}"
        )
    assert ranks == {"0", "1"}


def test_higher_priority_job_overtakes_a_waiting_one(cluster: Cluster, namespace: str, operator: Any) -> None:
    gpu_pool_free(cluster)
    cluster.apply([ftj("run-a"), ftj("run-b")], namespace)
    wait_phase(cluster, namespace, "run-a", "Running")
    wait_phase(cluster, namespace, "run-b", "Running")
    cluster.apply(ftj("low", priority=0), namespace)
    wait_phase(cluster, namespace, "low", "Queued")
    cluster.apply(ftj("high", priority=100), namespace)
    high = wait_phase(cluster, namespace, "high", "Queued")
    assert wait_for(
        lambda: get_ftj(cluster, namespace, "low")["status"].get("admission", {}).get("queuePosition") == 2,
        30,
        "the older low-priority job to move to position 2",
    )
    assert high["status"]["admission"]["queuePosition"] == 1
    (pod,) = trainer_pods(cluster, namespace, "run-a", 1)
    finish_pod(cluster, namespace, pod["metadata"]["name"], 0)
    wait_phase(cluster, namespace, "high", "Running")
    assert get_ftj(cluster, namespace, "low")["status"]["phase"] == "Queued"


def test_pod_failure_restarts_the_gang_on_the_same_pvc_until_max_restarts(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    gpu_pool_free(cluster)
    cluster.apply(ftj("flaky", nodes=2, maxRestarts=1), namespace)
    wait_phase(cluster, namespace, "flaky", "Running")
    pvc_uid = kubectl_json(cluster, "get", "pvc", "flaky-checkpoints", "-n", namespace)["metadata"]["uid"]
    first = running_pods(cluster, namespace, "flaky", 1, 2)
    end_pod(cluster, namespace, first[0], 1)

    body = wait_attempt_running(cluster, namespace, "flaky", 2)
    assert body["status"]["restarts"] == 1
    assert "exit code 1" in body["status"]["lastFailure"]
    assert not trainer_pods(cluster, namespace, "flaky", 1), "the whole first gang is gone"
    second = running_pods(cluster, namespace, "flaky", 2, 2)
    for pod in second:
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["flaky-checkpoints"]
    assert (
        kubectl_json(cluster, "get", "pvc", "flaky-checkpoints", "-n", namespace)["metadata"]["uid"]
        == pvc_uid
    )
    restarting = [
        e
        for e in kubectl_json(cluster, "get", "events", "-n", namespace)["items"]
        if e["reason"] == "Restarting"
    ]
    assert restarting
    assert restarting[0]["type"] == "Warning"

    end_pod(cluster, namespace, second[1], 137)
    failed = wait_phase(cluster, namespace, "flaky", "Failed", 90)
    reason = condition(failed, "Failed")
    assert reason["reason"] == "BackoffLimitExceeded"
    assert "exit code 137" in reason["message"]
    assert failed["status"]["attempt"] == 2

    def nothing_runs() -> bool:
        pods = trainer_pods(cluster, namespace, "flaky")
        return all(p["status"].get("phase") in ("Failed", "Succeeded") for p in pods)

    wait_for(nothing_runs, 60, "no pod running after the final failure (failed ones stay for their logs)")
    # Terminal states are sticky: nothing restarts it later.
    assert get_ftj(cluster, namespace, "flaky")["status"]["phase"] == "Failed"


def test_non_retryable_exit_code_fails_at_once(cluster: Cluster, namespace: str, operator: Any) -> None:
    cluster.apply(ftj("badconfig", maxRestarts=5), namespace)
    wait_phase(cluster, namespace, "badconfig", "Running")
    (pod,) = trainer_pods(cluster, namespace, "badconfig", 1)
    finish_pod(cluster, namespace, pod["metadata"]["name"], 3)
    failed = wait_phase(cluster, namespace, "badconfig", "Failed")
    assert condition(failed, "Failed")["reason"] == "InvalidTrainerConfig"
    assert failed["status"]["attempt"] == 1
    assert failed["status"].get("restarts", 0) == 0
    jobs = kubectl_json(cluster, "get", "jobs", "-n", namespace, "-l", "finetune.dev/job=badconfig")["items"]
    assert all(j["metadata"]["name"] == "badconfig-a1" for j in jobs), "no second attempt"


def test_suspend_deletes_pods_keeps_pvc_and_resume_starts_a_new_attempt(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    cluster.apply(ftj("pausable"), namespace)
    wait_phase(cluster, namespace, "pausable", "Running")
    pvc_uid = kubectl_json(cluster, "get", "pvc", "pausable-checkpoints", "-n", namespace)["metadata"]["uid"]
    patch = json.dumps({"spec": {"scheduling": {"suspend": True}}})
    cluster.kubectl("patch", "finetunejob", "pausable", "-n", namespace, "--type=merge", "-p", patch)
    suspended = wait_phase(cluster, namespace, "pausable", "Suspended")
    assert condition(suspended, "Suspended")["status"] == "True"
    assert condition(suspended, "Admitted")["status"] == "False"
    wait_for(lambda: not trainer_pods(cluster, namespace, "pausable"), 60, "pods deleted on suspend")
    # The finalizer guards running gangs only (like Kueue's resource-in-use): a suspended job has none.
    wait_for(lambda: not finalizers(cluster, namespace, "pausable"), 30, "finalizer dropped on suspend")
    assert (
        kubectl_json(cluster, "get", "pvc", "pausable-checkpoints", "-n", namespace)["metadata"]["uid"]
        == pvc_uid
    )

    patch = json.dumps({"spec": {"scheduling": {"suspend": False}}})
    cluster.kubectl("patch", "finetunejob", "pausable", "-n", namespace, "--type=merge", "-p", patch)
    resumed = wait_phase(cluster, namespace, "pausable", "Running")
    assert resumed["status"]["attempt"] == 2
    assert condition(resumed, "Suspended")["status"] == "False"
    assert condition(resumed, "Suspended")["reason"] == "Resumed"
    running_pods(cluster, namespace, "pausable", 2, 1)
    assert finalizers(cluster, namespace, "pausable") == ["finetune.dev/finalizer"]


def test_active_deadline_fails_the_job(cluster: Cluster, namespace: str, operator: Any) -> None:
    cluster.apply(ftj("slow", activeDeadlineSeconds=3), namespace)
    failed = wait_phase(cluster, namespace, "slow", "Failed", 60)
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not trainer_pods(cluster, namespace, "slow"), 60, "pods gone after the deadline")
    wait_for(lambda: not finalizers(cluster, namespace, "slow"), 30, "finalizer dropped once finished")


def test_ttl_deletes_the_finished_job_and_its_children(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    cluster.apply(ftj("shortlived", ttlSecondsAfterFinished=2), namespace)
    wait_phase(cluster, namespace, "shortlived", "Running")
    (pod,) = trainer_pods(cluster, namespace, "shortlived", 1)
    finish_pod(cluster, namespace, pod["metadata"]["name"], 0)
    wait_for(
        lambda: (
            cluster.kubectl("get", "finetunejob", "shortlived", "-n", namespace, check=False).returncode != 0
        ),
        60,
        "the FineTuneJob to be deleted by its TTL",
    )


def test_deleting_a_job_removes_every_child_and_the_finalizer(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    cluster.apply(ftj("doomed"), namespace)
    body = wait_phase(cluster, namespace, "doomed", "Running")
    assert body["metadata"]["finalizers"] == ["finetune.dev/finalizer"]  # ours alone, no kopf finalizer
    # kopf keeps no state on the object (no diff-base or progress annotations): GitOps sees only the user's.
    assert not any(k.startswith("kopf.") for k in body["metadata"].get("annotations") or {})
    children = cluster.kubectl(
        "get", CHILD_KINDS, "-n", namespace, "-l", "finetune.dev/job=doomed", "-o", "name"
    )
    assert len(children.stdout.split()) == 7, children.stdout
    for kind in CHILD_KINDS.split(","):
        item = kubectl_json(cluster, "get", kind, "-n", namespace, "-l", "finetune.dev/job=doomed")["items"][
            0
        ]
        assert item["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        assert not any(k.startswith("kopf.") for k in item["metadata"].get("annotations") or {})
    cluster.kubectl("delete", "finetunejob", "doomed", "-n", namespace, "--timeout=60s")

    def all_gone() -> bool:
        left = cluster.kubectl(
            "get", CHILD_KINDS + ",pods", "-n", namespace, "-l", "finetune.dev/job=doomed", "-o", "name"
        )
        return not left.stdout.strip()

    wait_for(all_gone, 90, "garbage collection of every child")


def test_trainer_service_account_may_only_patch_its_own_status(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    cluster.apply([ftj("mine", gpus=0), ftj("theirs", gpus=0, suspend=True)], namespace)
    wait_phase(cluster, namespace, "mine", "Running")
    wait_phase(cluster, namespace, "theirs", "Suspended")
    assert finalizers(cluster, namespace, "theirs") == []  # never ran: no finalizer write at all
    user = f"--as=system:serviceaccount:{namespace}:mine-trainer"

    def can(*args: str) -> bool:
        result = cluster.kubectl("auth", "can-i", *args, "-n", namespace, user, check=False)
        return result.stdout.strip() == "yes"

    assert can("patch", "finetunejobs.finetune.dev/mine", "--subresource=status")
    assert can("get", "finetunejobs.finetune.dev/mine", "--subresource=status")
    assert not can("patch", "finetunejobs.finetune.dev/theirs", "--subresource=status")
    assert not can("get", "finetunejobs.finetune.dev/theirs")
    assert not can("patch", "finetunejobs.finetune.dev/mine"), "never the spec"
    assert not can("list", "finetunejobs.finetune.dev")
    assert not can("get", "secrets")
    assert not can("get", "pods")
    assert not can("create", "pods")


def test_rendered_config_validates_and_the_pod_command_starts_the_trainer(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    cluster.apply(ftj("contract", gpus=0), namespace)
    wait_phase(cluster, namespace, "contract", "Running")
    cm = kubectl_json(cluster, "get", "configmap", "contract-config", "-n", namespace)
    config = TrainerConfig.model_validate(json.loads(cm["data"]["trainer.json"]))
    assert config.reporting.job_name == "contract"
    assert config.reporting.namespace == namespace
    assert config.model.path == "file:///models/tiny"
    json.loads(cm["data"]["deepspeed.json"])
    (pod,) = trainer_pods(cluster, namespace, "contract", 1)
    container = pod["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_volume = next(v for v in pod["spec"]["volumes"] if v.get("configMap"))
    assert config_volume["configMap"]["name"] == "contract-config"
    config_path = f"{mounts[config_volume['name']]}/trainer.json"
    assert container["command"] + container["args"] == pod_command(config_path)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PET_NNODES"] == "1"
    assert env["PET_NPROC_PER_NODE"] == "1"
    assert env["FTO_EXIT_CODE_FILE"]
    assert pod["spec"]["serviceAccountName"] == "contract-trainer"


def test_model_deployment_gets_a_first_status(cluster: Cluster, namespace: str, operator: Any) -> None:
    manifest = yaml.safe_load((EXAMPLES / "modeldeployment-rolling.yaml").read_text())
    manifest["metadata"].pop("namespace", None)
    cluster.apply(manifest, namespace)
    name = manifest["metadata"]["name"]

    def acknowledged() -> dict[str, Any] | None:
        body = kubectl_json(cluster, "get", "modeldeployment", name, "-n", namespace)
        status = body.get("status") or {}
        return body if status.get("observedGeneration") == body["metadata"]["generation"] else None

    body = wait_for(acknowledged, 60, "the ModelDeployment's observedGeneration")
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForFineTuneJob")


def test_a_pod_deleted_under_the_gang_counts_as_a_failed_attempt(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    gpu_pool_free(cluster)
    cluster.apply(ftj("evicted", nodes=2, maxRestarts=3), namespace)
    wait_phase(cluster, namespace, "evicted", "Running")
    victim = running_pods(cluster, namespace, "evicted", 1, 2)[1]
    cluster.kubectl("delete", "pod", victim["metadata"]["name"], "-n", namespace, "--wait=false")
    body = wait_attempt_running(cluster, namespace, "evicted", 2)
    assert body["status"]["restarts"] == 1
    assert body["status"]["lastFailure"]
    running_pods(cluster, namespace, "evicted", 2, 2)


def test_namespace_gpu_quota_keeps_a_job_waiting_although_gpus_are_free(
    cluster: Cluster, namespace: str, operator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu_pool_free(cluster)
    operator.stop()
    monkeypatch.setenv("FTO_GPU_QUOTA_PER_NAMESPACE", f"{namespace}=8")
    operator.start()
    cluster.apply(ftj("within"), namespace)
    wait_phase(cluster, namespace, "within", "Running")
    cluster.apply(ftj("over"), namespace)
    waiting = wait_phase(cluster, namespace, "over", "Queued")
    admitted = condition(waiting, "Admitted")
    assert admitted["reason"] == "GPUQuotaExceeded"
    assert admitted["message"] == f"needs 8 GPUs; namespace {namespace} uses 8 of its quota of 8"
    (pod,) = trainer_pods(cluster, namespace, "within", 1)
    finish_pod(cluster, namespace, pod["metadata"]["name"], 0)
    wait_phase(cluster, namespace, "over", "Running")


def test_a_job_naming_a_missing_claim_waits_with_the_field_then_runs_once_it_exists(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    body = ftj("needs-data", gpus=0)
    body["spec"]["dataset"]["source"] = "pvc://corpus/train.jsonl"
    cluster.apply(body, namespace)
    waiting = wait_phase(cluster, namespace, "needs-data", "Queued")
    admitted = condition(waiting, "Admitted")
    assert admitted["reason"] == "ClaimNotFound"
    assert admitted["message"] == (
        f"spec.dataset.source: PersistentVolumeClaim 'corpus' not found in namespace '{namespace}'"
    )
    assert not trainer_pods(cluster, namespace, "needs-data")  # no pod stuck Pending on a missing claim
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "corpus"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    cluster.apply(claim, namespace)
    running = wait_phase(cluster, namespace, "needs-data", "Running", 60)
    assert condition(running, "Admitted")["status"] == "True"
