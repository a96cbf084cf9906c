"""Evaluation over a split, summed over all ranks, kept collective-safe.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively in each one); a
rank whose share is empty runs a padding batch with weight 0 and drops its records. The task says what to
sum per batch (``eval_sums``), which per-example records to keep for metrics that are not sums
(``eval_records``: AUC, mAP) and how both become metrics (``final_metrics``); sums (not means) cross the
ranks, and the records of every rank are gathered in rank order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from finetune_trainer.distributed import Distributed
from finetune_trainer.engine import Engine, evaluating
from finetune_trainer.tasks.base import TrainingTask


def evaluate(
    engine: Engine,
    task: TrainingTask,
    examples: Sequence[Any],
    dist: Distributed,
    *,
    batch_size: int,
    max_batches: int | None = None,
) -> dict[str, float]:
    """The task's metrics over ``examples``; {} for an empty split."""
    if not examples:
        return {}
    per_round = batch_size * dist.world_size
    rounds = math.ceil(len(examples) / per_round)
    if max_batches is not None:
        rounds = min(rounds, max_batches)
    totals: dict[str, float] = {}
    records: list[Any] = []
    with evaluating(engine):
        for r in range(rounds):
            start = r * per_round + dist.rank * batch_size
            chunk = list(examples[start : start + batch_size])
            weight = 1.0 if chunk else 0.0
            batch = task.collate(chunk or [examples[0]], dist.device)
            outputs = engine.eval_forward(batch)
            for key, value in task.eval_sums(outputs, batch).items():
                totals[key] = totals.get(key, 0.0) + weight * value
            batch_records = task.eval_records(outputs, batch)
            if chunk:
                records.extend(batch_records)
    keys = sorted(totals)
    summed = dict(zip(keys, dist.sum([totals[k] for k in keys]), strict=True))
    return task.final_metrics(summed, dist.gather_objects(records))
