"""Operator settings, read once from the environment (`FTO_*`). Each field says what it changes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

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
    """Every this many seconds every object of every kind (FineTuneJobs, ModelDeployments) is reconciled
    again, spread over the interval, to repair drift in its children (FTO_DRIFT_CHECK_SECONDS)."""
    workers: int = Field(default=32, ge=1)
    """Concurrent reconciles of different objects, of every kind, on the one work queue (FTO_WORKERS);
    never two of one object at once. Like Argo Workflows' 32 workflow workers: a burst of new jobs keeps
    pace with their creation (figures in benchmarks/README.md)."""
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
    pod_reads: Literal["auto", "direct", "apiserver-proxy"] = "auto"
    """How the operator reads server pods' `/metrics` and readiness answers (FTO_POD_READS): `direct` to the
    pod's IP (an operator inside the pod network), `apiserver-proxy` through the API server's `pods/proxy`
    (an operator outside it, e.g. on a laptop against kind); `auto` picks `direct` when it runs in a pod."""
    request_timeout_seconds: float = Field(default=60.0, gt=0)
    """Timeout of one API request, for kopf and for our client (FTO_REQUEST_TIMEOUT_SECONDS)."""

    namespaces: tuple[str, ...] = ()
    """Namespaces served; empty: all (FTO_NAMESPACES, comma-separated; set from --namespace)."""
    webhook_port: int = Field(default=0, ge=0, le=65535)
    """HTTPS port of the admission webhooks; 0 serves none (FTO_WEBHOOK_PORT). See docs/webhooks.md."""
    webhook_host: str = "127.0.0.1"
    """Host the API server calls when no `webhook_service` is set (an operator outside the cluster, e.g.
    the dev cluster's); also a name in the serving certificate (FTO_WEBHOOK_HOST)."""
    webhook_service: str = ""
    """`namespace/name` of the Service in front of the operator's webhook port (in a cluster): the API
    server calls `https://name.namespace.svc:443` (FTO_WEBHOOK_SERVICE)."""
    webhook_cert_dir: str = ""
    """Directory with `tls.crt`, `tls.key` and `ca.crt` (a mounted Secret, e.g. cert-manager's); when
    empty or incomplete the operator makes its own CA and certificate there, or in a private temporary
    directory (FTO_WEBHOOK_CERT_DIR)."""
    webhook_configuration_name: str = "finetune-operator"
    """Name of the Validating- and MutatingWebhookConfiguration (FTO_WEBHOOK_CONFIGURATION_NAME)."""
    webhook_manage_configurations: bool = True
    """The operator applies both webhook configurations, caBundle included, at start and on certificate
    renewal; false when Helm or cert-manager's CA injector own them (FTO_WEBHOOK_MANAGE_CONFIGURATIONS)."""
    webhook_timeout_seconds: int = Field(default=10, ge=1, le=30)
    """How long the API server waits for a webhook answer (FTO_WEBHOOK_TIMEOUT_SECONDS); a review makes at
    most a handful of GETs, so 10 s is ample and keeps `kubectl apply` from hanging for kopf's 30 s."""
    webhook_allowed_model_schemes: tuple[str, ...] = ("hf", "pvc", "s3", "file")
    """URI schemes the webhooks allow for models, e.g. `hf,pvc` (FTO_WEBHOOK_ALLOWED_MODEL_SCHEMES)."""
    webhook_allowed_data_schemes: tuple[str, ...] = ("hf", "pvc", "s3", "file")
    """URI schemes the webhooks allow for datasets and outputs (FTO_WEBHOOK_ALLOWED_DATA_SCHEMES)."""
    webhook_check_gpu_shape: bool = True
    """Refuse GPU requests that no node can hold; false on clusters that add GPU nodes on demand
    (FTO_WEBHOOK_CHECK_GPU_SHAPE)."""
    audit_stdout: bool = True
    """Write audit records as JSON lines on stdout (FTO_AUDIT_STDOUT). Logs go to stderr."""
    audit_dir: str = ""
    """Directory for the audit files (`audit-NNNNNN.jsonl`, rotated by size); empty: no files
    (FTO_AUDIT_DIR)."""
    audit_max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Size at which the next audit file is started (FTO_AUDIT_MAX_FILE_BYTES)."""
    audit_keep_files: int = Field(default=0, ge=0)
    """Audit files kept; older ones are removed; 0 keeps all (FTO_AUDIT_KEEP_FILES)."""
    audit_signing_key_file: str = ""
    """Ed25519 private key (PEM or 32 raw bytes; a mounted Secret) that signs audit checkpoints
    (FTO_AUDIT_SIGNING_KEY_FILE); unsigned checkpoints without it."""
    audit_checkpoint_every: int = Field(default=100, ge=1)
    """Records between two checkpoints (FTO_AUDIT_CHECKPOINT_EVERY); one is also written at shutdown."""
    audit_retry_seconds: float = Field(default=5.0, gt=0)
    """How often a failing audit file sink is retried (FTO_AUDIT_RETRY_SECONDS)."""

    @field_validator("namespaces", mode="before")
    @classmethod
    def _parse_namespaces(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("webhook_allowed_model_schemes", "webhook_allowed_data_schemes", mode="before")
    @classmethod
    def _parse_schemes(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip().removesuffix("://") for item in value.split(",") if item.strip())
        return value

    @field_validator("gpu_quota_per_namespace", mode="before")
    @classmethod
    def _parse_quota(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            return {name.strip(): int(count) for name, count in pairs}
        return value

    def pod_reads_through_apiserver(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether pod reads go through `pods/proxy` (resolving `auto` by `KUBERNETES_SERVICE_HOST`, which
        the kubelet sets in every pod)."""
        if self.pod_reads != "auto":
            return self.pod_reads == "apiserver-proxy"
        env = os.environ if environ is None else environ
        return "KUBERNETES_SERVICE_HOST" not in env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        values = {
            name: env[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in env
        }
        return cls.model_validate(values)
