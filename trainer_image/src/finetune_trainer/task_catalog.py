"""The task catalog: what each training task reads, computes and supports, written down once.

Both sides of the contract build from it: the FineTuneJob API (its CEL rules and Python checks, in
``finetune_operator.api.finetunejob``) and the trainer config's validators (``finetune_trainer.config``).
So a metric, a column or a feature the API accepts for a task is one the trainer's config accepts for it.

Torch-free and dependency-free on purpose: the operator imports it, and ``finetune_trainer.data`` may too
(it sits below the trainer config). Names are the wire names (task and metric names as users write them;
field-mapping columns as snake_case field names, camelCase on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

TaskName = Literal[
    "causal-lm", "sequence-classification", "image-classification", "object-detection", "recommendation"
]
Modality = Literal["text", "image", "interactions"]

#: Every metric name any task can compute, in the order the API lists them.
MetricName = Literal[
    "loss",
    "perplexity",
    "accuracy",
    "f1",
    "precision",
    "recall",
    "auc",
    "map",
    "map50",
    "map75",
    "ndcg",
    "hit-rate",
]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)

#: Optional features of a job, and where in a FineTuneJob spec each is switched on.
FEATURE_FIELDS: dict[str, str] = {
    "template": "dataset.template",
    "generation-samples": "evaluation.generationSamples",
    "label-smoothing": "hyperparameters.labelSmoothing",
    "image-augmentation": "dataset.augmentation.image",
    # Checks every image row (decodable, colour mode, size); text and interactions have no images.
    "image-validation": "dataset.images",
    "text-augmentation": "dataset.augmentation.text",
    "negative-sampling": "dataset.augmentation.negatives",
    "top-k": "evaluation.topK",
    # Copies of training rows made when the data is prepared (template variants, text perturbations); image
    # transforms are drawn on the fly and interactions are never copied.
    "augmentation-copies": "dataset.augmentation.copies",
    # The hash split's seed; recommendation splits leave-last-out per user by time (no randomness).
    "split-seed": "dataset.split.seed",
    # Text cleaning, PII scanning and near-duplicate detection read text; images and interactions have none.
    "html-stripping": "dataset.preprocessing.stripHtml",
    "min-length": "dataset.preprocessing.minLength",
    "max-length": "dataset.preprocessing.maxLength",
    "pii-scanning": "dataset.preprocessing.pii",
    "near-dedup": "dataset.preprocessing.dedup.mode",
}

#: The text stages of data preparation (features of the text tasks only).
TEXT_STAGES: frozenset[str] = frozenset(
    {"html-stripping", "min-length", "max-length", "pii-scanning", "near-dedup"}
)


@dataclass(frozen=True)
class FieldLayout:
    """One way a task's rows can be laid out: the trainer's ``data.fields.kind`` and its columns."""

    kind: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional


@dataclass(frozen=True)
class TaskInfo:
    name: TaskName
    modality: Modality
    #: Metrics the task computes on an evaluation split; ``loss`` first (always computed).
    metrics: tuple[str, ...]
    #: Row layouts, the default (used when no field mapping is given) first.
    layouts: tuple[FieldLayout, ...]
    #: Optional features (keys of FEATURE_FIELDS) that apply to the task.
    features: frozenset[str]
    #: Whether this trainer trains the task today; the others are refused by the trainer config.
    implemented: bool
    #: The training methods the task supports (``full``, ``lora``, ``qlora``).
    methods: tuple[str, ...] = ("full", "lora", "qlora")

    def layout(self, kind: str) -> FieldLayout | None:
        return next((layout for layout in self.layouts if layout.kind == kind), None)


CATALOG: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        TaskInfo(
            name="causal-lm",
            modality="text",
            metrics=("loss", "perplexity", "accuracy"),
            layouts=(
                FieldLayout("prompt-completion", ("prompt", "completion")),
                FieldLayout("instruction", ("instruction", "output"), ("input",)),
                FieldLayout("chat", ("messages",)),
                FieldLayout("text", ("text",)),
            ),
            features=frozenset({"template", "generation-samples", "augmentation-copies", "split-seed"})
            | TEXT_STAGES,
            implemented=True,
        ),
        TaskInfo(
            name="sequence-classification",
            modality="text",
            metrics=("loss", "accuracy", "f1", "precision", "recall", "auc"),
            layouts=(FieldLayout("classification", ("text", "label"), ("text_pair",)),),
            features=frozenset({"label-smoothing", "text-augmentation", "augmentation-copies", "split-seed"})
            | TEXT_STAGES,
            implemented=True,
        ),
        TaskInfo(
            name="image-classification",
            modality="image",
            metrics=("loss", "accuracy", "f1", "precision", "recall", "auc"),
            layouts=(FieldLayout("image-classification", ("image", "label")),),
            features=frozenset({"label-smoothing", "image-augmentation", "image-validation", "split-seed"}),
            implemented=True,
            methods=("full",),
        ),
        TaskInfo(
            name="object-detection",
            modality="image",
            metrics=("loss", "map", "map50", "map75"),
            layouts=(FieldLayout("object-detection", ("image", "objects")),),
            features=frozenset({"image-augmentation", "image-validation", "split-seed"}),
            implemented=True,
            methods=("full",),
        ),
        TaskInfo(
            name="recommendation",
            modality="interactions",
            # Ranking over every item the user has not interacted with in training, at evaluation.topK:
            # recall@k, NDCG@k, hit-rate@k and the AUC of the held-out item (a popularity baseline beside).
            metrics=("loss", "recall", "ndcg", "hit-rate", "auc"),
            layouts=(FieldLayout("interactions", ("user", "item"), ("rating", "timestamp")),),
            features=frozenset({"negative-sampling", "top-k"}),
            implemented=True,
            methods=("full",),
        ),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(CATALOG)
IMPLEMENTED_TASK_NAMES: tuple[str, ...] = tuple(name for name, info in CATALOG.items() if info.implemented)

#: Every field-mapping column of every layout, in first-use order.
FIELD_COLUMNS: tuple[str, ...] = tuple(
    dict.fromkeys(column for info in CATALOG.values() for layout in info.layouts for column in layout.columns)
)
#: Every layout kind (the trainer's ``data.fields.kind`` values).
LAYOUT_KINDS: tuple[str, ...] = tuple(
    dict.fromkeys(layout.kind for info in CATALOG.values() for layout in info.layouts)
)


def tasks_with(feature: str) -> tuple[str, ...]:
    """Tasks a feature applies to, in catalog order."""
    return tuple(name for name, info in CATALOG.items() if feature in info.features)


def feature_message(feature: str) -> str:
    """The one refusal message for a feature set on a task it does not apply to (API and trainer alike)."""
    tasks = tasks_with(feature)
    where = ", ".join(tasks) if tasks else "no task yet"
    return f"{FEATURE_FIELDS[feature]} applies to {where} only"


def full_only_tasks() -> tuple[str, ...]:
    """Tasks that train the whole model only (no LoRA/QLoRA adapters), in catalog order."""
    return tuple(name for name, info in CATALOG.items() if info.methods == ("full",))


def method_message() -> str:
    """The one refusal message for a method a task does not support (API and trainer alike)."""
    return f"method: {', '.join(full_only_tasks())} train the full model only; set method full"


def layout_for(task: str, columns: set[str]) -> FieldLayout | None:
    """The task's layout that the mapped ``columns`` select: all its required columns mapped and no column
    outside it (a mapped column is always read). None when no layout fits."""
    for layout in CATALOG[task].layouts:
        if set(layout.required) <= columns and columns <= set(layout.columns):
            return layout
    return None


def describe_layouts() -> str:
    """``task: a+b or c; ...`` with camelCase column names, for messages."""
    return "; ".join(
        f"{name}: " + " or ".join("+".join(_camel(c) for c in layout.required) for layout in info.layouts)
        for name, info in CATALOG.items()
    )


def describe_metrics() -> str:
    return "; ".join(f"{name}: {', '.join(info.metrics)}" for name, info in CATALOG.items())


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
