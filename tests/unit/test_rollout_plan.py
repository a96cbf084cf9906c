"""The rollout plan: which revision the stable Deployment runs, whether a canary runs, what is recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.rollout import PodCounters, Step, Thresholds, judge
from finetune_operator.rollout.plan import (
    ObservedDeployment,
    RolloutMemory,
    RolloutPlan,
    history_action,
    needs_analysis,
    plan_rollout,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEPS = (Step(10, 60), Step(50, 60))
THRESHOLDS = Thresholds(min_requests=20, max_error_rate=0.05)
HEALTHY = judge(PodCounters(40, 0), THRESHOLDS)
BROKEN = judge(PodCounters(40, 40), THRESHOLDS)
OLD = ObservedDeployment("old", replicas=3, ready_replicas=3, updated_replicas=3, available_replicas=3)


def plan(**kwargs: Any) -> RolloutPlan:
    args: dict[str, Any] = {
        "desired": "new",
        "strategy": "Canary",
        "steps": STEPS,
        "inconclusive_timeout_seconds": 120,
        "stable": OLD,
        "memory": RolloutMemory(stable_revision="old"),
        "judgement": None,
        "now": T0,
    }
    args.update(kwargs)
    return plan_rollout(**args)


def test_first_deploy_applies_the_revision_as_stable() -> None:
    got = plan(stable=None, memory=RolloutMemory())
    assert (got.apply_stable, got.canary, got.memory.stable_revision) == (True, False, "new")
    assert got.decision is None


def test_rolling_update_rolls_the_stable_deployment() -> None:
    got = plan(strategy="RollingUpdate")
    assert (got.apply_stable, got.canary, got.phase) == (True, False, "RollingUpdate")


def test_a_new_revision_starts_a_canary_beside_the_untouched_stable() -> None:
    got = plan()
    assert (got.apply_stable, got.canary) == (False, True)
    assert got.memory.canary_revision == "new"
    assert got.memory.step_started_at == T0
    assert got.split.canary_replicas == 1
    assert got.decision is not None
    assert history_action(got.decision) == "Started"
    assert needs_analysis(got.memory, "new", "Canary")


def test_canary_is_promoted_step_by_step_then_completes_and_the_stable_rolls() -> None:
    running = RolloutMemory(stable_revision="old", canary_revision="new", step=0, step_started_at=T0)
    promoted = plan(memory=running, judgement=HEALTHY, now=T0 + timedelta(seconds=61))
    assert promoted.memory.step == 1
    assert promoted.split.canary_replicas == 3, "50 % of 3 stable replicas"
    assert promoted.decision is not None
    assert history_action(promoted.decision) == "Promoted"
    done = plan(memory=promoted.memory, judgement=HEALTHY, now=T0 + timedelta(seconds=200))
    assert (done.apply_stable, done.canary, done.phase) == (True, True, "Completing")
    assert done.decision is not None
    assert history_action(done.decision) == "Completed"
    assert not needs_analysis(done.memory, "new", "Canary")
    # The stable Deployment now carries the new revision but is still rolling: the canary stays.
    rolling = ObservedDeployment(
        "new", replicas=3, ready_replicas=3, updated_replicas=1, available_replicas=3
    )
    still = plan(stable=rolling, memory=done.memory)
    assert (still.apply_stable, still.canary) == (True, True)
    rolled = ObservedDeployment("new", replicas=3, ready_replicas=3, updated_replicas=3, available_replicas=3)
    finished = plan(stable=rolled, memory=done.memory)
    assert (finished.canary, finished.phase, finished.memory.canary_revision) == (False, "Stable", None)
    assert finished.memory.stable_revision == "new"


def test_a_breach_rolls_back_and_the_revision_is_not_tried_again() -> None:
    running = RolloutMemory(stable_revision="old", canary_revision="new", step=0, step_started_at=T0)
    back = plan(memory=running, judgement=BROKEN, now=T0 + timedelta(seconds=5))
    assert (back.apply_stable, back.canary, back.phase) == (False, False, "RolledBack")
    assert back.memory.failed_revision == "new"
    assert back.decision is not None
    assert history_action(back.decision) == "RolledBack"
    again = plan(memory=back.memory, judgement=HEALTHY, now=T0 + timedelta(seconds=500))
    assert (again.canary, again.phase, again.decision) == (False, "RolledBack", None)
    newer = plan(desired="newer", memory=back.memory)
    assert newer.canary, "a spec change is a new revision and gets its own canary"


def test_a_spec_change_during_a_canary_restarts_it_with_the_newest_revision() -> None:
    running = RolloutMemory(stable_revision="old", canary_revision="new", step=1, step_started_at=T0)
    got = plan(desired="newer", memory=running, now=T0 + timedelta(seconds=10))
    assert (got.memory.canary_revision, got.memory.step) == ("newer", 0)


def test_no_judgement_holds_the_step() -> None:
    running = RolloutMemory(stable_revision="old", canary_revision="new", step=1, step_started_at=T0)
    got = plan(memory=running, now=T0 + timedelta(seconds=1000))
    assert (got.memory, got.decision, got.canary) == (running, None, True)


def test_routed_canary_gets_exact_weights() -> None:
    got = plan(routed=True)
    assert got.split.weight == 10
