"""One module per training task; the loop (finetune_trainer.loop) stays task-agnostic.

:data:`TASKS` maps a task's wire name to its factory (called with the TrainerConfig); adding a task is one
module with a class that satisfies :class:`finetune_trainer.tasks.base.TrainingTask` and one line here.
Its keys equal the names ``finetune_trainer.task_catalog`` marks implemented (the torch-free side of the
contract, which the operator and the config validators read; a unit test keeps the two equal).

Task modules import neither the engine, the loop nor the evaluation (which import this package).
"""

from __future__ import annotations

from collections.abc import Callable

from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.tasks.base import TrainingTask
from finetune_trainer.tasks.causal_lm import CausalLM
from finetune_trainer.tasks.image_classification import ImageClassification
from finetune_trainer.tasks.object_detection import ObjectDetection
from finetune_trainer.tasks.recommendation import Recommendation
from finetune_trainer.tasks.sequence_classification import SequenceClassification

TaskFactory = Callable[[TrainerConfig], TrainingTask]

TASKS: dict[str, TaskFactory] = {
    CausalLM.name: CausalLM,
    SequenceClassification.name: SequenceClassification,
    ImageClassification.name: ImageClassification,
    ObjectDetection.name: ObjectDetection,
    Recommendation.name: Recommendation,
}


def make_task(cfg: TrainerConfig) -> TrainingTask:
    """The task object of ``cfg.task``."""
    factory = TASKS.get(cfg.task.value)
    if factory is None:
        raise ConfigError(
            f"task {cfg.task.value!r} is not implemented by this trainer (implemented: {', '.join(TASKS)})"
        )
    return factory(cfg)
