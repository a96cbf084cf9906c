"""The quality gate: a compressed model against the model it came from, on the artifact's held-out sample.

Causal LMs are compared by perplexity over the tokens the trainer took the loss on (labels != -100), as
``exp(mean token NLL)``; classifiers by accuracy. The drop is relative: ``(ppl - base) / base`` and
``(base_acc - acc) / base_acc`` (0.01 = 1 % worse; 0 when the baseline accuracy is 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from finetune_server.artifact import QualityRow
from finetune_server.backends import Backend

IGNORE = -100
BATCH = 8


@dataclass(frozen=True)
class GateResult:
    """One compression step's measured outcome (the ModelDeployment status's QualityResult)."""

    step: str  # "pruning" or "quantization"
    method: str
    metric: str
    baseline: float
    value: float
    quality_drop: float
    max_quality_drop: float
    size_bytes: int
    original_size_bytes: int
    sparsity: float | None = None

    @property
    def passed(self) -> bool:
        return self.quality_drop <= self.max_quality_drop

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = asdict(self)
        data["passed"] = self.passed
        return {_camel(k): v for k, v in data.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _batches(
    rows: Sequence[QualityRow], pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        width = max(len(r.input_ids) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for i, row in enumerate(chunk):
            n = len(row.input_ids)
            ids[i, :n] = torch.tensor(row.input_ids)
            mask[i, :n] = 1
            if len(row.labels) == n:
                labels[i, :n] = torch.tensor(row.labels)
        out.append((ids, mask, labels))
    return out


@torch.inference_mode()
def perplexity(backend: Backend, rows: Sequence[QualityRow], pad_id: int) -> float:
    total, count = 0.0, 0
    for ids, mask, labels in _batches(rows, pad_id):
        logits = backend.logits(ids, mask).float()
        shifted = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(nll)
        count += int((shifted != IGNORE).sum())
    if not count:
        raise ValueError("the quality sample has no token with a label")
    return math.exp(total / count)


@torch.inference_mode()
def accuracy(backend: Backend, rows: Sequence[QualityRow], pad_id: int) -> float:
    """Fraction of rows whose arg-max class is the row's label (``labels == [class_id]``)."""
    right = 0
    for start, (ids, mask, _) in zip(range(0, len(rows), BATCH), _batches(rows, pad_id), strict=True):
        expected = [row.labels[0] for row in rows[start : start + BATCH]]
        predicted = backend.logits(ids, mask).argmax(-1).tolist()
        right += sum(int(p == e) for p, e in zip(predicted, expected, strict=True))
    if not rows:
        raise ValueError("the quality sample is empty")
    return right / len(rows)


METRICS = {"causal-lm": ("perplexity", perplexity), "sequence-classification": ("accuracy", accuracy)}


def relative_drop(metric: str, baseline: float, value: float) -> float:
    if metric == "perplexity":
        return (value - baseline) / baseline
    return (baseline - value) / baseline if baseline > 0 else 0.0
