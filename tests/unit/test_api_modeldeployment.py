"""The ModelDeployment models: defaults, errors that name the field, status."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import InvalidResourceError
from finetune_operator.api.modeldeployment import (
    CONDITION_READY,
    ModelDeploymentStatus,
    parse_modeldeployment,
)


def _body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "bot"},
        "spec": {"model": {"fromFineTuneJob": "tiny"}, **spec},
    }


def test_minimal_deployment_gets_the_documented_defaults() -> None:
    spec = parse_modeldeployment(_body()).spec
    assert spec.quantization.method == "none"
    assert spec.quantization.max_quality_drop == 0.02
    assert spec.rollout.strategy == "RollingUpdate"
    assert spec.fixed_replicas == 1
    assert spec.resources.gpus == 0
    assert spec.auth.enabled is True
    assert spec.auth.api_key_secret_ref is None
    assert spec.runtime.type == "builtin"
    assert spec.feedback.enabled is False


def test_model_reference_needs_exactly_one_source() -> None:
    with pytest.raises(InvalidResourceError) as refused:
        parse_modeldeployment(_body(model={}))
    assert refused.value.problems == [("spec.model", "set exactly one of fromFineTuneJob and uri")]


def test_canary_rollout_parses() -> None:
    rollout = {"strategy": "Canary", "canary": {"steps": [{"weight": 10}, {"weight": 50}]}}
    canary = parse_modeldeployment(_body(rollout=rollout)).spec.rollout.canary
    assert canary is not None
    assert [s.weight for s in canary.steps] == [10, 50]
    assert canary.analysis.max_error_rate == 0.01


def test_status_ready_condition_and_unknown_keys() -> None:
    status = ModelDeploymentStatus.model_validate(
        {
            "conditions": [{"type": "Ready", "status": "False", "reason": "QualityGateFailed"}],
            "endpoint": "http://bot.ns.svc:8080/v1",
            "quantization": {"method": "int8-dynamic", "qualityDrop": 0.04, "passed": False},
            "newerField": 1,
        }
    )
    ready = status.condition(CONDITION_READY)
    assert ready is not None
    assert ready.reason == "QualityGateFailed"
    assert status.quantization is not None
    assert status.quantization.passed is False
    assert "newerField" not in status.to_k8s()


def test_rollout_status_history_parses() -> None:
    status = ModelDeploymentStatus.model_validate(
        {
            "rollout": {
                "stableRevision": "r1",
                "canaryRevision": "r2",
                "weight": 50,
                "history": [
                    {
                        "time": "2026-01-01T00:00:00Z",
                        "revision": "r2",
                        "decision": "Promoted",
                        "step": 1,
                        "weight": 50,
                        "reason": "AnalysisPassed",
                    }
                ],
            }
        }
    )
    assert status.rollout is not None
    assert status.rollout.history[0].decision == "Promoted"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            {"runtime": {"type": "vllm"}, "resources": {"gpus": 1}, "quantization": {"method": "bnb-int8"}},
            "spec.quantization.method",
        ),
        ({"quantization": {"method": "fp8-dynamic"}}, "spec.quantization.method"),
        ({"pruning": {"method": "2:4", "sparsity": 0.7}}, "spec.pruning.sparsity"),
    ],
)
def test_cross_field_rules_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidResourceError) as refused:
        parse_modeldeployment(_body(**spec))
    assert field in [path for path, _ in refused.value.problems]


def test_vllm_with_fp8_on_gpus_is_accepted() -> None:
    spec = parse_modeldeployment(
        _body(runtime={"type": "vllm"}, resources={"gpus": 1}, quantization={"method": "fp8-dynamic"})
    ).spec
    assert spec.runtime.type == "vllm"
