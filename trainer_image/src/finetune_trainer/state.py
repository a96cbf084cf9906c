"""The training state that a checkpoint carries, and the early-stopping bookkeeping on it.

Torch-free: the loop, the export and the status shaping all read it, and none of them owns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.config import TrainerConfig


@dataclass
class TrainState:
    step: int = 0
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    before: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    data_fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainState:
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def improved(cfg: TrainerConfig, value: float, best: float | None) -> bool:
    """Whether ``value`` beats ``best`` by more than ``earlyStopping.minDelta`` in the configured mode."""
    if best is None:
        return True
    delta = cfg.early_stopping.min_delta
    if cfg.early_stopping.mode == "min":
        return value < best - delta
    return value > best + delta
