"""Object detection (task ``object-detection``): ``/v1/predict`` over base64 images, answered with boxes.

The artifact is the trainer's detector folder (``config.json`` with the category names and
``model.safetensors``, finetune_trainer.tasks.detector), verified against its manifest. Each image is one
work item, so the images of concurrent requests share forward passes. Pruning and quantization are
measured on token models only, so they are refused for detectors (the field named), never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_server.artifact import read_artifact
from finetune_server.config import resolve_device
from finetune_server.errors import ArtifactError
from finetune_server.models.base import LoadedModel, decode_image, refuse_compression


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``[x1, y1, x2, y2]`` boxes in the image's pixels, category names, scores."""

    boxes: list[list[float]]
    labels: list[str]
    scores: list[float]


class DetectorModel(LoadedModel):
    task: ClassVar[str] = "object-detection"
    auto_class: ClassVar[str] = ""
    causal: ClassVar[bool] = False

    def _load(self) -> None:
        import torch

        from finetune_trainer.tasks.detector import DetectorFolderError, load_trained_detector

        config = self.config
        refuse_compression(config, self.task)
        device = resolve_device(config, torch.cuda.is_available())
        self.status.device = device
        if config.threads and device == "cpu":
            torch.set_num_threads(config.threads)
        artifact = read_artifact(
            config.model_dir, task=config.task or self.task, verify=config.verify_manifest
        )
        self.artifact = artifact
        try:
            self.detector, self.categories = load_trained_detector(artifact.directory, device)
        except DetectorFolderError as exc:
            raise ArtifactError(str(exc)) from exc
        size = sum(p.numel() * p.element_size() for p in self.detector.state_dict().values())
        self.status.size_bytes = self.status.original_size_bytes = size

    def decode(self, data: str, index: int) -> Any:
        """A base64 image → float RGB tensor [3, H, W]; 400 naming ``inputs[index]`` when it is not one."""
        import torch
        from torchvision.transforms.v2 import functional

        self.require_ready()
        rgb = decode_image(data, index)
        return functional.to_dtype(functional.to_image(rgb), torch.float32, scale=True)

    def run_batch(self, batch: list[Any]) -> None:
        import torch

        from finetune_trainer.tasks.detector import detections_of

        device = self.status.device or "cpu"
        with self.lock, torch.inference_mode():
            outputs = self.detector([work.payload.to(device) for work in batch])
        for work, output in zip(batch, outputs, strict=True):
            plain = detections_of(output)
            labels = [self.categories[i] for i in plain["labels"]]
            work.finish(Detections(plain["boxes"], labels, plain["scores"]))
