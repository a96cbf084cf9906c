"""The trainer config: parsing, unknown keys with suggestions, cross-field rules, torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from finetune_trainer.config import (
    CONFIG_VERSION,
    ConfigError,
    Method,
    TrainerConfig,
    load_config,
    parse_config,
)

MINIMAL = {"model": {"path": "/models/base"}, "data": {"source": "/data/train.jsonl"}}


def with_(**sections: object) -> dict[str, object]:
    return {**MINIMAL, **sections}


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.version == CONFIG_VERSION
    assert cfg.method is Method.LORA
    assert cfg.distributed.zero_stage == 2
    assert cfg.checkpointing.keep_last == 2


def test_camel_case_and_snake_case_both_accepted() -> None:
    camel = parse_config(with_(hyperparameters={"learningRate": 0.1, "microBatchSize": 3}))
    snake = parse_config(with_(hyperparameters={"learning_rate": 0.1, "micro_batch_size": 3}))
    assert camel.hyperparameters == snake.hyperparameters
    assert camel.to_file_dict()["hyperparameters"]["learningRate"] == 0.1


def test_round_trip_through_the_rendered_dict() -> None:
    cfg = parse_config(with_(method="full", distributed={"zeroStage": 3, "offload": "all"}))
    assert parse_config(cfg.to_file_dict()) == cfg


@pytest.mark.parametrize(
    ("task", "kind", "data_format"),
    [
        ("causal-lm", "prompt-completion", "jsonl"),
        ("sequence-classification", "classification", "jsonl"),
        ("image-classification", "image-classification", "image-folder"),
        ("object-detection", "object-detection", "auto"),
        ("recommendation", "interactions", "csv"),
    ],
)
def test_the_written_config_of_every_task_reads_back(task: str, kind: str, data_format: str) -> None:
    """trainer_config.json (to_file_dict) fed back to the trainer: defaults written out would read as set
    and be refused where the task ignores them (augmentation copies of image tasks, interactions' splits)."""
    cfg = parse_config(
        with_(
            task=task,
            method="full",
            seed=7,
            data={"source": "/data/x", "format": data_format, "fields": {"kind": kind}},
        )
    )
    again = parse_config(cfg.to_file_dict())
    assert again == cfg
    assert again.data.augmentation.seed == 7  # the run's seed, not the field's default (42)


@pytest.mark.parametrize(
    ("raw", "path", "suggestion"),
    [
        (with_(hyperparamters={}), "<root>", "hyperparameters"),
        (with_(hyperparameters={"lerningRate": 1e-4}), "hyperparameters", "learningRate"),
        (with_(checkpointing={"everyStep": 10}), "checkpointing", "everySteps"),
        (with_(distributed={"zero_stag": 2}), "distributed", "zero_stage"),
        ({**MINIMAL, "data": {"source": "/d.jsonl", "maxSeqLenght": 5}}, "data", "maxSeqLength"),
    ],
)
def test_unknown_keys_are_named_with_the_closest_valid_key(
    raw: dict[str, object], path: str, suggestion: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert f"{path}" in message
    assert "unknown key" in message
    assert f"did you mean {suggestion!r}" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"valid keys: .*learningRate"):
        parse_config(with_(hyperparameters={"zzzzzz": 1}))


def test_unknown_keys_refused_by_plain_model_validate_too() -> None:
    # The operator validates with TrainerConfig directly; the suggestion must be in that error as well.
    with pytest.raises(ValidationError, match="did you mean 'keepLast'"):
        TrainerConfig.model_validate(with_(checkpointing={"keepLst": 3}))


def test_unsupported_version_refused() -> None:
    with pytest.raises(ConfigError, match="version 'v9' is not supported"):
        parse_config(with_(version="v9"))


@pytest.mark.parametrize(
    ("distributed", "message"),
    [
        ({"zeroStage": 0, "offload": "optimizer"}, "needs zeroStage >= 1"),
        ({"zeroStage": 2, "offload": "all"}, "needs zeroStage 3"),
        ({"zeroStage": 4}, "less than or equal to 3"),
    ],
)
def test_offload_and_zero_stage_rules(distributed: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(with_(distributed=distributed))


def test_early_stopping_needs_periodic_evaluation() -> None:
    with pytest.raises(ConfigError, match=r"earlyStopping\.enabled needs evaluation\.everySteps"):
        parse_config(
            with_(earlyStopping={"enabled": True}, evaluation={"everySteps": 0, "everyEpoch": False})
        )
    parse_config(with_(earlyStopping={"enabled": True}, evaluation={"everySteps": 0}))  # each epoch end


def test_load_yaml_and_json(tmp_path: Path) -> None:
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("model: {path: /models/base}\ndata: {source: /data/train.jsonl}\nseed: 3\n")
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps(with_(seed=3)))
    assert load_config(yaml_path) == load_config(json_path)


def test_unreadable_and_non_mapping_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_config_launcher_and_exit_codes_import_without_torch() -> None:
    code = (
        "import sys, finetune_trainer, finetune_trainer.config, finetune_trainer.exit_codes, "
        "finetune_trainer.launch, finetune_trainer.env; "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the task catalog (finetune_trainer.task_catalog), which the FineTuneJob API checks too ----------------


def test_task_enums_follow_the_catalog() -> None:
    from typing import get_args

    from finetune_trainer.config import EarlyStoppingMetric, Task
    from finetune_trainer.data.config import MappingKind
    from finetune_trainer.task_catalog import LAYOUT_KINDS, METRIC_NAMES, TASK_NAMES

    assert tuple(t.value for t in Task) == TASK_NAMES
    assert tuple(m.value for m in EarlyStoppingMetric) == METRIC_NAMES
    assert get_args(MappingKind) == LAYOUT_KINDS


def test_task_registry_is_the_catalogs_implemented_tasks() -> None:
    """The trainer's registry (torch) and the catalog's implemented flags (torch-free, read by the operator
    and the config validator) name the same tasks, and each registered task names itself."""
    from finetune_trainer.task_catalog import IMPLEMENTED_TASK_NAMES
    from finetune_trainer.tasks import TASKS

    assert set(TASKS) == set(IMPLEMENTED_TASK_NAMES)
    for name, factory in TASKS.items():
        assert getattr(factory, "name", name) == name


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"evaluation": {"metrics": ["loss", "f1"]}}, r"evaluation.metrics \['f1'\] are not computed"),
        (
            {"earlyStopping": {"enabled": True, "metric": "accuracy"}, "evaluation": {"metrics": ["loss"]}},
            "earlyStopping.metric must be loss or one of evaluation.metrics",
        ),
        ({"data": {"source": "x", "fields": {"kind": "interactions"}}}, "not a row layout of task causal-lm"),
        (
            {"data": {"source": "x", "augmentation": {"text": {"wordDropout": 0.1}}}},
            "dataset.augmentation.text applies to sequence-classification only",
        ),
        (
            {"data": {"source": "x", "augmentation": {"image": {"horizontalFlip": True}}}},
            "dataset.augmentation.image applies to image-classification, object-detection only",
        ),
        (
            {"data": {"source": "x", "images": {"maxSize": 512}}},
            "dataset.images applies to image-classification, object-detection only",
        ),
        # Set in the file counts, defaults included (the operator writes data.images only for image tasks).
        (
            {"data": {"source": "x", "images": {}}},
            "dataset.images applies to image-classification, object-detection only",
        ),
        ({"hyperparameters": {"lrScheduler": "constant", "warmupSteps": 10}}, "has no warm-up"),
        ({"hyperparameters": {"lrCycles": 2}}, "lrCycles needs lrScheduler 'cosine-with-restarts'"),
        ({"checkpointing": {"everySteps": 0, "saveOnEpochEnd": False}}, "no checkpoint is ever written"),
    ],
)
def test_catalog_and_schedule_rules(sections: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(with_(**sections))


def test_every_catalog_metric_can_be_watched_by_early_stopping() -> None:
    cfg = parse_config(
        with_(
            evaluation={"metrics": ["loss", "perplexity", "accuracy"]},
            earlyStopping={"enabled": True, "metric": "perplexity"},
        )
    )
    assert cfg.early_stopping.metric.value == "perplexity"
    assert cfg.evaluation.every_epoch
    assert cfg.evaluation.every_steps == 0
