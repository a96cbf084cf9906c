"""What the servers should run now, from what runs and what the spec asks for. Pure.

Level-triggered: the inputs are the observed Deployments (their revision labels and counts), the
revision the current spec renders to, and the rollout's memory in `status.rollout` (which revision is
under test, its step and clock, which revision was rolled back). The output says which revision the
stable Deployment gets (or to leave it alone), whether a canary runs and with how many replicas, and the
decision to record, if any.

    no stable Deployment yet                 -> the spec's revision becomes stable (first deploy)
    stable runs the spec's revision          -> keep it; the canary goes once the stable has rolled out
    RollingUpdate and a new revision         -> the stable Deployment rolls to it
    Canary and a new revision                -> start it at step 1 beside the untouched stable, then
                                                follow `decisions.decide` each analysis interval:
                                                promote, complete (the stable rolls to it; the canary
                                                serves until the stable has rolled out), or roll back
    the spec's revision was rolled back      -> stay on the stable until the spec changes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from finetune_operator.rollout.analysis import Judgement
from finetune_operator.rollout.decisions import CanaryPosition, Decision, Step, decide
from finetune_operator.rollout.split import Split, replica_split, route_split

Strategy = Literal["RollingUpdate", "Canary"]


@dataclass(frozen=True)
class ObservedDeployment:
    """The parts of a server Deployment the plan needs."""

    revision: str
    replicas: int
    """`spec.replicas` (the autoscaler's count when it manages the Deployment)."""
    ready_replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    observed: bool = True
    """Its controller has seen the latest spec (`status.observedGeneration == metadata.generation`)."""
    stalled: bool = False
    """Its `Progressing` condition is False (`ProgressDeadlineExceeded`): pods don't become available."""

    @property
    def rolled_out(self) -> bool:
        """Every replica runs the current template and is available."""
        return (
            self.observed
            and self.updated_replicas >= self.replicas
            and self.available_replicas >= self.replicas
            and self.ready_replicas >= self.replicas
        )


@dataclass(frozen=True)
class RolloutMemory:
    """`status.rollout`, as the last reconcile left it."""

    stable_revision: str | None = None
    canary_revision: str | None = None
    failed_revision: str | None = None
    step: int = 0
    step_started_at: datetime | None = None
    completing: bool = False
    """The canary passed its last step; the stable Deployment is rolling to it."""


@dataclass(frozen=True)
class RolloutPlan:
    apply_stable: bool
    """Apply the spec's revision to the stable Deployment (else leave that Deployment as it is)."""
    canary: bool
    """Run the spec's revision as the canary Deployment (else delete it)."""
    split: Split
    """Replicas (of the canary; the stable keeps its own) and the canary's effective weight."""
    memory: RolloutMemory
    """What to write back to `status.rollout`."""
    decision: Decision | None = None
    """The decision to record (condition, Event, history), when there is one."""
    phase: Literal["Stable", "RollingUpdate", "Canary", "Completing", "RolledBack"] = "Stable"


def needs_analysis(memory: RolloutMemory, desired: str, strategy: Strategy) -> bool:
    """Whether the canary's metrics must be read for this reconcile."""
    return (
        strategy == "Canary"
        and memory.canary_revision == desired
        and not memory.completing
        and memory.failed_revision != desired
    )


def plan_rollout(
    *,
    desired: str,
    strategy: Strategy,
    steps: Sequence[Step],
    inconclusive_timeout_seconds: int,
    stable: ObservedDeployment | None,
    memory: RolloutMemory,
    judgement: Judgement | None,
    now: datetime,
    routed: bool = False,
) -> RolloutPlan:
    """The plan for this reconcile. `judgement` is the canary's latest analysis (None when none was due or
    none could be made; the canary then just holds its step)."""
    none = Split(stable.replicas if stable else 0, 0, 0)
    if stable is None or (stable.revision == desired and not memory.completing):
        # First deploy, or the spec's revision is stable already (after a rolling update, a completed
        # canary, or a spec change back to the stable revision during a canary, which drops that canary).
        canary_left = stable is not None and memory.canary_revision is not None and not stable.rolled_out
        done = RolloutMemory(stable_revision=desired, failed_revision=memory.failed_revision)
        return RolloutPlan(True, False, none, done, None, "RollingUpdate" if canary_left else "Stable")
    if memory.completing and memory.canary_revision == desired:
        # The stable rolls to the promoted revision; the canary keeps serving until the stable has
        # rolled out, so capacity never dips below what served before.
        if stable.revision == desired and stable.rolled_out:
            done = RolloutMemory(stable_revision=desired, failed_revision=memory.failed_revision)
            return RolloutPlan(True, False, none, done, None, "Stable")
        split = _split(stable.replicas, steps[-1].weight, routed)
        return RolloutPlan(True, True, split, memory, None, "Completing")
    if strategy == "RollingUpdate":
        kept = RolloutMemory(stable_revision=desired, failed_revision=memory.failed_revision)
        return RolloutPlan(True, False, none, kept, None, "RollingUpdate")
    if not steps:
        raise ValueError("strategy Canary needs steps")
    if memory.failed_revision == desired:
        return RolloutPlan(
            False, False, none, replace(memory, canary_revision=None, completing=False), None, "RolledBack"
        )
    if memory.canary_revision != desired or memory.step_started_at is None:
        started = RolloutMemory(
            stable_revision=stable.revision,
            canary_revision=desired,
            failed_revision=memory.failed_revision,
            step=0,
            step_started_at=now,
        )
        split = _split(stable.replicas, steps[0].weight, routed)
        message = (
            f"canary {desired} started beside stable {stable.revision} at {split.weight} % of the traffic"
        )
        decision = Decision("wait", "CanaryStarted", message, 0, steps[0].weight, True)
        return RolloutPlan(False, True, split, started, decision, "Canary")
    position = CanaryPosition(memory.step, memory.step_started_at)
    if judgement is None:
        split = _split(stable.replicas, steps[min(memory.step, len(steps) - 1)].weight, routed)
        return RolloutPlan(False, True, split, memory, None, "Canary")
    decision = decide(
        steps, position, judgement, now, inconclusive_timeout_seconds=inconclusive_timeout_seconds
    )
    if decision.action == "rollback":
        failed = RolloutMemory(stable_revision=stable.revision, failed_revision=desired)
        return RolloutPlan(False, False, none, failed, decision, "RolledBack")
    if decision.action == "complete":
        completing = replace(memory, completing=True)
        split = _split(stable.replicas, steps[-1].weight, routed)
        return RolloutPlan(True, True, split, completing, decision, "Completing")
    if decision.action == "promote":
        moved = replace(memory, step=decision.step, step_started_at=now)
        return RolloutPlan(
            False, True, _split(stable.replicas, decision.weight, routed), moved, decision, "Canary"
        )
    split = _split(stable.replicas, decision.weight, routed)
    return RolloutPlan(False, True, split, memory, decision if decision.recorded else None, "Canary")


def _split(stable_replicas: int, weight: int, routed: bool) -> Split:
    return route_split(stable_replicas, weight) if routed else replica_split(stable_replicas, weight)


HistoryAction = Literal["Started", "Promoted", "Completed", "Waiting", "RolledBack"]


def history_action(decision: Decision) -> HistoryAction:
    """The `status.rollout.history` entry's decision for a recorded `Decision`."""
    if decision.reason == "CanaryStarted":
        return "Started"
    if decision.action == "promote":
        return "Promoted"
    if decision.action == "complete":
        return "Completed"
    if decision.action == "rollback":
        return "RolledBack"
    return "Waiting"
