"""The FineTuneJob models: defaults, names on the wire, errors that name the field, helpers."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import FineTuneJobSpec, InvalidResourceError, parse_finetunejob
from finetune_operator.api.finetunejob import CONDITION_ADMITTED, FineTuneJobStatus, LoraSettings


def _body(**spec: Any) -> dict[str, Any]:
    base = {
        "task": "causal-lm",
        "model": {"source": "hf://org/tiny"},
        "dataset": {"source": "file:///d.jsonl"},
    }
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny", "namespace": "ns"},
        "spec": {**base, **spec},
    }


def _problems(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidResourceError) as refused:
        parse_finetunejob(body)
    return refused.value.problems


def test_minimal_job_gets_the_documented_defaults() -> None:
    spec = parse_finetunejob(_body()).spec
    assert spec.method == "lora"
    assert (spec.distributed.nodes, spec.distributed.gpus_per_node, spec.distributed.precision) == (
        1,
        1,
        "bf16",
    )
    assert spec.distributed.deepspeed is None
    assert spec.scheduling.max_restarts == 3
    assert spec.scheduling.suspend is False
    assert spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert spec.checkpointing.save_on_epoch_end is True
    assert spec.dataset.split.resolved_ratios() == (0.05, 0.0)
    assert spec.hyperparameters.resolved_warmup_ratio() == 0.03
    assert spec.resolved_lora() == LoraSettings()
    assert spec.evaluation is None
    assert spec.early_stopping is None


def test_wire_names_are_camel_case_and_python_names_are_accepted_too() -> None:
    by_alias = parse_finetunejob(_body(distributed={"gpusPerNode": 4, "nodes": 2}))
    by_name = parse_finetunejob(_body(distributed={"gpus_per_node": 4, "nodes": 2}))
    assert by_alias == by_name
    wire = by_alias.to_k8s()
    assert wire["spec"]["distributed"]["gpusPerNode"] == 4
    assert "gpus_per_node" not in wire["spec"]["distributed"]
    assert "evaluation" not in wire["spec"]  # unset optional sections stay out
    assert by_alias.spec.gpus_total == 8
    assert by_alias.spec.distributed.world_size == 8


def test_unknown_spec_field_is_refused_with_its_path() -> None:
    problems = _problems(_body(distributed={"gpus": 2}))
    assert problems == [("spec.distributed.gpus", "Extra inputs are not permitted")]


def test_every_problem_is_reported_with_its_path() -> None:
    problems = dict(
        _problems(_body(distributed={"nodes": 0, "gpusPerNode": 17}, hyperparameters={"epochs": 0}))
    )
    assert set(problems) == {
        "spec.distributed.nodes",
        "spec.distributed.gpusPerNode",
        "spec.hyperparameters.epochs",
    }
    assert "greater than or equal to 1" in problems["spec.distributed.nodes"]


def test_error_text_names_the_field() -> None:
    with pytest.raises(
        InvalidResourceError, match=r"spec\.distributed\.gpusPerNode: method qlora needs GPUs"
    ):
        parse_finetunejob(_body(method="qlora", distributed={"gpusPerNode": 0}))


@pytest.mark.parametrize(
    "source",
    [
        "hf://gpt2",
        "hf://org/name",
        "hf://org/name@v1.0",
        "pvc://claim",
        "pvc://claim/dir/model",
        "s3://bucket/key",
        "file:///m",
    ],
)
def test_model_sources_accepted(source: str) -> None:
    assert parse_finetunejob(_body(model={"source": source})).spec.model.source == source


@pytest.mark.parametrize(
    "source",
    ["gpt2", "https://huggingface.co/gpt2", "pvc://Claim/x", "file://relative", "hf://org/name with space"],
)
def test_model_sources_refused(source: str) -> None:
    (path, message), *_ = _problems(_body(model={"source": source}))
    assert path == "spec.model.source"
    assert "should match pattern" in message


@pytest.mark.parametrize(
    ("value", "ok"), [(8, True), ("500m", True), ("64Gi", True), ("1.5", True), ("64GB", False)]
)
def test_quantities(value: str | int, ok: bool) -> None:
    body = _body(resources={"memory": value})
    if ok:
        assert parse_finetunejob(body).spec.resources.memory == value
    else:
        assert _problems(body)[0][0] == "spec.resources.memory"


def test_split_ratio_defaults_follow_the_sources() -> None:
    split = parse_finetunejob(
        _body(dataset={"source": "file:///d", "split": {"validationSource": "file:///v"}})
    )
    assert split.spec.dataset.split.resolved_ratios() == (0.0, 0.0)
    split = parse_finetunejob(_body(dataset={"source": "file:///d", "split": {"testRatio": 0.1}}))
    assert split.spec.dataset.split.resolved_ratios() == (0.05, 0.1)


def test_full_fine_tuning_has_no_lora() -> None:
    assert parse_finetunejob(_body(method="full")).spec.resolved_lora() is None
    assert parse_finetunejob(_body(method="qlora", lora={"r": 4})).spec.resolved_lora() == LoraSettings(r=4)


def test_immutable_changes_name_the_fields() -> None:
    old = parse_finetunejob(_body()).spec
    new = FineTuneJobSpec.model_validate({**old.to_k8s(), "method": "full", "scheduling": {"suspend": True}})
    assert [field for field, _ in old.immutable_changes(new)] == ["method"]
    assert old.immutable_changes(old) == []


def test_status_as_the_trainer_patches_it() -> None:
    patch = {
        "phase": "Running",
        "attempt": 1,
        "conditions": [{"type": "Admitted", "status": "True", "lastTransitionTime": "2026-11-29T03:00:00Z"}],
        "progress": {"step": 10, "totalSteps": 100, "percent": 10.0, "updatedAt": "2026-11-29T03:01:00Z"},
        "metrics": {"trainLoss": 2.5, "extra": {"accuracy": 0.5}},
        "someFutureField": {"x": 1},
    }
    status = FineTuneJobStatus.model_validate(patch)
    assert status.progress is not None
    assert status.progress.percent == 10.0
    assert status.metrics is not None
    assert status.metrics.extra == {"accuracy": 0.5}
    admitted = status.condition(CONDITION_ADMITTED)
    assert admitted is not None
    assert admitted.status == "True"
    assert status.condition("Failed") is None
    wire = status.to_k8s()
    assert "someFutureField" not in wire
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-11-29T03:00:00Z"
    assert "checkpoints" not in wire


def test_status_refuses_a_phase_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="phase"):
        FineTuneJobStatus.model_validate({"phase": "Exploded"})
