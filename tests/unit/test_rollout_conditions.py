"""The ModelDeployment's conditions, kstatus style: Ready only when the spec's revision serves everything."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from finetune_operator.rollout import Step
from finetune_operator.rollout.conditions import (
    ModelWait,
    available,
    degraded,
    model_ready,
    progressing,
    quality_summary,
    ready,
)
from finetune_operator.rollout.plan import ObservedDeployment, RolloutMemory, RolloutPlan, plan_rollout

T0 = datetime(2026, 1, 1, tzinfo=UTC)
GATE = {
    "step": "quantization",
    "method": "int8-dynamic",
    "metric": "perplexity",
    "baseline": 4.48,
    "value": 4.52,
    "qualityDrop": 0.0089,
    "maxQualityDrop": 0.02,
    "sizeBytes": 130_000_000,
    "originalSizeBytes": 500_000_000,
    "passed": True,
}
READY = {"ready": True, "phase": "Ready", "quality": [GATE]}
ROLLED = ObservedDeployment("r1", replicas=2, ready_replicas=2, updated_replicas=2, available_replicas=2)


def plan_for(stable: ObservedDeployment | None, **kwargs: Any) -> RolloutPlan:
    args: dict[str, Any] = {
        "desired": "r1",
        "strategy": "RollingUpdate",
        "steps": (Step(10, 60),),
        "inconclusive_timeout_seconds": 60,
        "stable": stable,
        "memory": RolloutMemory(stable_revision="r1"),
        "judgement": None,
        "now": T0,
    }
    args.update(kwargs)
    return plan_rollout(**args)


def all_conditions(
    plan: RolloutPlan,
    stable: ObservedDeployment | None,
    health: list[dict[str, Any]],
    wait: ModelWait | None = None,
) -> dict[str, tuple[bool, str, str]]:
    values = {
        "ModelReady": model_ready(wait, health),
        "Available": available(stable, None),
        "Progressing": progressing(plan, stable, wait),
        "Degraded": degraded(plan, stable, wait),
    }
    values["Ready"] = ready(values)
    return values


def test_a_rolled_out_revision_whose_model_passed_its_gate_is_ready() -> None:
    values = all_conditions(plan_for(ROLLED), ROLLED, [READY])
    assert values["Ready"][0] is True
    assert values["Progressing"][:2] == (False, "RolloutComplete")
    assert "perplexity 4.48 -> 4.52 (drop 0.9 %, max 2.0 %), 500.0 MB -> 130.0 MB" in values["ModelReady"][2]


def test_a_failed_quality_gate_is_not_ready_with_the_measured_figures() -> None:
    failed = {
        "ready": False,
        "phase": "Failed",
        "reason": "QualityGateFailed",
        "message": "pruning: accuracy dropped 41 %",
        "quality": [{**GATE, "qualityDrop": 0.41, "passed": False}],
    }
    status, reason, message = model_ready(None, [failed])
    assert (status, reason) == (False, "QualityGateFailed")
    assert "drop 41.0 %" in message
    values = all_conditions(plan_for(ROLLED), ROLLED, [failed])
    assert values["Ready"][:2] == (False, "QualityGateFailed")


def test_waiting_for_the_finetunejob_says_so_everywhere() -> None:
    wait = ModelWait("WaitingForFineTuneJob", "FineTuneJob llama-sft is Running; waiting until it Succeeded")
    values = all_conditions(plan_for(None), None, [], wait)
    assert values["ModelReady"][:2] == (False, "WaitingForFineTuneJob")
    assert values["Ready"][1] == "WaitingForFineTuneJob"
    assert values["Degraded"][0] is False
    terminal = ModelWait("FineTuneJobFailed", "FineTuneJob llama-sft Failed", terminal=True)
    assert degraded(plan_for(None), None, terminal)[0] is True


def test_a_rolling_update_is_progressing_until_every_replica_runs_the_new_revision() -> None:
    half = ObservedDeployment("r2", replicas=2, ready_replicas=2, updated_replicas=1, available_replicas=2)
    plan = plan_for(half, desired="r2")
    status, reason, message = progressing(plan, half, None)
    assert (status, reason) == (True, "RollingUpdate")
    assert "1 of 2 replicas run revision r2" in message
    before = plan_for(ROLLED, desired="r2")
    assert progressing(before, ROLLED, None)[0] is True, "just applied: the old revision still serves"


def test_a_rolled_back_canary_is_degraded_and_not_progressing() -> None:
    memory = RolloutMemory(stable_revision="r1", failed_revision="r2")
    plan = plan_for(ROLLED, desired="r2", strategy="Canary", memory=memory)
    assert progressing(plan, ROLLED, None)[:2] == (False, "RolledBack")
    assert degraded(plan, ROLLED, None)[:2] == (True, "RolledBack")
    assert available(ROLLED, None)[0] is True, "the stable revision still serves"


def test_a_stalled_deployment_is_degraded() -> None:
    stuck = ObservedDeployment("r1", replicas=2, ready_replicas=0, updated_replicas=2, stalled=True)
    assert degraded(plan_for(stuck), stuck, None)[:2] == (True, "ProgressDeadlineExceeded")
    assert available(stuck, None)[0] is False


def test_quality_summary_of_no_steps_is_empty() -> None:
    assert quality_summary([]) == ""


def test_a_failed_quality_gate_is_degraded_at_once() -> None:
    gate = (False, "QualityGateFailed", "accuracy dropped 41 %")
    assert degraded(plan_for(ROLLED), ROLLED, None, gate)[:2] == (True, "QualityGateFailed")
    loading = (False, "Loading", "the server is loading")
    assert degraded(plan_for(ROLLED), ROLLED, None, loading)[0] is False


def test_a_pod_ready_by_its_probe_alone_is_model_ready_without_figures() -> None:
    status, reason, message = model_ready(None, [{"ready": True, "phase": "Ready", "probeOnly": True}])
    assert (status, reason) == (True, "ServerReady")
    assert "readiness probe" in message
    measured = model_ready(None, [{"ready": True, "phase": "Ready", "probeOnly": True}, READY])
    assert measured[1] == "ModelLoaded", "a measured answer wins over the probe alone"
    assert model_ready(None, [{"ready": False, "phase": "Loading", "probeOnly": True}])[0] is False
