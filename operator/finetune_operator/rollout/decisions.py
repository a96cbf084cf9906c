"""What a canary rollout does next, from its step, its clock and the latest judgement. Pure.

    Fail                                   -> roll back at once
    step's pause not over                  -> wait (analysis goes on each interval)
    pause over, Pass                       -> promote to the next step, or complete after the last
    pause over, Inconclusive               -> wait, up to inconclusiveTimeoutSeconds past the pause,
                                              then roll back (too little traffic never passes)

Every decision other than a plain wait within a step changes a condition, posts an Event and appends
to `status.rollout.history`; the controller does those with the reason and message made here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from finetune_operator.rollout.analysis import FAIL, INCONCLUSIVE, PASS, Judgement

Action = Literal["wait", "promote", "complete", "rollback"]

REASON_STEP_IN_PROGRESS = "StepInProgress"
REASON_PROMOTED = "AnalysisPassed"
REASON_COMPLETED = "CanaryCompleted"
REASON_INCONCLUSIVE_WAIT = "AnalysisInconclusive"
REASON_INCONCLUSIVE_TIMEOUT = "AnalysisInconclusiveTimeout"
REASON_ROLLED_BACK = "AnalysisFailed"


@dataclass(frozen=True)
class Step:
    weight: int
    pause_seconds: int


@dataclass(frozen=True)
class CanaryPosition:
    """Where a running canary is."""

    step: int
    """Index into the steps."""
    step_started_at: datetime


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    message: str
    step: int
    """The step the rollout is at after the decision."""
    weight: int
    """The canary's target weight after it (100 once complete, 0 after a rollback)."""
    recorded: bool
    """Whether this is a decision worth a history entry and an Event (all but waiting in a step)."""


def decide(
    steps: Sequence[Step],
    position: CanaryPosition,
    judgement: Judgement,
    now: datetime,
    *,
    inconclusive_timeout_seconds: int,
) -> Decision:
    """The next move of the canary at `position`, judged `judgement` at `now`."""
    if not steps:
        raise ValueError("a canary needs at least one step")
    index = min(position.step, len(steps) - 1)
    step = steps[index]
    elapsed = (now - position.step_started_at).total_seconds()
    where = f"step {index + 1} of {len(steps)} ({step.weight} %)"
    if judgement.verdict == FAIL:
        return Decision(
            "rollback", REASON_ROLLED_BACK, f"{where}: {judgement.message}; rolled back", index, 0, True
        )
    if elapsed < step.pause_seconds:
        left = step.pause_seconds - elapsed
        return Decision(
            "wait",
            REASON_STEP_IN_PROGRESS,
            f"{where}: {judgement.message}; {left:.0f} s left in the step",
            index,
            step.weight,
            False,
        )
    if judgement.verdict == PASS:
        if index + 1 < len(steps):
            following = steps[index + 1]
            return Decision(
                "promote",
                REASON_PROMOTED,
                f"{where}: {judgement.message}; promoted to {following.weight} %",
                index + 1,
                following.weight,
                True,
            )
        return Decision(
            "complete",
            REASON_COMPLETED,
            f"{where}: {judgement.message}; the new revision takes all traffic",
            index,
            100,
            True,
        )
    assert judgement.verdict == INCONCLUSIVE
    overdue = elapsed - step.pause_seconds
    if overdue >= inconclusive_timeout_seconds:
        return Decision(
            "rollback",
            REASON_INCONCLUSIVE_TIMEOUT,
            f"{where}: {judgement.message} after {inconclusive_timeout_seconds} s past the step's pause; "
            "too little evidence never passes, rolled back",
            index,
            0,
            True,
        )
    return Decision(
        "wait",
        REASON_INCONCLUSIVE_WAIT,
        f"{where}: {judgement.message}; waiting up to {inconclusive_timeout_seconds - overdue:.0f} s more",
        index,
        step.weight,
        True,
    )
