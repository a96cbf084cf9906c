"""The trainer config: the contract between the operator (which renders it into a ConfigMap) and the trainer.

Torch-free on purpose: the operator imports this module to render and validate configs.

Every section rejects unknown keys with a message that names the key and suggests the closest valid one
(``unknown key 'lerningRate' in hyperparameters; did you mean 'learningRate'?``). Keys are camelCase in
files; Python code may use the snake_case field names (``populate_by_name``).
"""

from __future__ import annotations

import enum
import json
import posixpath
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from finetune_trainer.data.config import CleaningConfig, DataConfig
from finetune_trainer.schema import ConfigSection, unknown_key_message, valid_keys
from finetune_trainer.task_catalog import CATALOG, IMPLEMENTED_TASK_NAMES, feature_message, method_message

#: The config schema version this trainer reads. Bump on incompatible changes; the operator renders it.
CONFIG_VERSION = "v1"
SUPPORTED_VERSIONS = frozenset({CONFIG_VERSION})


class Task(enum.StrEnum):
    CAUSAL_LM = "causal-lm"
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    IMAGE_CLASSIFICATION = "image-classification"
    OBJECT_DETECTION = "object-detection"
    RECOMMENDATION = "recommendation"


class ModelSource(ConfigSection):
    section_name = "model"

    path: str = Field(
        min_length=1,
        description=(
            "Local or mounted path (``/models/llama``, ``file:///models/llama``, a PVC mount) or "
            "``hf://org/name`` (needs network at run time)."
        ),
    )
    revision: str | None = Field(
        default=None, description="Git revision for ``hf://`` models (``hf://org/name@rev`` also works)."
    )
    license: str | None = Field(
        default=None,
        description="SPDX licence of the base model, checked against the data section's allowlist when set.",
    )
    trust_remote_code: bool = False


class Method(enum.StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class LoraConfig(ConfigSection):
    section_name = "lora"

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description='Module names to adapt, or ``["all-linear"]``.',
    )
    bias: Literal["none", "all", "lora_only"] = "none"


class LrScheduler(enum.StrEnum):
    """transformers' ``get_scheduler`` schedules (``-`` for its ``_``), the names FineTuneJob uses."""

    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine-with-restarts"
    POLYNOMIAL = "polynomial"
    #: No warm-up: the peak rate from the first step (warmupSteps/warmupRatio are refused).
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant-with-warmup"


class Hyperparameters(ConfigSection):
    section_name = "hyperparameters"

    epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "When set, train exactly this many optimizer steps (cycling over epochs), ignoring ``epochs``."
        ),
    )
    micro_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: LrScheduler = LrScheduler.COSINE
    lr_cycles: int = Field(
        default=1, ge=1, description="Cosine cycles (hard restarts) of ``lrScheduler: cosine-with-restarts``."
    )
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float = Field(
        default=0.03,
        ge=0,
        le=1,
        description="Used when ``warmupSteps`` is unset: a fraction of the total steps.",
    )
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    max_grad_norm: float = Field(
        default=1.0, ge=0, description="Gradient clipping by global norm; 0 disables it."
    )
    dropout: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Overrides every dropout probability in the model config when set.",
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _schedule_options(self) -> Self:
        explicit_ratio = self.warmup_ratio if "warmup_ratio" in self.model_fields_set else 0.0
        if self.lr_scheduler is LrScheduler.CONSTANT and (self.warmup_steps or explicit_ratio):
            raise ValueError(
                "lrScheduler 'constant' has no warm-up: use 'constant-with-warmup', or leave warmupSteps "
                "and warmupRatio unset"
            )
        if self.lr_cycles != 1 and self.lr_scheduler is not LrScheduler.COSINE_WITH_RESTARTS:
            raise ValueError("hyperparameters.lrCycles needs lrScheduler 'cosine-with-restarts'")
        return self


class Evaluation(ConfigSection):
    section_name = "evaluation"

    every_steps: int = Field(
        default=0,
        ge=0,
        description=(
            "Evaluate on the validation split every N optimizer steps (and after the last); 0: not by step."
        ),
    )
    every_epoch: bool = Field(
        default=True,
        description="Evaluate on the validation split at the end of each epoch. With ``everySteps: 0`` and "
        "this off, only before and after training.",
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["loss"],
        min_length=1,
        description="Metrics the job asks for (FineTuneJob's evaluation.metrics); each one the task "
        "computes. causal-lm reports loss, perplexity and accuracy at every evaluation whatever this lists.",
    )
    before_training: bool = Field(
        default=True,
        description='Evaluate the base model before training (the "before" numbers in metrics.json).',
    )
    batch_size: int = Field(default=8, ge=1)
    max_batches: int | None = Field(
        default=None, ge=1, description="Cap on evaluation batches per rank (None: the whole split)."
    )
    max_samples: int | None = Field(
        default=None, ge=1, description="Evaluate on at most this many rows of each split (None: all)."
    )
    generation_samples: int = Field(
        default=0,
        ge=0,
        le=100,
        description=(
            "Validation prompts to complete greedily with the final model (metrics.json and the model card)."
        ),
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    top_k: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Recommendation: the cut-off k of recall@k, NDCG@k and hit-rate@k.",
    )


class EarlyStoppingMetric(enum.StrEnum):
    """Every metric of the task catalog (``task_catalog.METRIC_NAMES``, a test keeps them equal), named as in
    FineTuneJob's evaluation.metrics; the config refuses one the task does not compute."""

    LOSS = "loss"
    PERPLEXITY = "perplexity"
    ACCURACY = "accuracy"
    F1 = "f1"
    PRECISION = "precision"
    RECALL = "recall"
    AUC = "auc"
    MAP = "map"
    MAP50 = "map50"
    MAP75 = "map75"
    NDCG = "ndcg"
    HIT_RATE = "hit-rate"


class EarlyStopping(ConfigSection):
    section_name = "earlyStopping"

    enabled: bool = False
    metric: EarlyStoppingMetric = EarlyStoppingMetric.LOSS
    mode: Literal["min", "max"] = "min"
    patience: int = Field(
        default=3,
        ge=1,
        description="Evaluations without an improvement larger than ``minDelta`` before training stops.",
    )
    min_delta: float = Field(default=0.0, ge=0)


class Checkpointing(ConfigSection):
    section_name = "checkpointing"

    dir: str = Field(
        default="/checkpoints",
        description="Must be shared by all pods of a multi-node job (a ReadWriteMany volume).",
    )
    every_steps: int = Field(default=0, ge=0, description="Save every N optimizer steps; 0: not by step.")
    keep_last: int = Field(default=2, ge=1)
    save_on_epoch_end: bool = True

    @model_validator(mode="after")
    def _saves_somewhere(self) -> Self:
        if self.every_steps == 0 and not self.save_on_epoch_end:
            raise ValueError(
                "checkpointing: set everySteps or saveOnEpochEnd, or no checkpoint is ever written"
            )
        return self


class Precision(enum.StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Offload(enum.StrEnum):
    NONE = "none"
    #: Optimizer state (and the optimizer step) on the CPU. ZeRO stage >= 1.
    OPTIMIZER = "optimizer"
    #: Optimizer state and parameters on the CPU. ZeRO stage 3.
    ALL = "all"


class Distributed(ConfigSection):
    section_name = "distributed"

    zero_stage: int = Field(default=2, ge=0, le=3)
    offload: Offload = Offload.NONE
    precision: Precision = Precision.BF16
    shutdown_timeout_seconds: int = Field(
        default=120,
        ge=1,
        description="Seconds torchrun waits for workers to save after SIGTERM before killing them.",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> Self:
        if self.offload is Offload.OPTIMIZER and self.zero_stage < 1:
            raise ValueError("distributed.offload 'optimizer' needs zeroStage >= 1")
        if self.offload is Offload.ALL and self.zero_stage != 3:
            raise ValueError("distributed.offload 'all' (parameters too) needs zeroStage 3")
        return self


class Output(ConfigSection):
    section_name = "output"

    dir: str = "/output"
    uri: str | None = Field(
        default=None,
        description="How users address ``dir`` (e.g. ``pvc://claim/output/model``); the reported artifact "
        "and model card are under it. The in-pod path is reported when unset.",
    )
    model_name: str | None = Field(
        default=None,
        description="The model's name (FineTuneJob's output.modelName, else the job's name): the model "
        "card's title. ``Fine-tuned <base model>`` when unset.",
    )
    merge_adapter: bool = Field(
        default=False,
        description="For LoRA/QLoRA: also write the base model with the adapter merged into ``model/``.",
    )
    copy_to: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "After the final export, rank 0 copies everything in ``dir`` here: ``s3://bucket/prefix`` (s3fs, "
            "credentials and endpoint from the standard ``AWS_*`` variables), ``file:///path`` or a local "
            "(mounted) path. ``COMPLETE`` is written last. The reported artifact then points at the copy."
        ),
    )
    copy_to_uri: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "How users address ``copyTo`` (e.g. ``pvc://claim/path`` when ``copyTo`` is that claim's mount); "
            "``copyTo`` itself when unset."
        ),
    )
    encryption_key_file: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "A file holding a 32-byte AES key (raw, hex or base64; a mounted Secret): the copy at "
            "``copyTo`` is encrypted with AES-256-GCM (finetune_trainer.encryption). Needs ``copyTo``."
        ),
    )
    copy_attempts: int = Field(
        default=4,
        ge=1,
        le=20,
        description="Tries per file for transient copy errors (1 s, 2 s, 4 s... between them).",
    )

    @property
    def copy_address(self) -> str | None:
        """How users address the copy: ``copyToUri``, else ``copyTo``; None when nothing is copied."""
        return self.copy_to_uri or self.copy_to

    @model_validator(mode="after")
    def _copy_outside_dir(self) -> Self:
        if self.copy_to is None:
            if self.encryption_key_file is not None:
                raise ValueError(
                    "output.encryptionKeyFile: encryption applies to the copy at output.copyTo "
                    "(spec.output.uri), which is not set"
                )
            return self
        local = local_copy_path(self.copy_to)
        if local is not None:
            out, dest = PurePosixPath(posixpath.normpath(self.dir)), PurePosixPath(posixpath.normpath(local))
            if dest == out or out in dest.parents:
                raise ValueError(
                    f"output.copyTo {self.copy_to!r} is inside output.dir {self.dir!r}: the copy would "
                    "overwrite or nest in the outputs it copies (spec.output.uri points at the job's own "
                    "output folder)"
                )
        return self


def local_copy_path(uri: str) -> str | None:
    """The local path of a ``file://`` URI or a plain path; None for remote URLs (``s3://``...)."""
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if "://" not in uri:
        return uri
    return None


class Reporting(ConfigSection):
    section_name = "reporting"

    job_name: str | None = Field(
        default=None,
        description=(
            "The FineTuneJob whose status rank 0 patches; status patching is off when unset or not in a "
            "cluster."
        ),
    )
    namespace: str | None = None
    metrics_port: int = Field(
        default=9400,
        ge=0,
        le=65535,
        description="Prometheus metrics port on rank 0; 0 turns the endpoint off.",
    )
    status_throttle_seconds: float = Field(
        default=10.0, ge=0, description="Minimum seconds between two status patches."
    )
    log_every_steps: int = Field(
        default=1,
        ge=1,
        description="Log training metrics every N optimizer steps (JSON lines, Prometheus, status).",
    )
    metrics_log: str = Field(
        default="metrics.jsonl",
        description="JSON-lines metrics log; relative paths are inside ``output.dir``.",
    )


class TrainerConfig(ConfigSection):
    """The whole trainer config (``version: v1``)."""

    version: str = CONFIG_VERSION
    model: ModelSource
    task: Task = Task.CAUSAL_LM
    data: DataConfig
    method: Method = Method.LORA
    lora: LoraConfig = Field(default_factory=LoraConfig)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    checkpointing: Checkpointing = Field(default_factory=Checkpointing)
    distributed: Distributed = Field(default_factory=Distributed)
    output: Output = Field(default_factory=Output)
    reporting: Reporting = Field(default_factory=Reporting)
    seed: int = Field(
        default=42,
        description=(
            "Seed of initialisation, data order and dropout; also of data augmentation (text perturbations, "
            "image transforms, negative sampling) where ``data.augmentation.seed`` is not set."
        ),
    )

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"config version {value!r} is not supported by this trainer "
                f"(supported: {', '.join(sorted(SUPPORTED_VERSIONS))})"
            )
        return value

    @field_validator("task")
    @classmethod
    def _implemented_task(cls, value: Task) -> Task:
        # The catalog's implemented flags (torch-free; the operator reads them too) equal the keys of the
        # trainer's task registry, finetune_trainer.tasks.TASKS (a test keeps them equal).
        if value.value not in IMPLEMENTED_TASK_NAMES:
            raise ValueError(
                f"task {value.value!r} is not implemented by this trainer yet "
                f"(implemented: {', '.join(sorted(IMPLEMENTED_TASK_NAMES))})"
            )
        return value

    @model_validator(mode="after")
    def _augmentation_seeded_by_the_run(self) -> Self:
        # One rule for every augmentation (read as data.augmentation.seed by the text stage and the tasks):
        # the seed given there, else the run's. A config written back keeps the seed it was resolved to.
        if "seed" not in self.data.augmentation.model_fields_set:
            self.data.augmentation.seed = self.seed
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        ev = self.evaluation
        if self.early_stopping.enabled and ev.every_steps == 0 and not ev.every_epoch:
            raise ValueError("earlyStopping.enabled needs evaluation.everySteps > 0 or evaluation.everyEpoch")
        self._check_task_catalog()
        if self.method is Method.QLORA and self.distributed.precision is Precision.FP32:
            raise ValueError("method 'qlora' computes in bf16 or fp16; set distributed.precision accordingly")
        return self

    def _check_task_catalog(self) -> None:
        """What the task catalog says this task reads, computes and supports (the API checks the same)."""
        info = CATALOG[self.task.value]
        if self.method.value not in info.methods:
            raise ValueError(method_message())
        unknown = [m for m in self.evaluation.metrics if m not in info.metrics]
        if unknown:
            raise ValueError(
                f"evaluation.metrics {unknown} are not computed for task {info.name} "
                f"(it computes: {', '.join(info.metrics)})"
            )
        es = self.early_stopping
        if es.enabled and es.metric.value != "loss" and es.metric.value not in self.evaluation.metrics:
            raise ValueError("earlyStopping.metric must be loss or one of evaluation.metrics")
        if info.layout(self.data.fields.kind) is None:
            raise ValueError(
                f"data.fields.kind {self.data.fields.kind!r} is not a row layout of task {info.name} "
                f"({', '.join(layout.kind for layout in info.layouts)})"
            )
        used = {
            "template": self.data.template != "plain",
            "generation-samples": self.evaluation.generation_samples != 0,
            "label-smoothing": self.hyperparameters.label_smoothing != 0.0,
            "image-augmentation": self.data.augmentation.image is not None,
            "text-augmentation": self.data.augmentation.text is not None,
            "negative-sampling": self.data.augmentation.negatives is not None,
            "top-k": self.evaluation.top_k != Evaluation.model_fields["top_k"].default,
            # Set in the file (the operator writes copies, a split seed and image checks only for the tasks
            # that use them).
            "augmentation-copies": "copies" in self.data.augmentation.model_fields_set,
            "split-seed": "seed" in self.data.split.model_fields_set,
            "image-validation": "images" in self.data.model_fields_set,
            "html-stripping": self.data.cleaning.strip_html,
            "min-length": self.data.cleaning.min_chars != CleaningConfig.model_fields["min_chars"].default,
            "max-length": self.data.cleaning.max_chars is not None,
            "pii-scanning": self.data.pii.policy == "reject" or bool(self.data.pii.extra_patterns),
            "near-dedup": self.data.dedup.near,
        }
        for feature, on in used.items():
            if on and feature not in info.features:
                raise ValueError(feature_message(feature))

    def to_file_dict(self) -> dict[str, Any]:
        """The config as given (camelCase, JSON-compatible): it reads back to an equal config (an
        augmentation seed that was not given is resolved from ``seed`` again). Defaults are left out — written
        out, a default reads as set and is refused where the task ignores the setting (augmentation copies,
        split fields of interactions); the trainer version in the provenance says what they were."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class ConfigError(ValueError):
    """The config cannot be used; the trainer exits with ExitCode.CONFIG_ERROR."""


def _section_model(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that holds the last element of ``loc`` (for suggestions on nested extras)."""
    model: type[BaseModel] = root
    for part in loc[:-1]:
        if not isinstance(part, str):
            continue
        field = next(
            (f for n, f in model.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def format_validation_error(error: ValidationError, root: type[BaseModel] = BaseModel) -> str:
    """One line per problem, ``path: message``; unknown keys get a closest-key suggestion."""
    lines = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            section = _section_model(root, loc) if root is not BaseModel else None
            keys = valid_keys(section) if section else []
            parent = ".".join(str(p) for p in loc[:-1])
            message = unknown_key_message(loc[-1], parent, keys) if keys else f"unknown key {loc[-1]!r}"
        elif item["type"] == "unknown_key":
            path = ".".join(str(p) for p in loc) or "<root>"
        lines.append(f"{path}: {message}")
    return "\n".join(lines)


def parse_config(raw: Mapping[str, Any]) -> TrainerConfig:
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("invalid trainer config:\n" + format_validation_error(exc, TrainerConfig)) from exc


def load_config(path: str | Path) -> TrainerConfig:
    """Read a YAML or JSON config file (JSON is YAML, so one parser reads both)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read trainer config {path}: {exc}") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"trainer config {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"trainer config {path} must be a mapping, got {type(raw).__name__}")
    return parse_config(raw)
