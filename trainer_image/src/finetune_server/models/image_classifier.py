"""Image classification (task ``image-classification``): ``/v1/predict`` over base64-encoded images.

The request is the classifier's (``{"model", "inputs": [...]}``) with each input an image file (PNG, JPEG,
…) encoded in base64; the answer is the same ``{"label", "score", "scores"}`` per input. The artifact is the
trainer's ``model/`` folder: ``AutoModelForImageClassification`` weights with ``id2label`` and the image
processor the model was trained with, so a request image is resized and normalised exactly as in training.

Pruning and quantisation are refused for this kind (their quality gate measures token models), so a
config that asks for them fails to load with the field named instead of serving an unmeasured model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from finetune_server.config import resolve_device
from finetune_server.models.base import decode_image, refuse_compression
from finetune_server.models.classifier import ClassifierModel, Prediction


class ImageClassifierModel(ClassifierModel):
    task: ClassVar[str] = "image-classification"
    auto_class: ClassVar[str] = "AutoModelForImageClassification"

    def _load(self) -> None:
        import torch
        from transformers import AutoImageProcessor

        from finetune_server.artifact import read_artifact
        from finetune_server.backends import serialized_size

        config = self.config
        refuse_compression(config, self.task)
        device = resolve_device(config, torch.cuda.is_available())
        self.status.device = device
        artifact = read_artifact(
            config.model_dir, task=config.task or self.task, verify=config.verify_manifest
        )
        self.artifact = artifact
        self.processor: Any = AutoImageProcessor.from_pretrained(str(artifact.directory))  # type: ignore[no-untyped-call]
        model = self._load_model(artifact, device)
        self.module: Any = model
        self.status.original_size_bytes = self.status.size_bytes = serialized_size(model)
        self.on_loaded()

    def on_loaded(self) -> None:
        config = getattr(self.module, "config", None)
        id2label = getattr(config, "id2label", None) or {}
        names = self.artifact.label_names if self.artifact is not None else None
        self.labels: tuple[str, ...] = tuple(names or (str(id2label[i]) for i in sorted(id2label)))

    def encode(self, text: str, index: int, max_input_tokens: int) -> Any:
        """The image of ``inputs[index]`` (base64 of an image file), decoded as RGB."""
        self.require_ready()
        return decode_image(text, index)

    def run_batch(self, batch: list[Any]) -> None:
        import torch

        pixels = self.processor(images=[w.payload for w in batch], return_tensors="pt")["pixel_values"]
        parameter = next(self.module.parameters())
        with self.lock, torch.inference_mode():
            logits = self.module(pixel_values=pixels.to(parameter.device, parameter.dtype)).logits
            probs = torch.softmax(logits.float(), dim=-1)
        for work, row in zip(batch, probs.tolist(), strict=True):
            scores = {self._label(i): round(p, 6) for i, p in enumerate(row)}
            best = max(range(len(row)), key=row.__getitem__)
            work.finish(Prediction(self._label(best), row[best], scores))
