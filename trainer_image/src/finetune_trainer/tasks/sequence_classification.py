"""Sequence classification: rows with a text (and an optional second text of a pair) and a class label.

The text data pipeline prepares the rows (kind ``classification``): examples are ``{"input_ids",
"attention_mask", "labels": [class_id]}`` with class ids indexing ``prepared.label_names`` (sorted; numeric
names in numeric order). The model is ``AutoModelForSequenceClassification`` with a new head of that many
classes and the label mapping (``id2label``/``label2id``) in its config, so the exported model names its
classes; LoRA uses peft's ``SEQ_CLS`` task type (the head is trained in full and saved with the adapter).

Metrics: loss and accuracy from additive sums; macro precision, recall and F1 (over the classes that occur
in the labels or the predictions), and one-vs-rest AUC (macro over the classes with both positive and
negative rows) from per-row records (label, class probabilities) gathered from every rank. The model card
gets a per-class report and a confusion-matrix PNG of the last split evaluated (test, else validation).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data.encoding import Example
from finetune_trainer.data.errors import DataError
from finetune_trainer.tasks.base import Batch, Exported
from finetune_trainer.tasks.causal_lm import prepare_text, token_fingerprint

log = logging.getLogger(__name__)

CONFUSION_MATRIX = "confusion_matrix.png"
CLASSIFICATION_REPORT = "classification_report.json"
#: Validation rows whose predictions go into metrics.json and the model card.
SAMPLE_ROWS = 8

#: One evaluated row: (true class id, class probabilities).
Record = tuple[int, list[float]]


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, num_classes: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """(macro precision/recall/F1 and AUC, the per-class report with the confusion matrix) of the rows.

    Macro averages run over the classes that occur among the labels or the predictions (scikit-learn's
    default); AUC is the mean one-vs-rest AUC over the classes with both positive and negative rows, absent
    when there is none (a split of one class has no AUC)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    predictions = probabilities.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="macro", zero_division=0
    )
    metrics = {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
    aucs = []
    for cls in range(num_classes):
        positive = labels == cls
        if positive.any() and not positive.all():
            aucs.append(float(roc_auc_score(positive, probabilities[:, cls])))
    if aucs:
        metrics["auc"] = float(np.mean(aucs))
    every = list(range(num_classes))
    per_precision, per_recall, per_f1, support = precision_recall_fscore_support(
        labels, predictions, labels=every, average=None, zero_division=0
    )
    report = {
        "classes": [
            {
                "class": cls,
                "precision": float(per_precision[cls]),
                "recall": float(per_recall[cls]),
                "f1": float(per_f1[cls]),
                "support": int(support[cls]),
            }
            for cls in every
        ],
        "confusionMatrix": confusion_matrix(labels, predictions, labels=every).tolist(),
    }
    return metrics, report


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: Path) -> None:
    """Rows: true class; columns: predicted class; counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    size = max(3.0, 0.6 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=list(names), rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for (row, col), value in np.ndenumerate(counts):
        colour = "white" if value > threshold else "black"
        ax.text(col, row, str(value), ha="center", va="center", color=colour)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class SequenceClassification:
    name: ClassVar[str] = "sequence-classification"
    unit: ClassVar[str] = "tokens"
    #: The model kind named in a load error.
    model_kind: ClassVar[str] = "a sequence classifier"
    #: Whether the checkpoint's classification head may have other classes (then initialised afresh).
    new_head: ClassVar[bool] = False
    #: peft's task type for LoRA/QLoRA.
    peft_task_type: ClassVar[str] = "SEQ_CLS"

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.tokenizer: Any = None
        self.pad_id = 0
        self.label_names: list[str] = []
        #: The per-class report of the latest final_metrics call (the last split evaluated).
        self.last_report: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------------- set-up
    def load_processor(self) -> Any:
        from finetune_trainer.modeling import load_tokenizer

        self.tokenizer = load_tokenizer(self.cfg)
        self.pad_id = int(self.tokenizer.pad_token_id)
        return self.tokenizer

    def prepare(self, processor: Any, workdir: Path, *, store: Path, attempt: str, wait: bool) -> Any:
        prepared = prepare_text(self.cfg, processor, workdir, store=store, attempt=attempt, wait=wait)
        names = list(prepared.label_names or [])
        if len(names) < 2:
            raise DataError(
                f"sequence-classification needs at least two classes in data.fields.label "
                f"({self.cfg.data.fields.label!r}); the data has {names}",
                reason="TooFewClasses",
            )
        self.label_names = names
        return prepared

    def label_config(self) -> dict[str, Any]:
        """The model-config entries of the label mapping (and the padding id the head reads)."""
        return {
            "num_labels": len(self.label_names),
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {name: i for i, name in enumerate(self.label_names)},
            "pad_token_id": self.pad_id,
        }

    def model_class(self) -> Any:
        """The transformers auto class of the model: loaded for training, reloaded to merge an adapter."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def saved_processor(self) -> Any:
        """What the artifact holds beside the weights for the server's loader (the tokenizer)."""
        return self.tokenizer

    def load_model(self, prepared: Any, device: torch.device, ds_config: dict[str, Any] | None) -> nn.Module:
        from finetune_trainer.modeling import apply_method, load_pretrained

        model = load_pretrained(
            self.cfg,
            self.model_class(),
            device=device,
            ds_config=ds_config,
            what=self.model_kind,
            new_head=self.new_head,
            **self.label_config(),
        )
        return apply_method(self.cfg, model, peft_task_type=self.peft_task_type)

    # ------------------------------------------------------------------------------------- the loop
    def collate(self, examples: Sequence[Example], device: torch.device) -> Batch:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
        labels = torch.tensor([int(e["labels"][0]) for e in examples], dtype=torch.long)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def forward(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        outputs = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return outputs.logits  # type: ignore[no-any-return]

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return functional.cross_entropy(
            outputs.float(), batch["labels"], label_smoothing=self.cfg.hyperparameters.label_smoothing
        )

    @staticmethod
    def units(examples: Sequence[Example]) -> int:
        return sum(len(e["input_ids"]) for e in examples)

    @staticmethod
    def fingerprint(examples: Sequence[Example]) -> str:
        return token_fingerprint(examples)

    # ----------------------------------------------------------------------------------- evaluation
    def eval_sums(self, outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Summed loss, row count and correct predictions of one batch."""
        logits = outputs.float()
        loss = functional.cross_entropy(logits, batch["labels"], reduction="sum")
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return {"loss_sum": float(loss), "rows": float(len(batch["labels"])), "correct": float(correct)}

    def eval_records(self, outputs: torch.Tensor, batch: Batch) -> list[Record]:
        probabilities = torch.softmax(outputs.float(), dim=-1).cpu().tolist()
        return list(zip(batch["labels"].cpu().tolist(), probabilities, strict=True))

    def final_metrics(self, sums: Mapping[str, float], records: Sequence[Record]) -> dict[str, float]:
        """loss and accuracy over the rows; macro precision, recall, F1 and AUC from the records."""
        rows = max(sums["rows"], 1.0)
        metrics = {"loss": sums["loss_sum"] / rows, "accuracy": sums["correct"] / rows}
        if records:
            labels = np.asarray([label for label, _ in records], dtype=np.int64)
            probabilities = np.asarray([p for _, p in records], dtype=np.float64)
            extra, self.last_report = classification_metrics(labels, probabilities, probabilities.shape[1])
            metrics.update(extra)
        return metrics

    # --------------------------------------------------------------------------------------- finish
    def samples(
        self, module: nn.Module, prepared: Any, device: torch.device, synced: bool
    ) -> list[dict[str, Any]]:
        """The exported model's prediction for the first validation rows (every rank runs the same)."""
        rows = list(prepared.validation[:SAMPLE_ROWS])
        if not rows:
            return []
        batch = self.collate(rows, device)
        probabilities = torch.softmax(self.forward(module, batch).float(), dim=-1).cpu()
        out = []
        for example, row in zip(rows, probabilities, strict=True):
            best = int(row.argmax())
            out.append(
                {
                    "text": self.tokenizer.decode(example["input_ids"], skip_special_tokens=True),
                    "label": self._name(int(example["labels"][0])),
                    "predicted": self._name(best),
                    "score": round(float(row[best]), 4),
                }
            )
        return out

    def _name(self, index: int) -> str:
        return self.label_names[index] if index < len(self.label_names) else str(index)

    def export(
        self, module: nn.Module, state_dict: dict[str, torch.Tensor], out: Path, prepared: Any
    ) -> Exported:
        """The weights with the label mapping in their config, and :meth:`saved_processor` beside them."""
        from finetune_trainer.tasks.hf import save_pretrained_artifact

        return save_pretrained_artifact(
            self.cfg,
            module,
            state_dict,
            out,
            self.saved_processor(),
            self.model_class(),
            **self.label_config(),
        )

    def card_section(self, metrics: Mapping[str, Any], out: Path) -> str:
        lines = [
            "Loss and accuracy over the rows; precision, recall and F1 are macro averages over the classes; "
            "AUC is the mean one-vs-rest ROC AUC over the classes.",
            "",
        ]
        after = metrics.get("after", {})
        split = "test" if after.get("test") else "validation"
        report = self.last_report
        if report is not None:
            names = [self._name(c["class"]) for c in report["classes"]]
            (out / CLASSIFICATION_REPORT).write_text(
                json.dumps({"split": split, "labelNames": names, **report}, indent=1), encoding="utf-8"
            )
            plot_confusion_matrix(report["confusionMatrix"], names, out / CONFUSION_MATRIX)
            lines += [
                f"## Per-class report ({split} split)",
                "",
                "| class | precision | recall | f1 | support |",
                "| --- | --- | --- | --- | --- |",
            ]
            for name, row in zip(names, report["classes"], strict=True):
                lines.append(
                    f"| {name} | {row['precision']:.4g} | {row['recall']:.4g} | {row['f1']:.4g} | "
                    f"{row['support']} |"
                )
            lines += [
                "",
                "## Confusion matrix",
                "",
                f"Rows are the true classes, columns the predicted ones ({split} split; "
                f"`{CLASSIFICATION_REPORT}` has the counts).",
                "",
                f"![confusion matrix]({CONFUSION_MATRIX})",
                "",
            ]
        if metrics.get("samples"):
            lines += ["## Sample predictions", "", "| text | label | predicted | score |"]
            lines.append("| --- | --- | --- | --- |")
            for sample in metrics["samples"]:
                text = " ".join(str(sample["text"]).replace("|", "/").split())[:200]
                lines.append(f"| {text} | {sample['label']} | {sample['predicted']} | {sample['score']} |")
            lines.append("")
        return "\n".join(lines)
