"""Operator settings, read once from the environment (`FTO_*`). Each field says what it changes."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune_operator.scheduling.queue import AdmissionPolicy

ENV_PREFIX = "FTO_"


class OperatorConfig(BaseModel):
    """Typed operator settings; the environment variable of a field is `FTO_` + its name upper-cased."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    trainer_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    """Image of the trainer pods when a FineTuneJob sets no `image` override (FTO_TRAINER_IMAGE)."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy of trainer and server containers (FTO_IMAGE_PULL_POLICY)."""
    server_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    """Image of the built-in inference server (`python -m finetune_server`; it ships in the trainer image)
    when a ModelDeployment sets no `runtime.image` (FTO_SERVER_IMAGE)."""
    vllm_image: str = "vllm/vllm-openai:v0.10.2"
    """Image of `runtime.type: vllm` servers when a ModelDeployment sets no `runtime.image`
    (FTO_VLLM_IMAGE)."""
    default_pvc_size: str = "50Gi"
    """Size of the checkpoint/output PVC when the job sets no claim or size (FTO_DEFAULT_PVC_SIZE)."""
    storage_class: str | None = None
    """StorageClass of checkpoint PVCs; unset uses the cluster default (FTO_STORAGE_CLASS)."""
    master_port: int = Field(default=29500, ge=1, le=65535)
    """torchrun rendezvous port on pod 0 (FTO_MASTER_PORT)."""
    termination_grace_seconds: int = Field(default=600, ge=30)
    """Grace period of trainer pods: time to reach a step boundary and write a checkpoint on SIGTERM
    (FTO_TERMINATION_GRACE_SECONDS). torchrun's shutdown timeout is set 30 s below it."""
    shm_size: str = "16Gi"
    """Default size of the memory-backed /dev/shm of trainer pods; NCCL needs > 64 MiB (FTO_SHM_SIZE)."""
    restart_backoff_max_seconds: float = Field(default=600.0, ge=0)
    """Upper bound of the gang-restart delay (FTO_RESTART_BACKOFF_MAX_SECONDS)."""
    requeue_seconds: float = Field(default=10.0, gt=0)
    """How often a queued job looks at GPU capacity again (FTO_REQUEUE_SECONDS): pods of other workloads
    free GPUs without sending the operator an event."""
    drift_check_seconds: float = Field(default=300.0, gt=0)
    """Every this many seconds all FineTuneJobs are reconciled again, spread over the interval, to repair
    drift in their children (FTO_DRIFT_CHECK_SECONDS)."""
    workers: int = Field(default=32, ge=1)
    """Concurrent reconciles of different FineTuneJobs (FTO_WORKERS); never two of one job at once. Like
    Argo Workflows' 32 workflow workers: a burst of new jobs keeps pace with their creation (figures in
    benchmarks/README.md)."""
    gpu_quota_per_namespace: dict[str, int] = Field(default_factory=dict)
    """Optional GPU quota per namespace, e.g. `team-a=16,team-b=8` (FTO_GPU_QUOTA_PER_NAMESPACE);
    admitted jobs' GPUs count against it. Namespaces not listed are unlimited."""
    admission_policy: AdmissionPolicy = AdmissionPolicy.STRICT
    """`strict` (default): when the highest-priority waiting gang does not fit, the nodes it needs are
    held for it and gangs behind it are admitted only where they cannot delay it, so it is never starved.
    `best-effort`: gangs behind it that fit are admitted anywhere (Kueue's BestEffortFIFO; it may wait as
    long as smaller jobs keep coming) (FTO_ADMISSION_POLICY)."""
    preemption_min_run_seconds: float = Field(default=300.0, ge=0)
    """A gang is not preempted before it has run this long since its admission, so a preempted job that
    resumes is not preempted again at once (FTO_PREEMPTION_MIN_RUN_SECONDS)."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 turns it off (FTO_METRICS_PORT, or --metrics-port)."""
    request_timeout_seconds: float = Field(default=60.0, gt=0)
    """Timeout of one API request, for kopf and for our client (FTO_REQUEST_TIMEOUT_SECONDS)."""

    @field_validator("gpu_quota_per_namespace", mode="before")
    @classmethod
    def _parse_quota(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            return {name.strip(): int(count) for name, count in pairs}
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        values = {
            name: env[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in env
        }
        return cls.model_validate(values)
