"""How the ModelDeployment reconciler reads what runs: Deployments and its own status as the plan's inputs."""

from __future__ import annotations

from datetime import UTC, datetime

from finetune_operator.api.modeldeployment import ModelDeploymentStatus
from finetune_operator.controllers.modeldeployment import _memory_of, _observe


def test_a_deployment_is_observed_from_its_labels_spec_and_status() -> None:
    body = {
        "metadata": {"name": "bot", "generation": 4, "labels": {"finetune.dev/revision": "r7"}},
        "spec": {"replicas": 3},
        "status": {
            "observedGeneration": 4,
            "readyReplicas": 2,
            "updatedReplicas": 3,
            "availableReplicas": 2,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}],
        },
    }
    seen = _observe(body)
    assert seen is not None
    assert (seen.revision, seen.replicas, seen.ready_replicas, seen.observed, seen.stalled) == (
        "r7",
        3,
        2,
        True,
        True,
    )
    assert not seen.rolled_out
    assert _observe(None) is None
    fresh = _observe({"metadata": {"name": "bot", "generation": 1, "labels": {}}, "spec": {}})
    assert fresh is not None
    assert (fresh.replicas, fresh.observed) == (1, False), "no status yet: not observed"


def test_the_rollout_memory_comes_back_from_status() -> None:
    status = ModelDeploymentStatus.model_validate(
        {
            "rollout": {
                "stableRevision": "r1",
                "canaryRevision": "r2",
                "step": 1,
                "stepStartedAt": "2026-01-01T00:00:00Z",
                "history": [
                    {"time": "2026-01-01T00:00:00Z", "revision": "r2", "decision": "Completed", "weight": 100}
                ],
            }
        }
    )
    memory = _memory_of(status.rollout)
    assert (memory.stable_revision, memory.canary_revision, memory.step) == ("r1", "r2", 1)
    assert memory.step_started_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert memory.completing, "the last decision completed the canary: the stable is rolling to it"
    assert not _memory_of(None).completing
