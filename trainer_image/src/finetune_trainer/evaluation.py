"""Evaluation over a split, summed over all ranks, kept collective-safe.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively in each one); a
rank whose share is empty runs a dummy batch with weight 0. The task says what to sum per batch and how
the sums become metrics, so sums (not means) cross the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from finetune_trainer.distributed import Distributed
from finetune_trainer.engine import Batch, Engine, evaluating


class EvaluatedTask(Protocol):
    """What :func:`evaluate` needs from a task."""

    def collate(self, examples: Sequence[Any], device: torch.device) -> Batch: ...

    def eval_sums(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Additive figures of one batch (sums and counts, never means)."""

    def final_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """The split's metrics from the sums over every batch of every rank."""


def evaluate(
    engine: Engine,
    task: EvaluatedTask,
    examples: Sequence[Any],
    dist: Distributed,
    *,
    batch_size: int,
    max_batches: int | None = None,
    forward: Callable[[Batch], torch.Tensor] | None = None,
) -> dict[str, float]:
    """The task's metrics over ``examples``; {} for an empty split."""
    if not examples:
        return {}
    per_round = batch_size * dist.world_size
    rounds = math.ceil(len(examples) / per_round)
    if max_batches is not None:
        rounds = min(rounds, max_batches)
    logits_of = forward or engine.eval_logits
    totals: dict[str, float] = {}
    with evaluating(engine):
        for r in range(rounds):
            start = r * per_round + dist.rank * batch_size
            chunk = list(examples[start : start + batch_size])
            weight = 1.0 if chunk else 0.0
            batch = task.collate(chunk or [examples[0]], dist.device)
            for key, value in task.eval_sums(logits_of(batch), batch).items():
                totals[key] = totals.get(key, 0.0) + weight * value
    keys = sorted(totals)
    summed = dict(zip(keys, dist.sum([totals[k] for k in keys]), strict=True))
    return task.final_metrics(summed)
