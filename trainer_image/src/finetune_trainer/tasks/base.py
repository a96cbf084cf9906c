"""What a training task supplies to the task-agnostic loop (finetune_trainer.loop).

One module per task in this package, each with one class that satisfies :class:`TrainingTask`, registered in
``finetune_trainer.tasks.TASKS`` (name → factory) which replaces ``config.IMPLEMENTED_TASKS``. The loop,
the engines, evaluation, checkpoints/resume, early stopping, reporting and the export frame are shared; a
task only says how its data becomes examples, how its model is built, fed and scored, and what it exports.

Rules every task keeps:

- **Collective-safe evaluation.** ``eval_sums`` returns additive figures (sums and counts, never means), so
  the loop sums them over ranks, and every rank runs the same forward passes (ZeRO-3 gathers parameters in
  each one); metrics that are not sums (AUC, mAP) come from ``eval_records``, gathered from every rank.
  ``final_metrics`` turns both into the metrics named in the task catalog
  (``finetune_trainer.task_catalog.CATALOG[name].metrics``), ``loss`` always among them.
- **No silent fallbacks.** A value the task cannot honour raises ``ConfigError``/``DataError`` naming the
  field or the row; it is never replaced by another.
- **Deterministic for a seed.** Initialisation takes its randomness from ``cfg.seed``; augmentation (text
  perturbations, image transforms) and negative sampling from ``cfg.data.augmentation.seed`` (the run's
  seed unless the config sets it; TrainerConfig resolves it) and the epoch, where it changes per epoch;
  never from global state.
- **Artifacts the server loads.** ``export`` writes a folder that ``finetune_server``'s loader for the task
  (``finetune_server.models.MODEL_KINDS[name]``) loads and predicts with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


#: What the artifact holds, as FineTuneJob ``status.artifact.format`` accepts it: the ``full`` weights, a LoRA
#: ``adapter`` only, or an adapter ``merged`` into the base weights. Not the file layout (a task's serving
#: manifest names that): any other value makes the API server refuse the trainer's status patch.
ArtifactFormat = Literal["full", "adapter", "merged"]


@dataclass(frozen=True)
class Exported:
    """What :meth:`TrainingTask.export` wrote: the artifact folder and what it holds."""

    directory: Path
    format: ArtifactFormat


class TrainingTask(Protocol):
    #: The task's wire name (a key of task_catalog.CATALOG).
    name: ClassVar[str]
    #: What throughput counts (``tokens``, ``images``, ``interactions``): ``<unit>_per_second`` in reports.
    unit: ClassVar[str]

    # ---------------------------------------------------------------------------------------- set-up
    def load_processor(self) -> Any:
        """The tokenizer / image processor / id maps the data preparation and the export need (or None)."""

    def prepare(self, processor: Any, workdir: Path, *, store: Path, attempt: str, wait: bool) -> Any:
        """Prepared data: ``.train``/``.validation``/``.test`` sequences of examples and ``.report``
        (finetune_trainer.data.report.DataReport), like finetune_trainer.data.pipeline.PreparedData. Rank 0
        prepares into ``store`` (``wait=False``); the other ranks wait for it (``wait=True``)."""

    def load_model(self, prepared: Any, device: torch.device, ds_config: dict[str, Any] | None) -> nn.Module:
        """The model to train (peft-wrapped for LoRA), on ``device``; label maps come from ``prepared``."""

    # ------------------------------------------------------------------------------------- the loop
    def collate(self, examples: Sequence[Any], device: torch.device) -> Batch: ...

    def forward(self, module: nn.Module, batch: Batch) -> Any:
        """The model's outputs for a batch (logits, or a task's own structure)."""

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The mean training loss of a batch (label smoothing from the config where the task has it)."""

    def units(self, examples: Sequence[Any]) -> int:
        """How many ``unit`` the examples hold (tokens, images, interactions), for throughput."""

    def fingerprint(self, examples: Sequence[Any]) -> str:
        """A short digest of the train split, kept in checkpoints (resume warns when it changed)."""

    # ----------------------------------------------------------------------------------- evaluation
    def eval_sums(self, outputs: Any, batch: Batch) -> dict[str, float]:
        """Additive figures of one batch (sums and counts, never means)."""

    def eval_records(self, outputs: Any, batch: Batch) -> list[Any]:
        """Per-example records for metrics that are not sums (AUC, mAP): small picklable values (scores,
        boxes), gathered from every rank and handed to :meth:`final_metrics`; ``[]`` where sums suffice.
        The loop drops the records of a rank's padding batch."""

    def final_metrics(self, sums: Mapping[str, float], records: Sequence[Any]) -> dict[str, float]:
        """The split's metrics from the sums over every batch of every rank and the records of every rank
        (in rank order); ``loss`` always present."""

    # --------------------------------------------------------------------------------------- finish
    def samples(
        self, module: nn.Module, prepared: Any, device: torch.device, synced: bool
    ) -> list[dict[str, Any]]:
        """A few predictions on validation rows for the report and the model card (every rank calls it)."""

    def export(
        self, module: nn.Module, state_dict: dict[str, torch.Tensor], out: Path, prepared: Any
    ) -> Exported:
        """Write the artifact under ``out`` (rank 0 only); the server's loader for the task loads it."""

    def card_section(self, metrics: Mapping[str, Any], out: Path) -> str:
        """The task's model-card section (markdown); plots it draws are written under ``out`` and linked
        relatively (confusion matrix, sample detections, recall@k curve)."""
