"""Names, labels and owner references shared by every child of a FineTuneJob."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.api.finetunejob import FineTuneJob
from finetune_operator.api.modeldeployment import ModelDeployment

JOB_LABEL = "finetune.dev/job"
"""On every child and every trainer pod: the owning FineTuneJob's name (kopf watches children by it)."""
ATTEMPT_LABEL = "finetune.dev/attempt"
"""On the batch Job and its pods: the attempt number (a restarted gang never mixes with the old one)."""
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = {
    "app.kubernetes.io/managed-by": "finetune-operator",
    "app.kubernetes.io/name": "finetune-trainer",
}
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Our finalizer on FineTuneJobs: the operator frees the job's GPU reservation before it goes away.
FINALIZER = "finetune.dev/finalizer"
TRAINER_CONTAINER = "trainer"

CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = "trainer.json"
DEEPSPEED_FILE = "deepspeed.json"
WORKSPACE_DIR = "/workspace"
CHECKPOINT_DIR = f"{WORKSPACE_DIR}/checkpoints"
OUTPUT_DIR = f"{WORKSPACE_DIR}/output"


def trainer_name(job: FineTuneJob) -> str:
    """ServiceAccount, Role and RoleBinding of the trainer."""
    return f"{job_name(job)}-trainer"


def config_map_name(job: FineTuneJob) -> str:
    return f"{job_name(job)}-config"


def service_name(job: FineTuneJob) -> str:
    """The headless Service; pods resolve each other as `<batch-job>-<index>.<service>`."""
    return job_name(job)


def checkpoint_claim_name(job: FineTuneJob) -> str:
    storage = job.spec.checkpointing.storage
    return storage.existing_claim or f"{job_name(job)}-checkpoints"


def batch_job_name(job: FineTuneJob, attempt: int) -> str:
    """The Indexed Job of one attempt; pod hostnames are this plus `-<index>` (keep ≤ 63 characters)."""
    return f"{job_name(job)}-a{attempt}"


def job_name(job: FineTuneJob) -> str:
    return str(job.metadata["name"])


def namespace(job: FineTuneJob) -> str:
    return str(job.metadata["namespace"])


def child_labels(job: FineTuneJob, component: str) -> dict[str, str]:
    return {**MANAGED_BY, JOB_LABEL: job_name(job), COMPONENT_LABEL: component}


def owner_reference(owner: FineTuneJob | ModelDeployment) -> dict[str, Any]:
    """Controller reference: garbage collection deletes the child with its owner."""
    return {
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "name": str(owner.metadata["name"]),
        "uid": str(owner.metadata["uid"]),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(job: FineTuneJob, name: str, component: str, **labels: str) -> dict[str, Any]:
    """A child's metadata: fresh (no annotations copied from the parent, never kopf's), owned, labelled."""
    return {
        "name": name,
        "namespace": namespace(job),
        "labels": {**child_labels(job, component), **labels},
        "ownerReferences": [owner_reference(job)],
    }


def build_finalizer_intent(body: Mapping[str, Any], *, present: bool) -> dict[str, Any]:
    """Server-side-apply intent that holds (or, applied without it, drops) our finalizer on `body`.

    Only `metadata.finalizers` is ours: applying the same intent without it removes just our entry,
    whatever other controllers keep there. The uid guards against a re-created object of the same name."""
    meta = body["metadata"]
    intent: dict[str, Any] = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
    }
    if present:
        intent["metadata"]["finalizers"] = [FINALIZER]
    return intent
