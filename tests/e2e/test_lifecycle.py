"""The whole FineTuneJob lifecycle for real: the operator on the dev cluster admits the job and creates its
pod on the local node, whose agent (hack/nodeagent) runs the pod's container (the trainer) on this machine
with the pod's command, environment, volumes and ServiceAccount; the trainer reports through the API, and
the pod ends with its exit code. No test starts a pod: the node runs what is bound to it.

A tiny Llama-style model and a small generated task (hack/make_tiny_model.py) keep it to about a minute."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hack import nodeagent
from hack.make_tiny_model import TinyAssets, make_tiny_assets

from finetune_trainer.config import parse_config
from finetune_trainer.exit_codes import REASONS, ExitCode
from tests.kube_helpers import Cluster, LocalNode, OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("local_node")]

MAX_STEPS = 30
JOB_LABEL = "finetune.dev/job"
#: Field managers of the operator's own status writes; the trainer's writes must come from someone else.
OPERATOR_MANAGERS = {"kopf", "Python", "finetune-operator"}
TRAINER_FIELDS = {"f:progress", "f:metrics", "f:artifact"}
TRAINER_MANAGER = "finetune-trainer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny"))


def finetunejob(
    name: str, model: Path, data: Path, max_bad_ratio: float = 0.05, max_steps: int = MAX_STEPS
) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "model": {"source": f"file://{model}"},
            "dataset": {
                "source": f"file://{data}",
                "format": "jsonl",
                "fieldMapping": {"prompt": "prompt", "completion": "completion"},
                "split": {"validationRatio": 0.1, "testRatio": 0.1, "seed": 1},
                "badRows": {"maxRatio": max_bad_ratio},
            },
            "method": "full",
            "hyperparameters": {
                "maxSteps": max_steps,
                "batchSize": 8,
                "learningRate": 0.003,
                "warmupSteps": 2,
                "maxSeqLength": 64,
            },
            "evaluation": {"everySteps": 10},
            "checkpointing": {"everySteps": 10, "storage": {"size": "1Gi"}},
            # The local node's fake GPUs place it; on this machine it trains on the CPU.
            "distributed": {"nodes": 1, "gpusPerNode": 1, "precision": "fp32"},
            "resources": {
                "nodeSelector": dict(nodeagent.NODE_SELECTOR),
                "tolerations": [dict(nodeagent.TOLERATION)],
            },
        },
    }


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in job.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def get_job(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    job: dict[str, Any] = kubectl_json(
        cluster, "get", "finetunejob", name, "-n", namespace, "--show-managed-fields"
    )
    return job


def wait_condition(
    cluster: Cluster, namespace: str, name: str, kind: str, timeout: float = 120
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = get_job(cluster, namespace, name)
        cond = condition(job, kind)
        return job if cond and cond["status"] == "True" else None

    return wait_for(reached, timeout, f"FineTuneJob {namespace}/{name} to have {kind}=True")


def running_trainer_pod(cluster: Cluster, namespace: str, name: str, attempt: int = 1) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        selector = f"{JOB_LABEL}={name},finetune.dev/attempt={attempt}"
        pods = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", selector)["items"]
        # Started: Running, or already ended (a failing trainer can end between two polls).
        live = [p for p in pods if p["status"].get("phase") in ("Running", "Succeeded", "Failed")]
        return live[0] if len(live) == 1 else None

    return wait_for(running, 120, f"the trainer pod of {namespace}/{name} to be Running")


def ended_pod(cluster: Cluster, namespace: str, name: str, timeout: float = 480) -> dict[str, Any]:
    """The pod once its container has ended (Succeeded or Failed), as the local node reports it."""

    def ended() -> dict[str, Any] | None:
        pod: dict[str, Any] = kubectl_json(cluster, "get", "pod", name, "-n", namespace)
        return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

    return wait_for(ended, timeout, f"pod {namespace}/{name} to end")


def exit_code(pod: dict[str, Any]) -> int:
    [status] = pod["status"]["containerStatuses"]
    return int(status["state"]["terminated"]["exitCode"])


def trainer_log(cluster: Cluster, namespace: str, name: str) -> str:
    return cluster.kubectl("logs", name, "-n", namespace).stdout


def volume_dir(cluster: Cluster, namespace: str, pod: dict[str, Any], container_path: str) -> Path:
    """Where a path inside the pod lies on this machine: its mount's PersistentVolume folder."""
    [container] = pod["spec"]["containers"]
    mount = max(
        (m for m in container["volumeMounts"] if container_path.startswith(m["mountPath"].rstrip("/") + "/")),
        key=lambda m: len(m["mountPath"]),
    )
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    claim = kubectl_json(cluster, "get", "pvc", volume["persistentVolumeClaim"]["claimName"], "-n", namespace)
    pv = kubectl_json(cluster, "get", "pv", claim["spec"]["volumeName"])
    return Path(pv["spec"]["hostPath"]["path"]) / container_path.removeprefix(mount["mountPath"]).lstrip("/")


def claim_dir(cluster: Cluster, namespace: str, uri: str) -> Path:
    """Where a `pvc://claim/path` URI (what status.artifact reports) lies on this machine."""
    assert uri.startswith("pvc://"), uri
    claim_name, _, path = uri.removeprefix("pvc://").partition("/")
    claim = kubectl_json(cluster, "get", "pvc", claim_name, "-n", namespace)
    pv = kubectl_json(cluster, "get", "pv", claim["spec"]["volumeName"])
    return Path(pv["spec"]["hostPath"]["path"]) / path


def status_writers(job: dict[str, Any]) -> dict[str, set[str]]:
    """Status fields by the field manager that last wrote them."""
    writers: dict[str, set[str]] = {}
    for entry in job["metadata"].get("managedFields", []):
        if entry.get("subresource") == "status":
            fields = set(entry.get("fieldsV1", {}).get("f:status", {}))
            writers.setdefault(entry["manager"], set()).update(fields)
    return writers


def test_finetunejob_trains_for_real_and_succeeds_with_an_artifact(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tiny: TinyAssets, local_node: LocalNode
) -> None:
    cluster.apply(finetunejob("tiny", tiny.model_dir, tiny.data_path), namespace)
    wait_condition(cluster, namespace, "tiny", "Admitted")
    pod = running_trainer_pod(cluster, namespace, "tiny")

    # The operator's rendered config is one the trainer accepts (the trainer validates it again on start).
    [config_volume] = [v for v in pod["spec"]["volumes"] if "configMap" in v]
    config_map = kubectl_json(
        cluster, "get", "configmap", config_volume["configMap"]["name"], "-n", namespace
    )
    config = parse_config(json.loads(config_map["data"]["trainer.json"]))
    assert config.hyperparameters.max_steps == MAX_STEPS

    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == local_node.name
    ended = ended_pod(cluster, namespace, name)
    log = trainer_log(cluster, namespace, name)
    assert exit_code(ended) == 0, log
    # In-cluster reporting had only the pod's own credentials: the projected ServiceAccount token.
    env = {e["name"] for c in pod["spec"]["containers"] for e in c.get("env", [])}
    assert not {"KUBECONFIG", "FTO_STATUS_KUBECONFIG"} & env
    assert "status patch" not in log, log

    job = wait_condition(cluster, namespace, "tiny", "Succeeded")
    status = job["status"]
    assert status["phase"] == "Succeeded"
    assert status["attempt"] == 1
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == MAX_STEPS
    before, after = status["metrics"]["before"], status["metrics"]["after"]
    assert after["loss"] < before["loss"], status["metrics"]
    # progress, metrics and artifact were written by the trainer's client, not by the operator.
    writers = status_writers(job)
    trainer_managers = {m for m, fields in writers.items() if fields & TRAINER_FIELDS}
    assert trainer_managers == {TRAINER_MANAGER}, writers
    assert status["progress"]["stage"] == "Completed"

    # The artifact is addressed as users can resolve it: the output folder on the job's checkpoint claim.
    artifact = status["artifact"]
    assert artifact["uri"] == "pvc://tiny-checkpoints/output/model/model", artifact
    model_dir = claim_dir(cluster, namespace, artifact["uri"])
    assert model_dir == volume_dir(cluster, namespace, pod, f"{config.output.dir}/model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    card = claim_dir(cluster, namespace, artifact["modelCard"])
    assert card.name == "README.md"
    assert "loss" in card.read_text().lower()
    metrics = json.loads((card.parent / "metrics.json").read_text())
    assert metrics["after"]["test"]["loss"] < metrics["before"]["test"]["loss"], metrics
    png = next(card.parent.glob("*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.name in card.read_text()  # the card shows the loss curve

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)


def test_malformed_dataset_fails_the_job_at_once_with_the_trainers_reason(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tiny: TinyAssets, tmp_path: Path
) -> None:
    bad = make_tiny_assets(tmp_path / "bad", malformed_ratio=0.5)
    cluster.apply(finetunejob("bad-data", tiny.model_dir, bad.data_path, max_bad_ratio=0.05), namespace)
    pod = running_trainer_pod(cluster, namespace, "bad-data")

    ended = ended_pod(cluster, namespace, pod["metadata"]["name"])
    log = trainer_log(cluster, namespace, pod["metadata"]["name"])
    assert exit_code(ended) == ExitCode.DATA_ERROR, log
    # The trainer says why, where the kubelet reads it.
    assert ended["status"]["containerStatuses"][0]["state"]["terminated"].get("message"), log

    job = wait_condition(cluster, namespace, "bad-data", "Failed")
    failed = condition(job, "Failed")
    assert failed is not None
    assert failed["reason"] == REASONS[ExitCode.DATA_ERROR], failed
    assert job["status"]["phase"] == "Failed"
    # Not retried: one attempt, one batch Job.
    assert job["status"]["attempt"] == 1
    assert job["status"].get("restarts", 0) == 0
    jobs = kubectl_json(cluster, "get", "jobs", "-n", namespace, "-l", f"{JOB_LABEL}=bad-data")["items"]
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]


@pytest.mark.timeout(1200)  # two attempts of 600 steps: a busy machine needs more than pytest's default
def test_a_killed_trainer_restarts_the_gang_and_resumes_from_its_checkpoint(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tiny: TinyAssets, local_node: LocalNode
) -> None:
    # Long enough that the kill lands well before the end even on a fast, idle machine (a tiny model
    # trains hundreds of steps a second); the checkpoint is watched closely for the same reason.
    steps = 600
    manifest = finetunejob("resume", tiny.model_dir, tiny.data_path, max_steps=steps)
    manifest["spec"]["scheduling"] = {"maxRestarts": 2, "backoffSeconds": 1}
    cluster.apply(manifest, namespace)
    first = running_trainer_pod(cluster, namespace, "resume", attempt=1)
    checkpoints = volume_dir(cluster, namespace, first, "/workspace/checkpoints")

    # Attempt 1 is killed (SIGKILL, as the OOM killer would) once it has a complete checkpoint.
    wait_for(
        lambda: any(checkpoints.glob("step-*/COMPLETE")),
        300,
        "a complete checkpoint of attempt 1",
        interval=0.02,
    )
    [trainer] = [c for c in local_node.containers() if c.pod == first["metadata"]["name"]]
    assert trainer.main_pid is not None
    os.kill(trainer.main_pid, signal.SIGKILL)
    saved = max(int(p.parent.name.removeprefix("step-")) for p in checkpoints.glob("step-*/COMPLETE"))
    assert saved < steps

    # The operator replaces the whole gang: attempt 2, same claim, and the trainer resumes there.
    second = running_trainer_pod(cluster, namespace, "resume", attempt=2)
    assert volume_dir(cluster, namespace, second, "/workspace/checkpoints") == checkpoints
    ended = ended_pod(cluster, namespace, second["metadata"]["name"])
    assert exit_code(ended) == 0, trainer_log(cluster, namespace, second["metadata"]["name"])

    job = wait_condition(cluster, namespace, "resume", "Succeeded")
    assert job["status"]["attempt"] == 2
    assert job["status"]["restarts"] == 1
    # The killed pod (gone now: the operator replaced the gang) was reported with the kill's exit code.
    assert f"exit code {128 + signal.SIGKILL}" in job["status"]["lastFailure"], job["status"]
    assert job["status"]["progress"]["step"] == steps
    output = claim_dir(cluster, namespace, job["status"]["artifact"]["modelCard"]).parent
    events = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed, "the second attempt did not resume from a checkpoint"
    assert resumed[-1]["step"] >= saved
