"""The contract between the FineTuneJob API and the trainer config: nothing the API accepts is dropped or
replaced on the way to the trainer.

- Every leaf of the spec (walked from the pydantic models) changes the rendered trainer config when it
  changes, unless it is listed in OPERATOR_ONLY with the reason the trainer never needs it.
- Every value of every enumerated leaf is either refused by the API or rendered differently from the
  others (no value silently becomes another).
- The fallbacks found in the translator (issue 12) are each rendered, or refused with the field named.
- Defaults agree between the API (and its docs), the rendered config and the trainer's own defaults.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from finetune_operator.api import InvalidResourceError, parse_finetunejob
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.builders.trainer_config import render_trainer_config, validated_trainer_config
from finetune_operator.config import OperatorConfig
from finetune_trainer.config import ConfigError, TrainerConfig, parse_config
from finetune_trainer.task_catalog import CATALOG, FEATURE_FIELDS, feature_message

OPERATOR_ONLY: dict[str, str] = {
    "resources": "pod requests, limits and placement: the Job's pod template",
    "scheduling": "admission, restarts, deadline, TTL and suspend: decided by the operator",
    "checkpointing.storage": "the claim the operator creates or mounts; the trainer sees only the mount path",
    "distributed.nodes": "the gang shape: pods and torchrun's world size (the DeepSpeed JSON)",
    "distributed.gpusPerNode": "the gang shape: GPU requests and torchrun's processes per pod",
    "image": "the trainer container image",
    "credentialsSecret": "the pods' envFrom; the operator never reads it",
    "output.encryptionKeySecretRef": "the Secret volume the key is projected from; the trainer sees only "
    "the key file (output.encryptionKeyFile, rendered whenever a ref is set)",
}
SHUTDOWN = 90

# Valid specs with every optional section present, so each leaf has something to change: one per task and
# row layout (its columns mapped, its features on), and a minimal causal-lm one whose task can change.
_COMMON: dict[str, Any] = {
    "model": {"source": "hf://org/base"},
    "method": "lora",
    "lora": {},
    "earlyStopping": {},
    "checkpointing": {"everySteps": 100},
    "compliance": {"allowedLicenses": ["mit"]},
    "distributed": {"gpusPerNode": 1, "deepspeed": {"zeroStage": 2, "offload": "cpu"}},
    "output": {"uri": "s3://bucket-a/models"},
}
_FEATURES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # feature: (dataset keys, spec keys) that switch it on
    "template": ({"template": "alpaca"}, {}),
    "generation-samples": ({}, {}),
    "label-smoothing": ({}, {"hyperparameters": {"labelSmoothing": 0.1}}),
    "image-augmentation": ({"augmentation": {"image": {}}}, {}),
    "image-validation": ({"images": {"minSize": 8, "maxSize": 4096}}, {}),
    "text-augmentation": ({"augmentation": {"text": {"synonyms": {"good": ["fine"]}}}}, {}),
    "negative-sampling": ({"augmentation": {"negatives": {}}}, {}),
    "top-k": ({}, {"evaluation": {"topK": 10}}),
    "augmentation-copies": ({"augmentation": {"copies": 1}}, {}),
    "split-seed": ({"split": {"seed": 7}}, {}),
    "html-stripping": ({"preprocessing": {"stripHtml": True}}, {}),
    "min-length": ({"preprocessing": {"minLength": 2}}, {}),
    "max-length": ({"preprocessing": {"maxLength": 100000}}, {}),
    "pii-scanning": ({"preprocessing": {"pii": {"extraPatterns": ["emp-[0-9]+"]}}}, {}),
    "near-dedup": ({"preprocessing": {"dedup": {"mode": "near"}}}, {}),
}


def _merge(into: dict[str, Any], keys: dict[str, Any]) -> None:
    for key, value in keys.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _layout_base(task: str, kind: str) -> dict[str, Any]:
    info = CATALOG[task]
    layout = info.layout(kind)
    assert layout is not None
    dataset: dict[str, Any] = {
        "source": "file:///data/train.jsonl",
        "fieldMapping": {to_camel(column): f"{column}_column" for column in layout.columns},
        "augmentation": {},
    }
    spec: dict[str, Any] = {
        **_COMMON,
        "task": task,
        "dataset": dataset,
        "evaluation": {"everySteps": 50, "metrics": list(info.metrics)},
    }
    for feature in sorted(info.features):
        dataset_keys, spec_keys = _FEATURES[feature]
        _merge(dataset, dataset_keys)
        for key, value in spec_keys.items():
            spec[key] = {**spec.get(key, {}), **value}
    if info.methods == ("full",):  # the API refuses LoRA for these tasks
        spec["method"] = "full"
        del spec["lora"]
    if kind == "chat" and dataset.get("template") == "alpaca":
        dataset["template"] = "chatml"  # alpaca can't render chat rows
    return spec


BASES: dict[str, dict[str, Any]] = {
    f"{task}/{layout.kind}": _layout_base(task, layout.kind)
    for task, info in CATALOG.items()
    for layout in info.layouts
}
BASES["minimal"] = {
    **_COMMON,
    "task": "causal-lm",
    "dataset": {"source": "file:///data/train.jsonl"},
    "evaluation": {},
    "hyperparameters": {"lrScheduler": "cosine-with-restarts"},
}


def _body(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "contract", "namespace": "ns"},
        "spec": spec,
    }


def _base(name: str) -> dict[str, Any]:
    if name in CATALOG:
        name = f"{name}/{CATALOG[name].layouts[0].kind}"
    return copy.deepcopy(BASES[name])


def _render(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The rendered trainer config, or None when the API refuses the spec."""
    try:
        job = parse_finetunejob(_body(spec))
    except InvalidResourceError:
        return None
    return render_trainer_config(job, shutdown_timeout_seconds=SHUTDOWN)


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation allows (Optional and Annotated peeled off)."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _unwrap(arg) if t is not type(None)]
    return [annotation]


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, info in model.model_fields.items():
        path = (*prefix, info.alias or name)
        allowed = _unwrap(info.annotation)
        nested = [t for t in allowed if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            yield from _leaves(nested[0], path)
        else:
            yield path, allowed[0]


def _operator_only(path: tuple[str, ...]) -> bool:
    dotted = ".".join(path)
    return any(dotted == key or dotted.startswith(key + ".") for key in OPERATOR_ONLY)


SPEC_LEAVES = [path for path, _ in _leaves(FineTuneJobSpec)]
RENDERED_LEAVES = [(path, kind) for path, kind in _leaves(FineTuneJobSpec) if not _operator_only(path)]


def _get(spec: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = spec
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _with(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(spec)
    node = changed
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return changed


def _scalar_candidates(kind: Any, current: Any) -> list[Any]:
    if get_origin(kind) is Literal:
        return [value for value in get_args(kind) if value != current]
    if kind is bool:
        return [not bool(current)]
    if kind is int:
        numbers = [1, 2, 3, 8, 100, 0, -1]
        return [current + 1, current - 1, *numbers] if isinstance(current, int) else numbers
    if kind is float:
        numbers = [0.1, 0.2, 0.5, 0.01, 0.9, 1e-5, 2.0]
        return [current / 2, current + 0.1, *numbers] if isinstance(current, float) and current else numbers
    if kind is str:
        return ["file:///data/other.jsonl", "hf://org/other", "other-name", "mit", "sub/dir", "[0-9]+"]
    return []


def _candidates(kind: Any, current: Any) -> list[Any]:
    if get_origin(kind) is dict:
        return [{**(current or {}), "other": ["word"]}]
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        items = _scalar_candidates(_unwrap(item)[0], None)
        return [[value] for value in items] + [[*(current or []), value] for value in items]
    return _scalar_candidates(kind, current)


def _defaults(spec: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The leaf's value as the API sees it (its default when the spec leaves it out)."""
    job = parse_finetunejob(_body(spec))
    node: Any = job.spec
    for alias in path:
        if node is None:
            return None
        name = next(n for n, info in type(node).model_fields.items() if (info.alias or n) == alias)
        node = getattr(node, name)
    return node


@pytest.mark.parametrize("name", list(BASES))
def test_every_base_spec_is_valid(name: str) -> None:
    assert _render(_base(name)) is not None


def test_the_walk_sees_the_whole_spec() -> None:
    dotted = {".".join(path) for path in SPEC_LEAVES}
    assert {"hyperparameters.lrScheduler", "earlyStopping.metric", "distributed.deepspeed.offload"} <= dotted
    assert {"dataset.fieldMapping.textPair", "dataset.augmentation.image.horizontalFlip"} <= dotted
    assert all(any(d == key or d.startswith(key + ".") for d in dotted) for key in OPERATOR_ONLY)


@pytest.mark.parametrize(
    ("path", "kind"), RENDERED_LEAVES, ids=lambda v: ".".join(v) if isinstance(v, tuple) else ""
)
def test_every_spec_leaf_is_rendered_or_operator_only(path: tuple[str, ...], kind: Any) -> None:
    """A new API field fails here until the translator renders it or OPERATOR_ONLY says why not."""
    tried = []
    for task in BASES:
        base = _base(task)
        before = _render(base)
        current = _defaults(base, path)
        for value in _candidates(kind, current):
            after = _render(_with(base, path, value))
            tried.append((task, value, after is not None))
            if after is not None and after != before:
                return
    pytest.fail(
        f"spec.{'.'.join(path)} never changes the trainer config (tried {tried}): render it in "
        "builders/trainer_config.py, refuse it, or list it in OPERATOR_ONLY with a reason"
    )


ENUM_LEAVES = [(path, kind) for path, kind in RENDERED_LEAVES if get_origin(kind) is Literal]


@pytest.mark.parametrize(
    ("path", "kind"), ENUM_LEAVES, ids=lambda v: ".".join(v) if isinstance(v, tuple) else ""
)
def test_every_accepted_value_renders_differently(path: tuple[str, ...], kind: Any) -> None:
    """No enumerated value falls back to another: accepted values render pairwise differently."""
    for task in BASES:
        base = _base(task)
        rendered: dict[str, Any] = {}
        for value in get_args(kind):
            config = _render(_with(base, path, value))
            if config is None:
                continue
            same = [other for other, seen in rendered.items() if seen == config]
            assert not same, f"{task}: spec.{'.'.join(path)} {value!r} renders like {same[0]!r}"
            rendered[value] = config


def test_every_tasks_metrics_start_with_loss() -> None:
    assert all(info.metrics[0] == "loss" for info in CATALOG.values())


# --- the fallbacks found by reading the translator (issue 12) -----------------------------------------


def _causal(**sections: Any) -> dict[str, Any]:
    spec = {
        "task": "causal-lm",
        "model": {"source": "hf://org/base"},
        "dataset": {"source": "file:///data/train.jsonl"},
        "distributed": {"gpusPerNode": 0, "precision": "fp32"},
    }
    spec.update(sections)
    return spec


def _trainer(spec: dict[str, Any]) -> TrainerConfig:
    job = parse_finetunejob(_body(spec))
    return validated_trainer_config(job, shutdown_timeout_seconds=SHUTDOWN)


def _refusal(spec: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidResourceError) as refused:
        parse_finetunejob(_body(spec))
    return refused.value.problems


@pytest.mark.parametrize(
    "schedule", ["linear", "cosine", "cosine-with-restarts", "polynomial", "constant", "constant-with-warmup"]
)
def test_every_lr_scheduler_reaches_the_trainer(schedule: str) -> None:
    cfg = _trainer(_causal(hyperparameters={"lrScheduler": schedule}))
    assert cfg.hyperparameters.lr_scheduler.value == schedule


def test_lr_cycles_reach_the_trainer_and_constant_has_no_warmup() -> None:
    cfg = _trainer(_causal(hyperparameters={"lrScheduler": "cosine-with-restarts", "lrCycles": 4}))
    assert cfg.hyperparameters.lr_cycles == 4
    assert _trainer(_causal(hyperparameters={"lrScheduler": "constant"})).hyperparameters.warmup_ratio == 0.0
    problems = _refusal(_causal(hyperparameters={"lrScheduler": "constant", "warmupRatio": 0.1}))
    assert problems[0][0] == "spec.hyperparameters.lrScheduler"


@pytest.mark.parametrize("metric", ["loss", "perplexity", "accuracy"])
def test_early_stopping_metric_reaches_the_trainer(metric: str) -> None:
    spec = _causal(
        evaluation={"metrics": ["loss", "perplexity", "accuracy"]},
        earlyStopping={"metric": metric, "mode": "max"},
    )
    cfg = _trainer(spec)
    assert cfg.early_stopping.metric.value == metric
    assert cfg.evaluation.metrics == ["loss", "perplexity", "accuracy"]


@pytest.mark.parametrize(("task", "metrics"), [(name, info.metrics) for name, info in CATALOG.items()])
def test_every_tasks_metrics_and_early_stopping_metric_are_rendered_as_given(
    task: str, metrics: tuple[str, ...]
) -> None:
    """Not replaced by loss, and the trainer accepts them for the task."""
    spec = _base(task)
    spec["evaluation"] = {**spec["evaluation"], "metrics": list(metrics)}
    spec["earlyStopping"] = {"metric": metrics[-1]}
    rendered = _render(spec)
    assert rendered is not None
    assert rendered["earlyStopping"]["metric"] == metrics[-1]
    assert rendered["evaluation"]["metrics"] == list(metrics)
    assert parse_config(rendered).early_stopping.metric.value == metrics[-1]


def test_nvme_offload_is_refused_not_turned_into_cpu_offload() -> None:
    spec = _causal(distributed={"gpusPerNode": 1, "deepspeed": {"zeroStage": 3, "offload": "nvme"}})
    assert _refusal(spec)[0][0] == "spec.distributed.deepspeed.offload"
    cpu = _causal(distributed={"gpusPerNode": 1, "deepspeed": {"zeroStage": 3, "offload": "cpu"}})
    assert _trainer(cpu).distributed.offload.value == "all"


def test_evaluation_without_every_steps_evaluates_each_epoch() -> None:
    cfg = _trainer(_causal(evaluation={}))
    assert (cfg.evaluation.every_steps, cfg.evaluation.every_epoch, cfg.evaluation.before_training) == (
        0,
        True,
        True,
    )
    cfg = _trainer(_causal(evaluation={"everySteps": 25}))
    assert (cfg.evaluation.every_steps, cfg.evaluation.every_epoch) == (25, False)
    cfg = _trainer(_causal())  # no evaluation section: only after training
    assert (cfg.evaluation.every_steps, cfg.evaluation.every_epoch, cfg.evaluation.before_training) == (
        0,
        False,
        False,
    )


def test_checkpoints_without_every_steps_are_only_at_epoch_ends() -> None:
    cfg = _trainer(_causal())
    assert (cfg.checkpointing.every_steps, cfg.checkpointing.save_on_epoch_end) == (0, True)


def test_augmentation_sections_are_rendered_or_refused() -> None:
    problems = _refusal(
        _causal(dataset={"source": "file:///d.jsonl", "augmentation": {"text": {"wordDropout": 0.1}}})
    )
    assert problems[0] == (
        "spec.dataset.augmentation.text",
        "dataset.augmentation.text applies to sequence-classification only",
    )
    seq = _render(_base("sequence-classification"))
    img = _render(_base("image-classification"))
    assert seq is not None
    assert img is not None
    assert seq["data"]["augmentation"]["text"] == {
        "wordDropout": 0.0,
        "wordSwap": 0.0,
        "wordInsertion": 0.0,
        "synonymReplacement": 0.0,
        "synonyms": {"good": ["fine"]},
    }
    assert img["data"]["augmentation"]["image"]["horizontalFlip"] is False


@pytest.mark.parametrize(
    ("task", "mapping", "kind"),
    [
        ("sequence-classification", {"text": "t", "label": "l", "textPair": "p"}, "classification"),
        ("image-classification", {"image": "i", "label": "l"}, "image-classification"),
        ("object-detection", {"image": "i", "objects": "o"}, "object-detection"),
        ("recommendation", {"user": "u", "item": "i", "rating": "r"}, "interactions"),
        ("causal-lm", {"instruction": "q", "input": "c", "output": "a"}, "instruction"),
    ],
)
def test_field_mappings_are_rendered_with_their_layout(task: str, mapping: dict[str, str], kind: str) -> None:
    spec = _base(task)
    spec["dataset"]["fieldMapping"] = mapping
    rendered = _render(spec)
    assert rendered is not None
    assert rendered["data"]["fields"] == {"kind": kind, **mapping}


@pytest.mark.parametrize("task", list(CATALOG))
def test_no_field_mapping_renders_the_tasks_default_layout(task: str) -> None:
    spec = _base(task)
    del spec["dataset"]["fieldMapping"]
    rendered = _render(spec)
    assert rendered is not None
    assert rendered["data"]["fields"] == {"kind": CATALOG[task].layouts[0].kind}


def test_a_mapped_column_the_task_would_not_read_is_refused() -> None:
    mapping = {"prompt": "p", "completion": "c", "label": "l"}
    problems = _refusal(_causal(dataset={"source": "file:///d.jsonl", "fieldMapping": mapping}))
    assert problems[0][0] == "spec.dataset.fieldMapping"
    assert "would not read" in problems[0][1]


# --- defaults ----------------------------------------------------------------------------------------

# (API path, trainer path) pairs whose values are the same setting on both sides.
SAME_SETTING: list[tuple[str, str]] = [
    ("hyperparameters.epochs", "hyperparameters.epochs"),
    ("hyperparameters.batchSize", "hyperparameters.microBatchSize"),
    ("hyperparameters.gradientAccumulationSteps", "hyperparameters.gradientAccumulationSteps"),
    ("hyperparameters.learningRate", "hyperparameters.learningRate"),
    ("hyperparameters.lrScheduler", "hyperparameters.lrScheduler"),
    ("hyperparameters.weightDecay", "hyperparameters.weightDecay"),
    ("hyperparameters.maxGradNorm", "hyperparameters.maxGradNorm"),
    ("hyperparameters.labelSmoothing", "hyperparameters.labelSmoothing"),
    ("hyperparameters.seed", "seed"),
    ("hyperparameters.maxSeqLength", "data.maxSeqLength"),
    ("lora.r", "lora.r"),
    ("lora.alpha", "lora.alpha"),
    ("lora.dropout", "lora.dropout"),
    ("method", "method"),
    ("evaluation.metrics", "evaluation.metrics"),
    ("evaluation.generationSamples", "evaluation.generationSamples"),
    ("earlyStopping.mode", "earlyStopping.mode"),
    ("earlyStopping.patience", "earlyStopping.patience"),
    ("earlyStopping.minDelta", "earlyStopping.minDelta"),
    ("checkpointing.keepLast", "checkpointing.keepLast"),
    ("checkpointing.saveOnEpochEnd", "checkpointing.saveOnEpochEnd"),
    ("distributed.deepspeed.zeroStage", "distributed.zeroStage"),
    ("distributed.precision", "distributed.precision"),
    ("output.mergeAdapter", "output.mergeAdapter"),
    ("dataset.template", "data.template"),
    ("dataset.split.seed", "data.split.seed"),
    ("dataset.preprocessing.normalizeUnicode", "data.cleaning.normalizeUnicode"),
    ("dataset.preprocessing.stripHtml", "data.cleaning.stripHtml"),
    ("dataset.preprocessing.minLength", "data.cleaning.minChars"),
    ("dataset.preprocessing.dedup.threshold", "data.dedup.nearThreshold"),
    ("dataset.preprocessing.pii.policy", "data.pii.policy"),
    ("dataset.badRows.maxRatio", "data.badRows.maxRatio"),
]
# (trainer path, value): what an omitted API setting means, which the trainer's default must also mean.
OMITTED_MEANS: list[tuple[str, Any]] = [
    ("hyperparameters.warmupRatio", 0.03),
    ("hyperparameters.lrCycles", 1),
    ("evaluation.everySteps", 0),  # evaluation given, everySteps omitted: at each epoch end
    ("evaluation.everyEpoch", True),
    ("checkpointing.everySteps", 0),  # omitted: only at epoch ends
    ("data.split.validation", 0.05),
    ("data.split.test", 0.0),
    ("distributed.offload", "none"),
]


def _trainer_value(config: BaseModel, dotted: str) -> Any:
    node: Any = config
    for alias in dotted.split("."):
        name = next(n for n, info in type(node).model_fields.items() if (info.alias or n) == alias)
        node = getattr(node, name)
    return getattr(node, "value", node)


def _trainer_defaults() -> TrainerConfig:
    return parse_config({"model": {"path": "/m"}, "data": {"source": "/d"}})


def test_defaults_agree_between_api_rendered_config_and_trainer() -> None:
    spec = _causal(lora={}, evaluation={}, earlyStopping={}, distributed={"gpusPerNode": 1, "deepspeed": {}})
    api = parse_finetunejob(_body(spec))
    rendered = _trainer(spec)
    trainer = _trainer_defaults()
    for api_path, trainer_path in SAME_SETTING:
        value = _defaults(spec, tuple(api_path.split(".")))
        value = list(value) if isinstance(value, list) else value
        assert _trainer_value(rendered, trainer_path) == value, (
            f"{api_path} renders differently from its default"
        )
        assert _trainer_value(trainer, trainer_path) == value, (
            f"the trainer's default {trainer_path} != API {api_path}"
        )
    for trainer_path, value in OMITTED_MEANS:
        assert _trainer_value(rendered, trainer_path) == value, trainer_path
        assert _trainer_value(trainer, trainer_path) == value, f"the trainer's default {trainer_path}"
    assert api.spec.hyperparameters.resolved_warmup_ratio() == 0.03


def test_documented_defaults_are_the_rendered_ones() -> None:
    """Docstrings (CRD descriptions, docs/api.md) that name a default name the one rendered."""
    from finetune_operator.api.finetunejob import Evaluation, Hyperparameters, Resources, Split

    assert "0.03" in (Hyperparameters.model_fields["warmup_ratio"].description or "")
    assert "end of each epoch when omitted" in (Evaluation.model_fields["every_steps"].description or "")
    assert OperatorConfig().shm_size in (Resources.model_fields["shared_memory"].description or "")
    assert "5% of the data is held out for validation and none for test" in (Split.__doc__ or "")
    assert _trainer(_causal()).data.split.validation == 0.05


def test_image_check_defaults_agree_between_api_and_trainer() -> None:
    """`dataset.images` is rendered only when given, so its defaults must be the trainer's own."""
    from finetune_operator.api.finetunejob import Images
    from finetune_trainer.data.config import ImagesConfig

    api, trainer = Images(), ImagesConfig()
    assert (api.mode, api.min_size, api.max_size) == (trainer.mode, trainer.min_size, trainer.max_size)
    rendered = _render(_base("object-detection"))
    assert rendered is not None
    assert parse_config(rendered).data.images == ImagesConfig(min_size=8, max_size=4096)


#: A setting of a stage a task does not have, the rendered trainer config's key for it, the value.
IGNORED_SETTINGS = [
    ("augmentation-copies", ("augmentation", "copies"), 2),
    ("split-seed", ("split", "seed"), 7),
    ("html-stripping", ("cleaning", "stripHtml"), True),
    ("min-length", ("cleaning", "minChars"), 5),
    ("max-length", ("cleaning", "maxChars"), 500),
    ("pii-scanning", ("pii", "policy"), "reject"),
    ("near-dedup", ("dedup", "near"), True),
    ("image-validation", ("images", "maxSize"), 500),
]


@pytest.mark.parametrize(
    ("task", "feature", "trainer_key", "value"),
    [
        (task, *setting)
        for task, info in CATALOG.items()
        if info.modality != "text"
        for setting in IGNORED_SETTINGS
        if setting[0] not in info.features
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_setting_the_task_would_ignore_is_refused_by_the_api_and_the_trainer(
    task: str, feature: str, trainer_key: tuple[str, str], value: Any
) -> None:
    """Image and interaction data have no text stages and no copies; recommendation's split has no seed. The
    API refuses such a setting with its field named, and so does the trainer config (same message)."""
    spec = _base(task)
    dataset_keys, _ = _FEATURES[feature]
    _merge(spec["dataset"], dataset_keys)
    assert (f"spec.{FEATURE_FIELDS[feature]}", feature_message(feature)) in _refusal(spec)
    rendered = _render(_base(task))
    assert rendered is not None
    section, key = trainer_key
    rendered["data"].setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=re.escape(feature_message(feature))):
        parse_config(rendered)


def test_the_defaults_of_stages_a_task_lacks_are_accepted() -> None:
    """An explicit default (the same as leaving the field out) is not refused: the server writes it anyway."""
    spec = _base("recommendation")
    spec["dataset"]["split"] = {"seed": 42}
    spec["dataset"]["preprocessing"] = {"stripHtml": False, "minLength": 1, "pii": {"policy": "allow"}}
    rendered = _render(spec)
    assert rendered is not None
    assert "seed" not in rendered["data"]["split"]
    assert "copies" not in rendered["data"]["augmentation"]


def test_the_trainers_artifact_formats_are_the_ones_the_status_accepts() -> None:
    """The trainer reports `status.artifact.format` from its task's export: a value outside the CRD's enum
    made the API server refuse the whole status patch (422), so a recommendation or object-detection job
    (formats `recommender`, `torch`) succeeded with no status.artifact and no metrics after training."""
    from finetune_operator.api.finetunejob import Artifact
    from finetune_trainer.tasks.base import ArtifactFormat

    field = Artifact.model_fields["format"].annotation
    [accepted] = [arg for arg in get_args(field) if get_origin(arg) is Literal]
    assert set(get_args(ArtifactFormat)) == set(get_args(accepted))
