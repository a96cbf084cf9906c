"""Sequence classification (task ``sequence-classification``): ``/v1/predict`` over batched texts.

Each input text is one work item, so inputs of concurrent requests share forward passes. Labels are the
artifact's class names (serving.json ``labelNames``), else the model config's ``id2label``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_server.errors import PayloadTooLargeError
from finetune_server.models.base import LoadedModel


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


class ClassifierModel(LoadedModel):
    task: ClassVar[str] = "sequence-classification"
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"
    causal: ClassVar[bool] = False

    def on_loaded(self) -> None:
        artifact = self.artifact
        names = artifact.label_names if artifact is not None else None
        if not names:
            config = getattr(getattr(self.backend, "module", None), "config", None)
            id2label = getattr(config, "id2label", None) or {}
            names = tuple(str(id2label[i]) for i in sorted(id2label))
        self.labels: tuple[str, ...] = tuple(names)

    def encode(self, text: str, index: int, max_input_tokens: int) -> list[int]:
        self.require_ready()
        ids = list(self.tokenizer(text)["input_ids"])
        if len(ids) > max_input_tokens:
            raise PayloadTooLargeError(
                f"inputs[{index}]: {len(ids)} tokens is above this server's limit of {max_input_tokens} "
                "(limits.maxInputTokens)",
                param=f"inputs[{index}]",
            )
        return ids

    def run_batch(self, batch: list[Any]) -> None:
        import torch

        pad = int(self.tokenizer.pad_token_id)
        width = max(len(w.payload) for w in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, work in enumerate(batch):
            ids[i, : len(work.payload)] = torch.tensor(work.payload)
            mask[i, : len(work.payload)] = 1
        with self.lock, torch.inference_mode():
            probs = torch.softmax(self.backend.logits(ids, mask).float(), dim=-1)
        for work, row in zip(batch, probs.tolist(), strict=True):
            scores = {self._label(i): round(p, 6) for i, p in enumerate(row)}
            best = max(range(len(row)), key=row.__getitem__)
            work.finish(Prediction(self._label(best), row[best], scores))

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)
