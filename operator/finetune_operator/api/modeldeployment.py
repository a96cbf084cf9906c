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
from finetune_server.config import CPU_METHODS, CUDA_METHODS, Dtype, PruningMethod, QuantizationMethod

KIND = "ModelDeployment"
PLURAL = "modeldeployments"

CPU_ONLY_METHODS = tuple(sorted(CPU_METHODS))
GPU_ONLY_METHODS = tuple(sorted(CUDA_METHODS))
VLLM_QUANTIZATION = {"none": None, "fp8-dynamic": "fp8", "bnb-nf4": "bitsandbytes"}
"""What vLLM applies to a checkpoint itself, and its `--quantization` flag: fp8 and 4-bit bitsandbytes. A
checkpoint already quantised (AWQ, GPTQ, ...) is served with `none`: vLLM reads it from the checkpoint."""
VLLM_METHODS = tuple(VLLM_QUANTIZATION)

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
    """Name of a FineTuneJob in the same namespace; the deployment waits (condition `ModelReady`, reason
    `WaitingForFineTuneJob`) until it Succeeded, then serves its artifact."""
    uri: SourceUri | None = None
    """A model (or LoRA adapter) at `pvc://claim/path` or `file://` (the built-in runtime reads a folder),
    or `hf://org/name` (vLLM downloads it)."""
    base_model: SourceUri | None = None
    """Base model when `uri` points to a LoRA adapter (taken from the job with `fromFineTuneJob`)."""
    task: Task | None = None
    """The model's task; needed with `uri` (taken from the job with `fromFineTuneJob`)."""
    verify_manifest: bool = True
    """Check every file of the model folder against the sha256 manifest the trainer writes
    (`sha256sums.json`) before serving; a missing or changed file keeps the server not ready. Set false
    with `uri` to serve a model the trainer did not write; a FineTuneJob's artifact is always checked."""
    encryption_key_secret_ref: SecretKeyRef | None = None
    """The Secret key holding the key a model at `uri` was encrypted with at rest (a FineTuneJob's copy
    with `spec.output.encryptionKeySecretRef`); the built-in server decrypts it into its scratch volume
    before loading. Not with `fromFineTuneJob`: that serves the job's export on its own claim, in clear."""

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
        CelRule(
            rule="!has(self.fromFineTuneJob) || !has(self.verifyManifest) || self.verifyManifest",
            message="a FineTuneJob's artifact is always checked against its manifest; verifyManifest: false "
            "is for a model given by uri",
            holds=lambda m: m.from_fine_tune_job is None or m.verify_manifest,
            field_path=".verifyManifest",
        ),
        CelRule(
            rule="!has(self.fromFineTuneJob) || !has(self.encryptionKeySecretRef)",
            message="fromFineTuneJob serves the job's export on its own claim, which is not encrypted; "
            "set encryptionKeySecretRef only with uri",
            holds=lambda m: m.from_fine_tune_job is None or m.encryption_key_secret_ref is None,
            field_path=".encryptionKeySecretRef",
        ),
    )


class Runtime(ApiModel):
    """The inference server: the built-in `finetune_server` (CPU or GPU, every task) or vLLM's OpenAI
    server (GPU, causal-lm). Both answer on the same port with the same probes and metrics."""

    type: Literal["builtin", "vllm"] = "builtin"
    """`builtin`: `python -m finetune_server`; `vllm`: `vllm serve` (GPU clusters, causal-lm)."""
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Server container image, overriding the operator's default for the runtime type."""
    dtype: Dtype = "auto"
    """Weights' compute dtype: `auto` (bf16 on a GPU, fp32 on the CPU), `bf16`, `fp16`, `fp32`."""
    max_batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    """Requests batched into one forward pass."""
    max_wait_ms: Annotated[float, Field(ge=0.0, le=1000.0)] = 5.0
    """How long the first request of a batch waits for others to join it."""
    max_queued_requests: Annotated[int, Field(ge=1, le=10000)] = 32
    """Requests admitted and not finished per replica; above it the server answers 429 with
    `Retry-After`."""
    max_new_tokens: Annotated[int, Field(ge=1, le=32768)] = 256
    """Upper limit of generated tokens per request (causal-lm); more is refused with 400."""
    max_input_tokens: Annotated[int, Field(ge=1, le=1000000)] = 2048
    """Longest accepted prompt in tokens; longer is refused with 413."""
    request_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    """Requests running longer are cancelled and answered 504."""
    fault_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Fraction of inference requests answered 500 on purpose, to exercise canary analysis and rollback
    (built-in runtime only)."""

    cel_rules = (
        CelRule(
            rule="self.type != 'vllm' || self.dtype != 'fp32'",
            message="vllm serves on GPUs in bf16, fp16 or auto; use runtime.type builtin for fp32",
            holds=lambda m: m.type != "vllm" or m.dtype != "fp32",
            field_path=".dtype",
        ),
        CelRule(
            rule="self.type != 'vllm' || self.faultErrorRate == 0.0",
            message="faultErrorRate is a setting of the builtin runtime",
            holds=lambda m: m.type != "vllm" or m.fault_error_rate == 0.0,
            field_path=".faultErrorRate",
        ),
    )


class Quantization(ApiModel):
    """Quantisation at load, behind the quality gate: the server measures the quantised model against the
    one before it (pruned or not) on the held-out sample the trainer shipped in the artifact, and stays
    not-ready above `maxQualityDrop`."""

    method: QuantizationMethod = "none"
    """`none`; CPU: `int8-dynamic`, `onnx-int8`; GPU: `bnb-int8`, `bnb-nf4`, `int4-weight-only`,
    `fp8-dynamic` (the server's names, docs/serving.md)."""
    max_quality_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    """Largest tolerated relative drop of the quality metric (perplexity for causal-lm, accuracy for
    classifiers; 0.02 = 2 % worse); above it `ModelReady` is False with reason `QualityGateFailed`."""


class Pruning(ApiModel):
    """Magnitude pruning of linear layers at load, before quantisation, behind its own quality gate."""

    method: PruningMethod = "none"
    """`magnitude`: zero the `sparsity` fraction of smallest weights (unstructured); `2:4`: zero the two
    smallest of every four weights (semi-structured, 50 %)."""
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    """Fraction of weights zeroed: required with `magnitude`; unset or 0.5 with `2:4`."""
    max_quality_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    """Largest tolerated relative drop against the unpruned model."""

    cel_rules = (
        CelRule(
            rule="self.method != 'magnitude' || (has(self.sparsity) && self.sparsity > 0.0)",
            message="sparsity above 0 is required with method magnitude",
            holds=lambda m: m.method != "magnitude" or bool(m.sparsity),
            field_path=".sparsity",
        ),
        CelRule(
            rule="self.method != '2:4' || !has(self.sparsity) || self.sparsity == 0.5",
            message="method 2:4 zeroes exactly half the weights; leave sparsity unset or 0.5",
            holds=lambda m: m.method != "2:4" or m.sparsity in (None, 0.5),
            field_path=".sparsity",
        ),
        CelRule(
            rule="self.method != 'none' || !has(self.sparsity) || self.sparsity == 0.0",
            message="sparsity needs a pruning method (magnitude or 2:4)",
            holds=lambda m: m.method != "none" or not m.sparsity,
            field_path=".sparsity",
        ),
    )


class QualityGate(ApiModel):
    """The measurement behind the quality gates."""

    enabled: bool = True
    """Measure compression before reporting ready (off: the compressed model is trusted unmeasured)."""
    samples: Annotated[int, Field(ge=1, le=100000)] = 64
    """Rows of the artifact's held-out sample used."""


class Autoscaling(ApiModel):
    """A HorizontalPodAutoscaler on CPU or on requests waiting (the server's metric)."""

    min_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    """Fewest replicas."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)]
    """Most replicas."""
    target_cpu_utilization: Annotated[int, Field(ge=1, le=100)] | None = None
    """Average CPU utilisation (percent of the request) to scale at; needs `resources.cpu`."""
    target_requests_waiting: Annotated[int, Field(ge=1, le=10000)] | None = None
    """Average requests waiting per replica (`vllm:num_requests_waiting`, served to the HPA by a custom
    metrics adapter such as prometheus-adapter) to scale at."""

    cel_rules = (
        CelRule(
            rule="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            holds=lambda m: m.min_replicas <= m.max_replicas,
            field_path=".minReplicas",
        ),
        CelRule(
            rule="has(self.targetCpuUtilization) || has(self.targetRequestsWaiting)",
            message="set targetCpuUtilization or targetRequestsWaiting",
            holds=lambda m: m.target_cpu_utilization is not None or m.target_requests_waiting is not None,
        ),
    )


class ServingResources(PodResources):
    """What each server replica requests, and where it may run."""

    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """GPUs per replica; 0 serves on CPU."""


class CanaryStep(ApiModel):
    """One step of a canary rollout."""

    weight: Annotated[int, Field(ge=1, le=99)]
    """Percent of requests for the new revision during this step (after the last step it takes all)."""
    pause_seconds: Annotated[int, Field(ge=0, le=86400)] = 60
    """Least time the step lasts; it is promoted once this has passed and the analysis holds."""


class CanaryAnalysis(ApiModel):
    """Thresholds the new revision must hold during each step. A breach rolls back at once; too little
    traffic is inconclusive: the step waits, and fails after `inconclusiveTimeoutSeconds`, never passes."""

    interval_seconds: Annotated[int, Field(ge=1, le=3600)] = 30
    """How often the canary's metrics are read and judged."""
    min_requests: Annotated[int, Field(ge=1, le=1000000)] = 20
    """Requests the new revision must have answered in a step before the step can pass."""
    max_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """Largest tolerated fraction of 5xx answers."""
    max_p95_latency_ms: Annotated[int, Field(ge=1)] | None = None
    """Largest tolerated 95th-percentile end-to-end request latency in milliseconds."""
    inconclusive_timeout_seconds: Annotated[int, Field(ge=0, le=86400)] = 600
    """How long past a step's `pauseSeconds` too little traffic is waited out before the rollout fails
    (reason `AnalysisInconclusive`) and rolls back."""
    prometheus_url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)] | None = None
    """Read the metrics from this Prometheus (`/api/v1/query`) instead of the pods' own `/metrics`."""


class GatewayRef(ApiModel):
    """A Gateway API Gateway whose HTTPRoute splits the traffic by weight."""

    name: DnsLabel
    """Name of the Gateway."""
    namespace: DnsLabel | None = None
    """Its namespace (the deployment's when omitted)."""


class Canary(ApiModel):
    """Canary rollout: traffic shifts to the new revision by steps while the analysis holds."""

    steps: Annotated[list[CanaryStep], Field(min_length=1, max_length=20)]
    """Traffic steps, by increasing weight; after the last the new revision takes all traffic."""
    analysis: CanaryAnalysis = Field(default_factory=CanaryAnalysis)
    """Thresholds checked during each step."""
    gateway_ref: GatewayRef | None = None
    """Split by HTTPRoute weights through this Gateway (when the Gateway API CRDs are installed); without
    it the split is by replica proportion behind the one Service."""

    cel_rules = (
        CelRule(
            rule="self.steps.map(s, s.weight).isSorted()",
            message="steps must be in increasing order of weight",
            holds=lambda m: [s.weight for s in m.steps] == sorted(s.weight for s in m.steps),
            field_path=".steps",
        ),
    )


class Rollout(ApiModel):
    """How a new revision (any change of what the pods run) replaces the old one."""

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
    """Bearer API keys; on by default. Health endpoints stay open."""

    enabled: bool = True
    """Require `Authorization: Bearer <key>` on the API (401 otherwise)."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the accepted keys, one per line (rotation is picked up without a restart). When
    omitted the operator creates the Secret `<name>-api-keys` with one random key under `api-keys`."""

    cel_rules = (
        CelRule(
            rule="self.enabled || !has(self.apiKeySecretRef)",
            message="apiKeySecretRef needs enabled true",
            holds=lambda m: m.enabled or m.api_key_secret_ref is None,
            field_path=".apiKeySecretRef",
        ),
    )


class Monitoring(ApiModel):
    """Metrics: the server's `/metrics` (vLLM's metric names) is always served."""

    pod_monitor: bool = True
    """Create a Prometheus Operator PodMonitor for the server pods (when its CRDs are installed)."""
    scrape_interval_seconds: Annotated[int, Field(ge=1, le=3600)] = 15
    """PodMonitor scrape interval."""


class Feedback(ApiModel):
    """Collection of user feedback on answers (`POST /v1/feedback`), appended as JSON lines to a volume."""

    enabled: bool = False
    """Accept `POST /v1/feedback` and record generations (so feedback joins what was asked and answered)."""
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 30
    """Entries older than this are left out of exports."""
    storage: VolumeClaim = Field(default_factory=VolumeClaim)
    """Volume the feedback is stored on (ReadWriteMany when there can be several replicas)."""


class ModelDeploymentSpec(ApiModel):
    """Which model to serve, how it is compressed, scaled, rolled out and protected."""

    model: ModelReference
    """The model to serve."""
    runtime: Runtime = Field(default_factory=Runtime)
    """Inference server settings."""
    quantization: Quantization = Field(default_factory=Quantization)
    """Quantisation and the quality gate."""
    pruning: Pruning = Field(default_factory=Pruning)
    """Pruning (behind its own quality gate)."""
    quality_gate: QualityGate = Field(default_factory=QualityGate)
    """How compression is measured."""
    replicas: Annotated[int, Field(ge=0, le=1000)] | None = None
    """Fixed number of replicas (1 when neither this nor `autoscaling` is set)."""
    autoscaling: Autoscaling | None = None
    """Autoscaling instead of a fixed replica count."""
    resources: ServingResources = Field(default_factory=ServingResources)
    """Per-replica resources and placement."""
    rollout: Rollout = Field(default_factory=Rollout)
    """Rollout strategy for new revisions."""
    auth: Auth = Field(default_factory=Auth)
    """Request authentication (on by default)."""
    monitoring: Monitoring = Field(default_factory=Monitoring)
    """Metrics."""
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
            rule=f"!({cel_field('quantization.method', Quantization().method)} in {list(GPU_ONLY_METHODS)})"
            f" || {cel_field('resources.gpus', ServingResources().gpus)} >= 1",
            message="quantization bnb-int8, bnb-nf4, int4-weight-only and fp8-dynamic need GPUs: "
            "set resources.gpus to at least 1, or use int8-dynamic or onnx-int8 on the CPU",
            holds=lambda s: s.quantization.method not in GPU_ONLY_METHODS or s.resources.gpus >= 1,
            field_path=".quantization.method",
        ),
        CelRule(
            rule=f"!({cel_field('quantization.method', Quantization().method)} in {list(CPU_ONLY_METHODS)})"
            f" || {cel_field('resources.gpus', ServingResources().gpus)} == 0",
            message="quantization int8-dynamic and onnx-int8 run on the CPU: set resources.gpus to 0, "
            "or use bnb-int8, bnb-nf4, int4-weight-only or fp8-dynamic on GPUs",
            holds=lambda s: s.quantization.method not in CPU_ONLY_METHODS or s.resources.gpus == 0,
            field_path=".quantization.method",
        ),
        CelRule(
            rule="!has(self.resources) || !has(self.resources.gpuProduct)"
            f" || {cel_field('resources.gpus', ServingResources().gpus)} >= 1",
            message="resources.gpuProduct needs resources.gpus of at least 1",
            holds=lambda s: s.resources.gpu_product is None or s.resources.gpus >= 1,
            field_path=".resources.gpuProduct",
        ),
        CelRule(
            rule=f"{cel_field('runtime.type', Runtime().type)} != 'vllm'"
            f" || {cel_field('resources.gpus', ServingResources().gpus)} >= 1",
            message="runtime vllm needs GPUs: set resources.gpus to at least 1, or use runtime.type builtin",
            holds=lambda s: s.runtime.type != "vllm" or s.resources.gpus >= 1,
            field_path=".runtime.type",
        ),
        CelRule(
            rule=f"{cel_field('runtime.type', Runtime().type)} != 'vllm'"
            f" || {cel_field('quantization.method', Quantization().method)} in {list(VLLM_METHODS)}",
            message="runtime vllm applies quantization none, fp8-dynamic or bnb-nf4; "
            "use runtime.type builtin for the other methods",
            holds=lambda s: s.runtime.type != "vllm" or s.quantization.method in VLLM_METHODS,
            field_path=".quantization.method",
        ),
        CelRule(
            rule=f"{cel_field('runtime.type', Runtime().type)} != 'vllm'"
            f" || {cel_field('pruning.method', Pruning().method)} == 'none'",
            message="runtime vllm can't prune at load; use runtime.type builtin for pruning",
            holds=lambda s: s.runtime.type != "vllm" or s.pruning.method == "none",
            field_path=".pruning.method",
        ),
        CelRule(
            rule=f"{cel_field('runtime.type', Runtime().type)} != 'vllm'"
            " || !has(self.model.task) || self.model.task == 'causal-lm'",
            message="runtime vllm serves causal-lm models; use runtime.type builtin for other tasks",
            holds=lambda s: s.runtime.type != "vllm" or s.model.task in (None, "causal-lm"),
            field_path=".runtime.type",
        ),
        CelRule(
            rule=f"{cel_field('runtime.type', Runtime().type)} != 'vllm'"
            " || !has(self.model.encryptionKeySecretRef)",
            message="runtime vllm reads the model folder itself and can't decrypt it; use runtime.type "
            "builtin for a model encrypted at rest",
            holds=lambda s: s.runtime.type != "vllm" or s.model.encryption_key_secret_ref is None,
            field_path=".model.encryptionKeySecretRef",
        ),
        CelRule(
            rule=f"!({cel_field('quantization.method', Quantization().method)} in {list(CPU_ONLY_METHODS)})"
            f" || {cel_field('runtime.dtype', Runtime().dtype)} in ['auto', 'fp32']",
            message="quantization int8-dynamic and onnx-int8 compute in fp32: "
            "set runtime.dtype to auto or fp32",
            holds=lambda s: (
                s.quantization.method not in CPU_ONLY_METHODS or s.runtime.dtype in ("auto", "fp32")
            ),
            field_path=".runtime.dtype",
        ),
        CelRule(
            rule="!has(self.autoscaling) || !has(self.autoscaling.targetCpuUtilization)"
            " || (has(self.resources) && has(self.resources.cpu))",
            message="autoscaling.targetCpuUtilization needs resources.cpu (utilisation is a share of it)",
            holds=lambda s: (
                s.autoscaling is None
                or s.autoscaling.target_cpu_utilization is None
                or s.resources.cpu is not None
            ),
            field_path=".autoscaling.targetCpuUtilization",
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
    fine_tune_job: str | None = None
    """The FineTuneJob it came from."""
    encryption_key_secret_ref: SecretKeyRef | None = None
    """The Secret key the model is decrypted with, when it is encrypted at rest."""


class QualityResult(StatusModel):
    """One compression step's measurement by the server's quality gate (from its readiness answer)."""

    method: str | None = None
    """Method applied."""
    metric: str | None = None
    """Quality metric compared (e.g. `perplexity`, `accuracy`)."""
    baseline: float | None = None
    """Metric of the model before this step."""
    value: float | None = None
    """Metric after it."""
    quality_drop: float | None = None
    """Measured relative drop of the metric (0.01 = 1 % worse)."""
    max_quality_drop: float | None = None
    """The gate's threshold."""
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Size of the weights after this step."""
    original_size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Size before it."""
    sparsity: float | None = None
    """Measured fraction of zero weights (pruning)."""
    passed: bool | None = None
    """Whether the gate passed."""


class Revision(StatusModel):
    """One revision (a distinct pod template and server config) the deployment has run."""

    name: str
    """Revision name: a digest of what its pods run."""
    model_uri: str | None = None
    """Model served by this revision."""
    created_at: datetime | None = None
    """When the revision was first seen."""


class AnalysisResult(StatusModel):
    """One canary analysis: the new revision's figures over the current step."""

    verdict: Literal["Pass", "Fail", "Inconclusive"] | None = None
    """`Pass`: thresholds hold over at least minRequests; `Fail`: a threshold is breached;
    `Inconclusive`: too few requests to tell."""
    requests: Annotated[int, Field(ge=0)] = 0
    """Requests the canary answered in the current step."""
    errors: Annotated[int, Field(ge=0)] = 0
    """Of which 5xx."""
    error_rate: float | None = None
    """Fraction of 5xx answers."""
    p95_latency_ms: float | None = None
    """95th-percentile latency in milliseconds (bucket upper bound)."""
    stable_error_rate: float | None = None
    """The stable revision's error rate over the same time, for comparison."""
    message: str | None = None
    """The decision in words."""
    checked_at: datetime | None = None
    """When the metrics were read."""


class RolloutEvent(StatusModel):
    """One decision of the rollout, as it was made."""

    time: datetime
    """When it was made."""
    revision: str
    """The revision it concerns."""
    decision: Literal["Started", "Promoted", "Completed", "Waiting", "RolledBack"]
    """`Started` a canary, `Promoted` it to the next step, `Completed` (it is now stable), `Waiting`
    (inconclusive), `RolledBack`."""
    step: Annotated[int, Field(ge=0)] = 0
    """Step index the decision left the rollout at."""
    weight: Annotated[int, Field(ge=0, le=100)] = 0
    """Canary traffic weight after the decision."""
    reason: str = ""
    """CamelCase reason (also the Event's reason)."""
    message: str = ""
    """What was measured and decided."""


MAX_HISTORY = 20
"""Entries kept in `status.rollout.history` (oldest dropped first)."""


class RolloutStatus(StatusModel):
    """Which revision serves, and the progress of a canary."""

    stable_revision: str | None = None
    """Revision taking (the rest of) the traffic."""
    canary_revision: str | None = None
    """Revision under test while a canary runs."""
    failed_revision: str | None = None
    """The last revision rolled back; it is not tried again until the spec changes."""
    step: Annotated[int, Field(ge=0)] = 0
    """Index of the current step in `spec.rollout.canary.steps`."""
    weight: Annotated[int, Field(ge=0, le=100)] = 0
    """Effective percent of traffic the canary receives now (by replica proportion or route weight)."""
    step_started_at: datetime | None = None
    """When the current step began (the analysis window starts here)."""
    analysis: AnalysisResult | None = None
    """The latest analysis."""
    history: Annotated[list[RolloutEvent], Field(max_length=MAX_HISTORY)] = Field(default_factory=list)
    """Decisions, oldest first."""


class ModelDeploymentStatus(ConditionedStatus):
    """Observed state. Conditions ModelReady, Available, Progressing, Degraded and the summary Ready."""

    conditions: Annotated[list[Condition], Field(json_schema_extra=CONDITIONS_LIST_SCHEMA)] = Field(
        default_factory=list
    )
    """ModelReady, Available, Progressing, Degraded, Ready."""
    endpoint: str | None = None
    """Base URL of the OpenAI-compatible API inside the cluster (`http://NAME.NS.svc/v1`)."""
    api_key_secret: str | None = None
    """Secret holding the accepted API keys."""
    model: ResolvedModel | None = None
    """The model being served."""
    replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas of all revisions."""
    ready_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas ready to serve."""
    revisions: Annotated[list[Revision], Field(max_length=MAX_HISTORY)] = Field(default_factory=list)
    """Recent revisions, newest last."""
    rollout: RolloutStatus | None = None
    """Stable and canary revisions, canary weight, analysis and the decision history."""
    quantization: QualityResult | None = None
    """The quality gate's measurement of quantisation (stable revision's pods)."""
    pruning: QualityResult | None = None
    """The quality gate's measurement of pruning."""


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
