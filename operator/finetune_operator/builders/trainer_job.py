"""The Indexed Job of one attempt: one pod per node, torchrun wired by the completion index."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finetune_operator.api.finetunejob import FineTuneJob
from finetune_operator.builders import pods
from finetune_operator.builders.common import (
    ATTEMPT_LABEL,
    CONFIG_DIR,
    CONFIG_FILE,
    DEEPSPEED_FILE,
    JOB_LABEL,
    KUEUE_QUEUE_LABEL,
    TRAINER_CONTAINER,
    WORKSPACE_DIR,
    batch_job_name,
    checkpoint_claim_name,
    child_labels,
    child_metadata,
    config_map_name,
    job_name,
    service_name,
    trainer_name,
)
from finetune_operator.builders.encryption import encryption_key_volume
from finetune_operator.builders.security import (
    SCRATCH_DIR,
    container_security_context,
    pod_security_context,
    scratch_env,
    scratch_mount,
    scratch_volume,
)
from finetune_operator.builders.trainer_config import (
    OUTPUT_MOUNT,
    SOURCE_MOUNT_ROOT,
    output_copy_claim,
    source_claims,
)
from finetune_operator.config import OperatorConfig
from finetune_trainer.config import Reporting
from finetune_trainer.env import DEEPSPEED_CONFIG_ENV
from finetune_trainer.exit_codes import EXIT_CODE_FILE_ENV, NON_RETRYABLE

#: Rank 0's Prometheus endpoint: the trainer's default reporting.metricsPort (the operator keeps it).
TRAINER_METRICS_PORT = Reporting().metrics_port

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: command + args == finetune_trainer.launch.pod_command(config path): the trainer's own entrypoint, which
#: validates the config, wraps torchrun and re-raises the failing rank's exit code. (Not imported: the
#: launcher module uses subprocess, which builders must not import.)
TRAINER_COMMAND = ["python", "-m", "finetune_trainer"]
EXIT_CODE_FILE = f"{SCRATCH_DIR}/finetune-exit-code"

#: podFailurePolicy rule indexes; the controller maps a Job's `PodFailurePolicy` failure back through them.
RULE_NON_RETRYABLE = 0
RULE_DISRUPTION = 1


def shutdown_timeout_seconds(config: OperatorConfig) -> int:
    """torchrun's grace for workers after SIGTERM: 30 s below the pod's, so the save finishes first."""
    return max(1, config.termination_grace_seconds - 30)


def pod_failure_policy() -> dict[str, Any]:
    """Rule 0: a non-retryable trainer exit code fails the Job (and the FineTuneJob) at once.
    Rule 1: eviction/preemption/node loss (`DisruptionTarget`) fails the Job at once, so the whole gang
    stops together; the operator charges it as a failed attempt. Anything else hits `backoffLimit: 0`."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "In",
                    "values": sorted(int(code) for code in NON_RETRYABLE),
                },
            },
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def pod_tolerations(job: FineTuneJob) -> list[dict[str, Any]]:
    """The user's tolerations, plus one for the GPU taint when the pods request GPUs."""
    return pods.tolerations(job.spec.resources, job.spec.distributed.gpus_per_node)


def node_selector(job: FineTuneJob) -> dict[str, str]:
    """The pods' node selector: the user's labels plus the GPU product label."""
    return pods.node_selector(job.spec.resources)


def _resources(job: FineTuneJob) -> dict[str, Any]:
    return pods.container_resources(job.spec.resources, job.spec.distributed.gpus_per_node)


def _env(job: FineTuneJob, attempt: int, config: OperatorConfig) -> list[dict[str, Any]]:
    distributed = job.spec.distributed
    master = f"{batch_job_name(job, attempt)}-0.{service_name(job)}"
    return [
        {"name": "PET_NNODES", "value": str(distributed.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(distributed.gpus_per_node, 1))},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": str(config.master_port)},
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(shutdown_timeout_seconds(config))},
        {"name": EXIT_CODE_FILE_ENV, "value": EXIT_CODE_FILE},
        {"name": "FTO_JOB_NAME", "value": job_name(job)},
        {"name": "FTO_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "FTO_ATTEMPT", "value": str(attempt)},
        *scratch_env(),  # the root filesystem is read-only
        {"name": DEEPSPEED_CONFIG_ENV, "value": f"{CONFIG_DIR}/{DEEPSPEED_FILE}"},
    ]


def _env_from(job: FineTuneJob) -> dict[str, Any]:
    """`spec.credentialsSecret` as the container's `envFrom` (the kubelet reads it; our variables win)."""
    secret = job.spec.credentials_secret
    return {"envFrom": [{"secretRef": {"name": secret}}]} if secret else {}


def trainer_args() -> list[str]:
    return ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}"]


def build_trainer_job(
    job: FineTuneJob, attempt: int, config: OperatorConfig, placement: Sequence[str] = ()
) -> dict[str, Any]:
    """The gang of attempt `attempt`. Its pod template is immutable: a new attempt is a new Job.

    `placement` (the nodes the admission plan counted this gang's GPUs on) pins the pods to those nodes,
    so the scheduler cannot put the gang into GPUs the plan reserved for another job. Empty: unpinned
    (Kueue admission, or a restart that must be free to avoid a lost node)."""
    spec = job.spec
    nodes = spec.distributed.nodes
    name = batch_job_name(job, attempt)
    pod_labels = {**child_labels(job, "trainer"), ATTEMPT_LABEL: str(attempt)}
    job_labels = {ATTEMPT_LABEL: str(attempt)}
    if spec.scheduling.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name

    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(job)}},
        {"name": "workspace", "persistentVolumeClaim": {"claimName": checkpoint_claim_name(job)}},
        {
            "name": "dshm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": str(spec.resources.shared_memory or config.shm_size),
            },
        },
        scratch_volume(),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "workspace", "mountPath": WORKSPACE_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
        scratch_mount(),
    ]
    output_claim = output_copy_claim(job)
    sources = source_claims(job)
    for index, claim in enumerate(sources):
        # A claim that is both a source and the copy's destination: one volume, a read-only and a
        # read-write mount.
        claim_ref = {"claimName": claim} if claim == output_claim else {"claimName": claim, "readOnly": True}
        volumes.append({"name": f"source-{index}", "persistentVolumeClaim": claim_ref})
        mounts.append(
            {"name": f"source-{index}", "mountPath": f"{SOURCE_MOUNT_ROOT}/{claim}", "readOnly": True}
        )
        if claim == output_claim:
            mounts.append({"name": f"source-{index}", "mountPath": OUTPUT_MOUNT})
    if output_claim is not None and output_claim not in sources:
        # spec.output.uri: pvc://claim/path. Every pod of the gang mounts it (one pod template), so a
        # multi-node gang needs a ReadWriteMany claim; only rank 0 writes.
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": output_claim}})
        mounts.append({"name": "output", "mountPath": OUTPUT_MOUNT})
    if spec.output.encryption_key_secret_ref is not None:
        volume, mount = encryption_key_volume(spec.output.encryption_key_secret_ref)
        volumes.append(volume)
        mounts.append(mount)

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(job),
        "serviceAccountName": trainer_name(job),
        "terminationGracePeriodSeconds": config.termination_grace_seconds,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": spec.image or config.trainer_image,
                "imagePullPolicy": config.image_pull_policy,
                "command": list(TRAINER_COMMAND),
                "args": trainer_args(),
                "env": _env(job, attempt, config),
                **_env_from(job),
                "ports": [
                    {"name": "rendezvous", "containerPort": config.master_port, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"},
                ],
                "resources": _resources(job),
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": container_security_context(),
            }
        ],
        "volumes": volumes,
    }
    selector = node_selector(job)
    if selector:
        pod_spec["nodeSelector"] = selector
    tolerations = pod_tolerations(job)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity: dict[str, Any] = {}
    if placement:
        term = {"key": "kubernetes.io/hostname", "operator": "In", "values": sorted(set(placement))}
        affinity["nodeAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    if nodes > 1:
        # One pod per node: two pieces of one gang never share a node.
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {JOB_LABEL: job_name(job), ATTEMPT_LABEL: str(attempt)}},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    if affinity:
        pod_spec["affinity"] = affinity

    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if spec.scheduling.queue_name:
        job_spec["suspend"] = True  # Kueue admits the gang by unsuspending it
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": child_metadata(job, name, "trainer", **job_labels),
        "spec": job_spec,
    }
