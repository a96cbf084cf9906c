"""ModelDeployment (`modeldeployments.finetune.dev`, short name `mdep`): the typed spec and status.

A served model: quantised and pruned behind a quality gate, rolled out (rolling or canary with analysis),
authenticated, monitored, collecting feedback. The one source of `crds/modeldeployments.finetune.dev.yaml`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from finetune_operator.api.common import (
    CONDITIONS_LIST_SCHEMA,
    ApiModel,
    CelRule,
    Condition,
    ConditionedStatus,
    DnsLabel,
    PodResources,
    ResourceObject,
    SecretKeyRef,
    StatusModel,
    VolumeClaim,
    cel_field,
    parse_resource,
)
from finetune_operator.api.finetunejob import SourceUri, Task

KIND = "ModelDeployment"
PLURAL = "modeldeployments"

QuantizationMethod = Literal["none", "fp16", "bf16", "int8-dynamic", "int8-weight-only", "nf4"]

# Condition types; `Ready` summarises the others.
CONDITION_MODEL_READY = "ModelReady"
CONDITION_AVAILABLE = "Available"
CONDITION_PROGRESSING = "Progressing"
CONDITION_DEGRADED = "Degraded"
CONDITION_READY = "Ready"
CONDITION_TYPES = (
    CONDITION_MODEL_READY,
    CONDITION_AVAILABLE,
    CONDITION_PROGRESSING,
    CONDITION_DEGRADED,
    CONDITION_READY,
)


class ModelReference(ApiModel):
    """The model to serve: the artifact of a FineTuneJob, or a URI. Exactly one."""

    from_fine_tune_job: DnsLabel | None = None
    """Name of a FineTuneJob in the same namespace; its artifact is served once it succeeded."""
    uri: SourceUri | None = None
    """A model (or LoRA adapter) at `hf://`, `pvc://`, `s3://` or `file://`."""
    base_model: SourceUri | None = None
    """Base model when `uri` points to a LoRA adapter (taken from the job with `fromFineTuneJob`)."""
    task: Task | None = None
    """The model's task; needed with `uri` (taken from the job with `fromFineTuneJob`)."""

    cel_rules = (
        CelRule(
            rule="has(self.fromFineTuneJob) != has(self.uri)",
            message="set exactly one of fromFineTuneJob and uri",
            holds=lambda m: (m.from_fine_tune_job is None) != (m.uri is None),
        ),
        CelRule(
            rule="!has(self.uri) || has(self.task)",
            message="task is required with uri",
            holds=lambda m: m.uri is None or m.task is not None,
            field_path=".task",
        ),
        CelRule(
            rule="!has(self.fromFineTuneJob) || (!has(self.baseModel) && !has(self.task))",
            message="baseModel and task come from the FineTuneJob; set them only with uri",
            holds=lambda m: m.from_fine_tune_job is None or (m.base_model is None and m.task is None),
            field_path=".fromFineTuneJob",
        ),
    )


class Runtime(ApiModel):
    """The inference server (`finetune_server`, OpenAI-compatible for causal-lm)."""

    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Server container image, overriding the operator's default."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weights' compute dtype when not quantised (`auto`: bf16 on GPU, fp32 on CPU)."""
    max_batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    """Requests batched into one forward pass."""
    max_concurrent_requests: Annotated[int, Field(ge=1, le=10000)] = 32
    """Requests in flight per replica; more get HTTP 429."""
    max_new_tokens: Annotated[int, Field(ge=1, le=32768)] = 256
    """Default and upper limit of generated tokens per request (causal-lm)."""
    request_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    """Requests running longer are cancelled with HTTP 504."""


class Quantization(ApiModel):
    """Post-training quantisation, accepted only if the quality gate passes."""

    method: QuantizationMethod = "none"
    """`none`, `fp16`/`bf16` (cast), `int8-dynamic` (dynamic int8 linear layers, CPU), `int8-weight-only`,
    `nf4` (4-bit NormalFloat, GPU)."""
    max_quality_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    """Largest tolerated relative drop of the quality metric against the unquantised model on the
    evaluation set; above it the deployment fails with reason `QualityGateFailed`."""
    evaluation_samples: Annotated[int, Field(ge=1, le=100000)] = 200
    """Validation rows used for the quality gate."""


class Pruning(ApiModel):
    """Weight pruning before quantisation, behind the same kind of quality gate."""

    method: Literal["none", "magnitude", "structured"] = "none"
    """`magnitude`: zero the smallest weights of linear layers; `structured`: remove whole rows
    (attention heads / channels)."""
    sparsity: Annotated[float, Field(ge=0.0, le=0.9)] = 0.0
    """Fraction of weights removed."""
    max_quality_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    """Largest tolerated relative drop of the quality metric."""

    cel_rules = (
        CelRule(
            rule="(self.method == 'none') == (self.sparsity == 0.0)",
            message="sparsity must be above 0 with a pruning method, and 0 with method none",
            holds=lambda m: (m.method == "none") == (m.sparsity == 0.0),
            field_path=".sparsity",
        ),
    )


class Autoscaling(ApiModel):
    """Horizontal autoscaling on CPU or on requests in flight."""

    min_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    """Fewest replicas."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)]
    """Most replicas."""
    target_cpu_utilization: Annotated[int, Field(ge=1, le=100)] | None = None
    """Average CPU utilisation (percent of request) to scale at."""
    target_concurrency: Annotated[int, Field(ge=1, le=10000)] | None = None
    """Average requests in flight per replica to scale at (from the server's metrics)."""

    cel_rules = (
        CelRule(
            rule="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            holds=lambda m: m.min_replicas <= m.max_replicas,
            field_path=".minReplicas",
        ),
        CelRule(
            rule="has(self.targetCpuUtilization) || has(self.targetConcurrency)",
            message="set targetCpuUtilization or targetConcurrency",
            holds=lambda m: m.target_cpu_utilization is not None or m.target_concurrency is not None,
        ),
    )


class ServingResources(PodResources):
    """What each server replica requests, and where it may run."""

    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """GPUs per replica; 0 serves on CPU."""


class CanaryStep(ApiModel):
    """One step of a canary rollout."""

    weight: Annotated[int, Field(ge=1, le=100)]
    """Percent of requests sent to the new revision during this step."""
    pause_seconds: Annotated[int, Field(ge=0, le=86400)] = 60
    """How long the step lasts (analysis runs throughout) before the next one."""


class CanaryAnalysis(ApiModel):
    """Thresholds the new revision must meet during each canary step; a breach rolls back."""

    interval_seconds: Annotated[int, Field(ge=5, le=3600)] = 30
    """How often the thresholds are checked."""
    min_requests: Annotated[int, Field(ge=0)] = 20
    """Requests the new revision must have served in a step before it can pass."""
    max_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """Largest tolerated fraction of HTTP 5xx answers."""
    max_latency_p95_ms: Annotated[int, Field(ge=1)] | None = None
    """Largest tolerated 95th-percentile latency in milliseconds."""
    max_feedback_drop: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Largest tolerated drop of the positive-feedback ratio against the stable revision."""
    failure_limit: Annotated[int, Field(ge=1, le=100)] = 2
    """Failed checks in a step before rolling back."""


class Canary(ApiModel):
    """Canary rollout: traffic shifts by steps while analysis passes."""

    steps: Annotated[list[CanaryStep], Field(min_length=1, max_length=20)]
    """Traffic steps, by increasing weight; after the last the new revision takes all traffic."""
    analysis: CanaryAnalysis = Field(default_factory=CanaryAnalysis)
    """Thresholds checked during each step."""

    cel_rules = (
        CelRule(
            rule="self.steps.map(s, s.weight).isSorted()",
            message="steps must be in increasing order of weight",
            holds=lambda m: [s.weight for s in m.steps] == sorted(s.weight for s in m.steps),
            field_path=".steps",
        ),
    )


class Rollout(ApiModel):
    """How a new model revision replaces the old one."""

    strategy: Literal["RollingUpdate", "Canary"] = "RollingUpdate"
    """`RollingUpdate`: replace replicas as new ones become ready; `Canary`: shift traffic by steps."""
    canary: Canary | None = None
    """Canary steps and analysis (strategy `Canary` only)."""

    cel_rules = (
        CelRule(
            rule="(self.strategy == 'Canary') == has(self.canary)",
            message="canary is required with strategy Canary and allowed only with it",
            holds=lambda m: (m.strategy == "Canary") == (m.canary is not None),
            field_path=".canary",
        ),
    )


class Auth(ApiModel):
    """Bearer-token authentication of requests."""

    api_key_secret_ref: SecretKeyRef
    """Secret key holding the API key clients send as `Authorization: Bearer <key>`."""


class Monitoring(ApiModel):
    """Metrics and alerts."""

    service_monitor: bool = False
    """Create a Prometheus Operator ServiceMonitor for the server's /metrics."""
    max_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    """Above this fraction of 5xx answers (over 5 minutes) the deployment is `Degraded`."""
    max_latency_p95_ms: Annotated[int, Field(ge=1)] | None = None
    """Above this p95 latency the deployment is `Degraded`."""
    request_log_sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Fraction of requests whose input and output are logged (for feedback and drift analysis)."""


class Feedback(ApiModel):
    """Collection of user feedback on answers (`POST /v1/feedback`)."""

    enabled: bool = False
    """Accept and store feedback."""
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 30
    """Feedback older than this is deleted."""
    storage: VolumeClaim = Field(default_factory=VolumeClaim)
    """Volume the feedback is stored on."""


class ModelDeploymentSpec(ApiModel):
    """Which model to serve, how it is optimised, scaled, rolled out and protected."""

    model: ModelReference
    """The model to serve."""
    runtime: Runtime = Field(default_factory=Runtime)
    """Inference server settings."""
    quantization: Quantization = Field(default_factory=Quantization)
    """Quantisation and its quality gate."""
    pruning: Pruning = Field(default_factory=Pruning)
    """Pruning and its quality gate."""
    replicas: Annotated[int, Field(ge=0, le=1000)] | None = None
    """Fixed number of replicas (1 when neither this nor `autoscaling` is set)."""
    autoscaling: Autoscaling | None = None
    """Autoscaling instead of a fixed replica count."""
    resources: ServingResources = Field(default_factory=ServingResources)
    """Per-replica resources and placement."""
    rollout: Rollout = Field(default_factory=Rollout)
    """Rollout strategy for new revisions."""
    auth: Auth | None = None
    """Request authentication (none when omitted)."""
    monitoring: Monitoring = Field(default_factory=Monitoring)
    """Metrics and alert thresholds."""
    feedback: Feedback = Field(default_factory=Feedback)
    """User feedback collection."""

    cel_rules = (
        CelRule(
            rule="!(has(self.replicas) && has(self.autoscaling))",
            message="set replicas or autoscaling, not both",
            holds=lambda s: s.replicas is None or s.autoscaling is None,
            field_path=".autoscaling",
        ),
        CelRule(
            rule=f"{cel_field('quantization.method', Quantization().method)} != 'nf4'"
            f" || {cel_field('resources.gpus', ServingResources().gpus)} >= 1",
            message="quantization nf4 needs GPUs: set resources.gpus to at least 1",
            holds=lambda s: s.quantization.method != "nf4" or s.resources.gpus >= 1,
            field_path=".quantization.method",
        ),
        CelRule(
            rule=f"{cel_field('quantization.method', Quantization().method)} != 'int8-dynamic'"
            f" || {cel_field('resources.gpus', ServingResources().gpus)} == 0",
            message="quantization int8-dynamic runs on CPU: set resources.gpus to 0",
            holds=lambda s: s.quantization.method != "int8-dynamic" or s.resources.gpus == 0,
            field_path=".quantization.method",
        ),
        CelRule(
            rule="!has(self.resources) || !has(self.resources.gpuProduct)"
            f" || {cel_field('resources.gpus', ServingResources().gpus)} >= 1",
            message="resources.gpuProduct needs resources.gpus of at least 1",
            holds=lambda s: s.resources.gpu_product is None or s.resources.gpus >= 1,
            field_path=".resources.gpuProduct",
        ),
    )

    @property
    def fixed_replicas(self) -> int:
        """Replica count without autoscaling (1 by default)."""
        return 1 if self.replicas is None else self.replicas


# --- status --------------------------------------------------------------------------------------------


class ResolvedModel(StatusModel):
    """What `spec.model` resolved to."""

    uri: str | None = None
    """The served model's location."""
    base_model: str | None = None
    """Base model, when the model is a LoRA adapter."""
    task: Task | None = None
    """The model's task."""
    sha256: str | None = None
    """Digest of the model files (from the FineTuneJob's artifact, when known)."""


class QualityResult(StatusModel):
    """The measured outcome of an optimisation step (quantisation or pruning)."""

    method: str | None = None
    """Method applied (`none` when the gate rejected it and the unoptimised model is served)."""
    metric: str | None = None
    """Quality metric compared (e.g. `perplexity`, `accuracy`)."""
    baseline: float | None = None
    """Metric of the unoptimised model."""
    value: float | None = None
    """Metric of the optimised model."""
    quality_drop: float | None = None
    """Relative drop of the metric (0.01 = 1% worse)."""
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Size of the optimised model."""
    original_size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Size before optimisation."""
    sparsity: float | None = None
    """Measured fraction of zero weights (pruning)."""
    passed: bool | None = None
    """Whether the quality gate passed."""


class Revision(StatusModel):
    """One model revision the deployment has served."""

    name: str
    """Revision name (`<deployment>-<n>`)."""
    model_uri: str | None = None
    """Model served by this revision."""
    created_at: datetime | None = None
    """When the revision was created."""
    weight: Annotated[int, Field(ge=0, le=100)] = 0
    """Percent of traffic it receives now."""
    ready_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas of this revision ready to serve."""


class AnalysisResult(StatusModel):
    """The latest canary analysis of the new revision."""

    requests: Annotated[int, Field(ge=0)] = 0
    """Requests served by the canary in the current step."""
    error_rate: float | None = None
    """Fraction of 5xx answers."""
    latency_p95_ms: float | None = None
    """95th-percentile latency in milliseconds."""
    feedback_drop: float | None = None
    """Drop of the positive-feedback ratio against the stable revision."""
    failures: Annotated[int, Field(ge=0)] = 0
    """Failed checks in the current step."""
    passed: bool | None = None
    """Whether the latest check passed."""
    message: str | None = None
    """Why the latest check failed, if it did."""
    checked_at: datetime | None = None
    """When the analysis was last run."""


class CanaryStatus(StatusModel):
    """Progress of a canary rollout."""

    revision: str | None = None
    """Revision under test."""
    step: Annotated[int, Field(ge=0)] = 0
    """Index of the current step in `spec.rollout.canary.steps`."""
    weight: Annotated[int, Field(ge=0, le=100)] = 0
    """Percent of traffic it receives now."""
    step_started_at: datetime | None = None
    """When the current step began."""
    analysis: AnalysisResult | None = None
    """Latest analysis."""


class ModelDeploymentStatus(ConditionedStatus):
    """Observed state. Conditions ModelReady, Available, Progressing, Degraded and the summary Ready."""

    conditions: Annotated[list[Condition], Field(json_schema_extra=CONDITIONS_LIST_SCHEMA)] = Field(
        default_factory=list
    )
    """ModelReady, Available, Progressing, Degraded, Ready."""
    endpoint: str | None = None
    """Base URL of the server inside the cluster (e.g. `http://NAME.NS.svc:8080/v1`)."""
    model: ResolvedModel | None = None
    """The model being served."""
    replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas of all revisions."""
    ready_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas ready to serve."""
    current_revision: str | None = None
    """Revision receiving (most) traffic."""
    revisions: list[Revision] = Field(default_factory=list)
    """Recent revisions, newest last."""
    canary: CanaryStatus | None = None
    """Canary progress, while a canary rollout runs."""
    quantization: QualityResult | None = None
    """Outcome of quantisation."""
    pruning: QualityResult | None = None
    """Outcome of pruning."""


class ModelDeployment(ResourceObject):
    """A served model: optimised behind a quality gate, rolled out safely, authenticated and monitored."""

    kind: Literal["ModelDeployment"] = "ModelDeployment"
    """Kind."""
    spec: ModelDeploymentSpec
    """Desired state."""
    status: ModelDeploymentStatus = Field(default_factory=ModelDeploymentStatus)
    """Observed state (written by the operator)."""


def parse_modeldeployment(body: Mapping[str, Any]) -> ModelDeployment:
    """Validate a ModelDeployment body; errors name the field path (`InvalidResourceError`)."""
    return parse_resource(ModelDeployment, KIND, body)
