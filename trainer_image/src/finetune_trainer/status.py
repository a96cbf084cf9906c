"""FineTuneJob status shaping: what rank 0 merge-patches into ``status`` (progress, metrics, checkpoints).

Pure: the loop hands in numbers, these functions decide where they go. Keys follow the operator's status
models (``api/finetunejob.py``: ``Progress``, ``Metrics``, ``CheckpointStatus``); ``progress`` holds the
throughput figures, everything else the caller passes lands in ``metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_trainer.reporting import now_iso

#: Metric keys that belong to ``status.progress`` rather than ``status.metrics``.
PROGRESS_METRICS = ("samplesPerSecond", "tokensPerSecond")


@dataclass(frozen=True)
class Pace:
    """Where the run stands: for the percentage, the epoch and the time estimate."""

    step: int
    total_steps: int
    steps_per_epoch: int
    #: Steps done by this process (since it started or resumed) in ``elapsed_seconds``.
    steps_done: int
    elapsed_seconds: float


def progress_status(stage: str, pace: Pace, **metrics: Any) -> dict[str, Any]:
    """``{"progress": {...}, "metrics": {...}}`` for one stage (Preparing, Training, Evaluating...)."""
    progress: dict[str, Any] = {
        "step": pace.step,
        "totalSteps": pace.total_steps,
        "percent": round(100.0 * pace.step / max(1, pace.total_steps), 2),
        "stage": stage,
        "updatedAt": now_iso(),
    }
    if pace.steps_per_epoch:
        progress["epoch"] = round(pace.step / pace.steps_per_epoch, 4)
    if stage == "Completed":
        progress["etaSeconds"] = 0  # a merge patch keeps older keys: don't leave a stale estimate
    elif pace.steps_done > 0 and pace.step < pace.total_steps:
        progress["etaSeconds"] = int(pace.elapsed_seconds / pace.steps_done * (pace.total_steps - pace.step))
    progress.update({k: v for k, v in metrics.items() if k in PROGRESS_METRICS})
    status: dict[str, Any] = {"progress": progress}
    status_metrics = {k: v for k, v in metrics.items() if k not in progress}
    if status_metrics:
        status["metrics"] = status_metrics
    return status


def checkpoints_status(latest: str, latest_step: int, best: str | None, count: int) -> dict[str, Any]:
    """``{"checkpoints": {...}}`` after a save: the newest complete checkpoint and the best one."""
    return {"checkpoints": {"latest": latest, "latestStep": latest_step, "best": best, "count": count}}
