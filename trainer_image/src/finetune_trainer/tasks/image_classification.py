"""Image classification: class-folder images or a table of paths and labels (finetune_trainer.data.images).

The model is ``AutoModelForImageClassification`` (ViT, ConvNeXt, ResNet, … whatever the model folder's
config names) with a new head of the data's classes and the label mapping in its config, fed by the
model's own ``AutoImageProcessor`` (resize, crop, normalisation as the model was trained with). Images are
decoded per batch; training images first go through ``data.augmentation.image``
(:mod:`finetune_trainer.data.image_augmentation`), seeded by (``data.augmentation.seed``, epoch, index in
the split).

Scoring is sequence classification's (loss and accuracy from sums; macro precision, recall, F1 and
one-vs-rest AUC from per-row records; the per-class report and confusion-matrix PNG in the model card), plus
top-5 accuracy when there are more than five classes. So is the export: ``model/`` with the weights,
``config.json`` (``id2label``) and, instead of the tokenizer, ``preprocessor_config.json``; the server's
``image-classification`` kind loads it.

Full fine-tuning only: LoRA/QLoRA for image models needs the new head trained beside the adapters, which
this trainer does not set up yet, so ``method`` lora/qlora is refused (never trained as something else).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.transforms.v2.functional import to_pil_image

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.image_augmentation import augment
from finetune_trainer.data.images import ImageExample, load_image, prepare_images
from finetune_trainer.tasks.base import Batch
from finetune_trainer.tasks.sequence_classification import SAMPLE_ROWS, Record, SequenceClassification

#: Top-k accuracy is reported for this k when there are more than k classes.
TOP_K = 5


class ImageClassification(SequenceClassification):
    """Shares sequence classification's label mapping, loss, scoring, export and model-card section; reads
    and feeds images instead of token ids, and saves the image processor instead of the tokenizer."""

    name: ClassVar[str] = "image-classification"
    unit: ClassVar[str] = "images"
    model_kind: ClassVar[str] = "an image classifier"
    # A pretrained image classifier's head may have other classes (ImageNet's 1000): initialised afresh.
    new_head: ClassVar[bool] = True
    peft_task_type: ClassVar[str] = ""  # LoRA is refused for this task (see the module docstring)

    def __init__(self, cfg: TrainerConfig):
        super().__init__(cfg)
        self.processor: Any = None
        #: The epoch the next training batches belong to (their augmentation draws depend on it).
        self.epoch = 0

    # ---------------------------------------------------------------------------------------- set-up
    def load_processor(self) -> Any:
        from transformers import AutoImageProcessor

        from finetune_trainer.modeling import ModelError, resolve_model_location

        location, revision = resolve_model_location(self.cfg.model)
        try:
            self.processor = AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                location, revision=revision, trust_remote_code=self.cfg.model.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the image processor from {self.cfg.model.path!r}: {exc}") from exc
        return self.processor

    def prepare(self, processor: Any, workdir: Path, *, store: Path, attempt: str, wait: bool) -> Any:
        prepared = prepare_images(
            self.cfg.data,
            workdir,
            model_license=self.cfg.model.license,
            store=store,
            attempt=attempt,
            wait=wait,
        )
        if len(prepared.label_names) < 2:
            raise DataError(
                f"image-classification needs at least two classes in data.fields.label "
                f"({self.cfg.data.fields.label!r}); the data has {prepared.label_names}",
                reason="TooFewClasses",
            )
        self.label_names = prepared.label_names
        return prepared

    def label_config(self) -> dict[str, Any]:
        """Sequence classification's label mapping, without the padding id (images have no padding)."""
        config = super().label_config()
        del config["pad_token_id"]
        return config

    def model_class(self) -> Any:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def saved_processor(self) -> Any:
        """The image processor (the export is sequence classification's, with this beside the weights)."""
        return self.processor

    # ------------------------------------------------------------------------------------- the loop
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next training batches belong to (called by the loop when one begins)."""
        self.epoch = epoch

    def _image(self, example: ImageExample) -> Any:
        image = load_image(example)
        augmentation = self.cfg.data.augmentation
        if augmentation.image is None or example["split"] != "train":
            return image
        augmented = augment(
            image, augmentation.image, seed=augmentation.seed, epoch=self.epoch, index=example["index"]
        )
        return to_pil_image(augmented) if isinstance(augmented, torch.Tensor) else augmented

    def collate(self, examples: Sequence[ImageExample], device: torch.device) -> Batch:  # type: ignore[override]
        pixels = self.processor(images=[self._image(e) for e in examples], return_tensors="pt")[
            "pixel_values"
        ]
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"pixel_values": pixels.to(device), "labels": labels.to(device)}

    def forward(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        dtype = next(module.parameters()).dtype  # bf16/fp16 under DeepSpeed: the pixels follow
        pixels = batch["pixel_values"].to(dtype if dtype.is_floating_point else torch.float32)
        return module(pixel_values=pixels).logits  # type: ignore[no-any-return]

    @staticmethod
    def units(examples: Sequence[ImageExample]) -> int:  # type: ignore[override]
        return len(examples)

    @staticmethod
    def fingerprint(examples: Sequence[ImageExample]) -> str:  # type: ignore[override]
        computed = getattr(examples, "fingerprint", None)  # the prepared view computed it while writing
        if not callable(computed):
            raise TypeError("image examples come from prepare_images, which computes their fingerprint")
        return str(computed())

    # ----------------------------------------------------------------------------------- evaluation
    def eval_sums(self, outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
        sums = super().eval_sums(outputs, batch)
        if outputs.shape[-1] > TOP_K:
            top = outputs.float().topk(TOP_K, dim=-1).indices
            sums["correct_top5"] = float((top == batch["labels"][:, None]).any(-1).sum())
        return sums

    def final_metrics(self, sums: Mapping[str, float], records: Sequence[Record]) -> dict[str, float]:
        """Sequence classification's metrics (loss, accuracy, macro precision/recall/F1, one-vs-rest AUC), and
        top-5 accuracy with more than five classes."""
        metrics = super().final_metrics(sums, records)
        if "correct_top5" in sums:
            metrics["top5_accuracy"] = sums["correct_top5"] / max(sums["rows"], 1.0)
        return metrics

    # --------------------------------------------------------------------------------------- finish
    def samples(
        self, module: nn.Module, prepared: Any, device: torch.device, synced: bool
    ) -> list[dict[str, Any]]:
        """The model's prediction for the first validation images (every rank runs the same)."""
        rows: list[ImageExample] = list(prepared.validation[:SAMPLE_ROWS])
        if not rows:
            return []
        probabilities = torch.softmax(self.forward(module, self.collate(rows, device)).float(), dim=-1).cpu()
        out = []
        for example, row in zip(rows, probabilities, strict=True):
            best = int(row.argmax())
            where = Path(example["path"]).name if example["path"] else f"{len(example['data'] or b'')} bytes"
            out.append(
                {
                    "text": f"image {where}",
                    "label": self._name(example["label"]),
                    "predicted": self._name(best),
                    "score": round(float(row[best]), 4),
                }
            )
        return out

    def card_section(self, metrics: Mapping[str, Any], out: Path) -> str:
        text = super().card_section(metrics, out)
        note = (
            "Images are decoded per batch and prepared by the model's image processor; "
            f"top-5 accuracy is reported with more than {TOP_K} classes."
        )
        return note + "\n\n" + text
