"""Object detection: COCO annotations (or image + objects rows), a torchvision FCOS, mAP.

Data: finetune_trainer.data.detection (examples are image paths with their boxes and class ids). Model:
finetune_trainer.tasks.detector (``model.path`` is a detector folder: ``config.json`` + optional
``model.safetensors``; the export writes the same layout with the category names, which the server's
``object-detection`` kind loads). Only ``method: full`` applies (LoRA targets transformer layers).

A batch is padded tensors (``images`` [B, 3, H, W], ``sizes`` [B, 2], ``boxes`` [B, N, 4] xyxy pixels,
``labels`` [B, N], -1 where a row has fewer boxes); ``forward`` unpads them into torchvision's lists.

The loss is the sum of FCOS's loss terms (focal classification, GIoU box regression, centre-ness), which
torchvision computes only in training mode. On evaluation batches ``forward`` computes it in training mode
with every BatchNorm layer held in evaluation mode (the default detector has none; the ResNet backbones use
frozen BatchNorm) and without gradients, so the evaluation loss is the training objective on held-out images
and changes nothing; the detections come from a second pass in evaluation mode. mAP, mAP@0.5 and mAP@0.75
(COCO's definitions, ``torchmetrics`` with the pycocotools backend) come from per-image records gathered
from every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data.config import ImageAugmentationConfig
from finetune_trainer.data.detection import DetectionExample
from finetune_trainer.modeling import ModelError, resolve_model_location
from finetune_trainer.tasks.base import Batch, Exported
from finetune_trainer.tasks.detector import (
    DetectorFolderError,
    build_detector,
    load_weights,
    read_spec,
    save_detector,
)

log = logging.getLogger(__name__)

#: Validation images whose detections go into the report and the model card.
SAMPLE_IMAGES = 4
#: Detections drawn per sample image (the highest-scored ones at or above SAMPLE_SCORE).
SAMPLE_DETECTIONS = 10
SAMPLE_SCORE = 0.3
SAMPLES_PLOT = "sample_detections.png"
#: Pixels of the longer side of each image in the sample plot.
PLOT_SIDE = 256


def load_image(path: str) -> torch.Tensor:
    """An image file as a float RGB tensor in [0, 1], [3, H, W]."""
    from PIL import Image
    from torchvision.transforms.v2 import functional

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    pixels: torch.Tensor = functional.to_dtype(functional.to_image(rgb), torch.float32, scale=True)
    return pixels


def augmented(
    example: DetectionExample, cfg: ImageAugmentationConfig, *, seed: int, epoch: int
) -> tuple[torch.Tensor, DetectionExample]:
    """A training image and its boxes through ``data.augmentation.image`` (box-aware: boxes move with the
    pixels; boxes the crop or rotation made degenerate are dropped with their labels)."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional

    from finetune_trainer.data.image_augmentation import augment

    image = load_image(example["image"])
    sample = {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(example["boxes"], dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(image.shape[1], image.shape[2]),
        ),
        "labels": torch.tensor(example["labels"], dtype=torch.long),
    }
    out = augment(sample, cfg, seed=seed, epoch=epoch, index=example["index"])
    pixels: torch.Tensor = functional.to_dtype(
        out["image"].as_subclass(torch.Tensor), torch.float32, scale=True
    )
    moved = {**example, "boxes": out["boxes"].tolist(), "labels": out["labels"].tolist()}
    return pixels, moved


def collate_detection(
    examples: Sequence[DetectionExample],
    device: torch.device,
    augmentation: ImageAugmentationConfig | None = None,
    *,
    seed: int = 0,
    epoch: int = 0,
) -> Batch:
    """Padded tensors of a batch; training examples go through ``augmentation`` when it is set."""
    images = []
    prepared = []
    for example in examples:
        if augmentation is not None and example.get("split") == "train":
            image, example = augmented(example, augmentation, seed=seed, epoch=epoch)
        else:
            image = load_image(example["image"])
        images.append(image)
        prepared.append(example)
    examples = prepared
    height = max(i.shape[1] for i in images)
    width = max(i.shape[2] for i in images)
    most = max(1, max(len(e["boxes"]) for e in examples))
    pixels = torch.zeros((len(images), 3, height, width))
    sizes = torch.zeros((len(images), 2), dtype=torch.long)
    boxes = torch.zeros((len(images), most, 4))
    labels = torch.full((len(images), most), -1, dtype=torch.long)
    for row, (image, example) in enumerate(zip(images, examples, strict=True)):
        pixels[row, :, : image.shape[1], : image.shape[2]] = image
        sizes[row] = torch.tensor(image.shape[1:])
        n = len(example["boxes"])
        if n:
            boxes[row, :n] = torch.tensor(example["boxes"], dtype=torch.float32)
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    batch = {"images": pixels, "sizes": sizes, "boxes": boxes, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def unpack(batch: Batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """torchvision's inputs: the images at their own sizes and one target dict per image."""
    images, targets = [], []
    for row in range(batch["images"].shape[0]):
        h, w = (int(v) for v in batch["sizes"][row])
        images.append(batch["images"][row, :, :h, :w])
        keep = batch["labels"][row] >= 0
        targets.append({"boxes": batch["boxes"][row][keep], "labels": batch["labels"][row][keep]})
    return images, targets


@contextlib.contextmanager
def training_mode_without_statistics(module: nn.Module) -> Iterator[None]:
    """Training mode (so the detector returns its losses) with every BatchNorm layer kept in evaluation
    mode (so no running statistics move); the module's modes are restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.train(True)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def mean_average_precision(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """COCO mAP (IoU 0.5:0.95), mAP@0.5 and mAP@0.75 over per-image records; -1 when the records hold no
    ground-truth box (COCO's convention for an undefined precision)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    preds, targets = [], []
    for r in records:
        preds.append(
            {
                "boxes": torch.as_tensor(np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4)),
                "scores": torch.as_tensor(np.asarray(r["scores"], dtype=np.float32)),
                "labels": torch.as_tensor(np.asarray(r["labels"], dtype=np.int64)),
            }
        )
        targets.append(
            {
                "boxes": torch.as_tensor(np.asarray(r["gt_boxes"], dtype=np.float32).reshape(-1, 4)),
                "labels": torch.as_tensor(np.asarray(r["gt_labels"], dtype=np.int64)),
            }
        )
    if not preds:
        return {"map": -1.0, "map50": -1.0, "map75": -1.0}
    metric.update(preds, targets)
    result = metric.compute()
    return {"map": float(result["map"]), "map50": float(result["map_50"]), "map75": float(result["map_75"])}


class ObjectDetection:
    name: ClassVar[str] = "object-detection"
    unit: ClassVar[str] = "images"

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.categories: list[str] = []
        self.epoch = 0
        location, _ = resolve_model_location(cfg.model)
        if cfg.model.path.startswith("hf://"):
            raise ConfigError(
                f"model.path {cfg.model.path!r}: object-detection starts from a local detector folder "
                "(config.json + optional model.safetensors), not a Hub model"
            )
        self.model_dir = Path(location)

    # ---------------------------------------------------------------------------------------- set-up
    def load_processor(self) -> Any:
        """The detector's spec (its config.json): images are resized and normalised inside the model."""
        try:
            self.spec = read_spec(self.model_dir)
        except DetectorFolderError as exc:
            raise ModelError(f"model.path {self.cfg.model.path!r}: {exc}") from exc
        return self.spec

    def prepare(self, processor: Any, workdir: Path, *, store: Path, attempt: str, wait: bool) -> Any:
        # Rank 0 reads the annotations and opens each image once; the other ranks read its published result.
        from finetune_trainer.data.detection import prepare_detection

        data = prepare_detection(
            self.cfg.data,
            workdir,
            model_license=self.cfg.model.license,
            store=store,
            attempt=attempt,
            wait=wait,
        )
        self.categories = data.category_names
        return data

    def load_model(self, prepared: Any, device: torch.device, ds_config: dict[str, Any] | None) -> nn.Module:
        categories = list(prepared.category_names)
        model = build_detector(self.spec, len(categories))
        same = self.spec.categories == categories
        try:
            fresh = load_weights(model, self.model_dir, same_categories=same)
        except DetectorFolderError as exc:
            raise ModelError(f"model.path {self.cfg.model.path!r}: {exc}") from exc
        if fresh and len(fresh) == len(list(model.parameters())):
            log.info("object detector: no weights in %s, trained from random initialisation", self.model_dir)
        elif fresh:
            log.info(
                "object detector: classification layer re-initialised for categories %s (the base model "
                "had %s)",
                categories,
                self.spec.categories,
            )
        self.categories = categories
        return model.to(device)

    # ------------------------------------------------------------------------------------- the loop
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next training batches belong to (their augmentation draws depend on it)."""
        self.epoch = epoch

    def collate(self, examples: Sequence[DetectionExample], device: torch.device) -> Batch:
        return collate_detection(
            examples,
            device,
            self.cfg.data.augmentation.image,
            seed=self.cfg.data.augmentation.seed,
            epoch=self.epoch,
        )

    def forward(self, module: nn.Module, batch: Batch) -> dict[str, Any]:
        images, targets = unpack(batch)
        if module.training:
            return {"losses": module(images, targets)}
        with training_mode_without_statistics(module):
            losses = module(images, targets)
        return {"losses": losses, "detections": module(images)}

    def loss(self, outputs: dict[str, Any], batch: Batch) -> torch.Tensor:
        losses: dict[str, torch.Tensor] = outputs["losses"]
        return torch.stack([value.float() for value in losses.values()]).sum()

    @staticmethod
    def units(examples: Sequence[DetectionExample]) -> int:
        return len(examples)

    @staticmethod
    def fingerprint(examples: Sequence[DetectionExample]) -> str:
        digest = hashlib.sha256()
        for example in examples:
            digest.update(json.dumps([example["image"], example["boxes"], example["labels"]]).encode())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------------------------- evaluation
    def eval_sums(self, outputs: dict[str, Any], batch: Batch) -> dict[str, float]:
        images = float(batch["images"].shape[0])
        return {"loss_sum": float(self.loss(outputs, batch)) * images, "images": images}

    def eval_records(self, outputs: dict[str, Any], batch: Batch) -> list[Any]:
        """Per image: its detections and its ground truth as small arrays (float32 boxes, int16 labels)."""
        _, targets = unpack(batch)
        records = []
        for detected, target in zip(outputs["detections"], targets, strict=True):
            records.append(
                {
                    "boxes": detected["boxes"].detach().float().cpu().numpy(),
                    "scores": detected["scores"].detach().float().cpu().numpy(),
                    "labels": detected["labels"].detach().cpu().numpy().astype(np.int16),
                    "gt_boxes": target["boxes"].detach().float().cpu().numpy(),
                    "gt_labels": target["labels"].detach().cpu().numpy().astype(np.int16),
                }
            )
        return records

    def final_metrics(self, sums: Mapping[str, float], records: Sequence[Any]) -> dict[str, float]:
        """loss (mean over images of the batch losses), mAP, mAP@0.5, mAP@0.75."""
        loss = sums["loss_sum"] / max(sums["images"], 1.0)
        return {"loss": loss, **mean_average_precision(records)}

    # --------------------------------------------------------------------------------------- finish
    def samples(
        self, module: nn.Module, prepared: Any, device: torch.device, synced: bool
    ) -> list[dict[str, Any]]:
        """The detections on the first validation images (the highest-scored, at or above SAMPLE_SCORE)."""
        examples = list(prepared.validation[:SAMPLE_IMAGES])
        if not examples:
            return []
        images, _ = unpack(collate_detection(examples, device))
        outputs = module(images)
        out = []
        for example, detected in zip(examples, outputs, strict=True):
            keep = detected["scores"] >= SAMPLE_SCORE
            order = detected["scores"][keep].argsort(descending=True)[:SAMPLE_DETECTIONS]
            out.append(
                {
                    "image": example["image"],
                    "boxes": [[round(v, 1) for v in b] for b in detected["boxes"][keep][order].tolist()],
                    "labels": [self.categories[i] for i in detected["labels"][keep][order].tolist()],
                    "scores": [round(s, 3) for s in detected["scores"][keep][order].tolist()],
                    "truth": {
                        "boxes": example["boxes"],
                        "labels": [self.categories[i] for i in example["labels"]],
                    },
                }
            )
        return out

    def export(
        self, module: nn.Module, state_dict: dict[str, torch.Tensor], out: Path, prepared: Any
    ) -> Exported:
        model_dir = out / "model"
        spec = self.spec.model_copy(update={"categories": list(prepared.category_names)})
        save_detector(model_dir, spec, state_dict)
        return Exported(model_dir, "full")  # every weight of the detector (torch state dict)

    def card_section(self, metrics: Mapping[str, Any], out: Path) -> str:
        lines = [
            f"A torchvision {self.spec.architecture.upper()} detector (backbone `{self.spec.backbone}`, "
            f"images resized to {self.spec.min_size}-{self.spec.max_size} px) for "
            f"{len(self.categories)} categories: {', '.join(f'`{c}`' for c in self.categories)}.",
            "",
            "mAP is COCO's mean average precision over IoU 0.5:0.95; mAP@0.5 and mAP@0.75 at one IoU "
            "(pycocotools). The loss is the sum of FCOS's classification, box and centre-ness losses, "
            "computed on held-out images without updating any statistics.",
            "",
        ]
        samples = metrics.get("samples") or []
        if samples:
            draw_samples(samples, out / SAMPLES_PLOT)
            lines += [
                "## Sample detections",
                "",
                f"Validation images with the exported model's detections (score >= {SAMPLE_SCORE}, red, "
                "with category and score) and the annotated boxes (green).",
                "",
                f"![sample detections]({SAMPLES_PLOT})",
                "",
            ]
        return "\n".join(lines)


def draw_samples(samples: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The sample images side by side, annotated boxes in green and detections in red, as a PNG."""
    from PIL import Image, ImageDraw

    tiles = []
    for sample in samples:
        with Image.open(sample["image"]) as image:
            rgb = image.convert("RGB")
        scale = PLOT_SIDE / max(rgb.size)
        tile = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))))
        draw = ImageDraw.Draw(tile)
        for box in sample["truth"]["boxes"]:
            draw.rectangle([v * scale for v in box], outline=(0, 220, 0), width=2)
        for box, label, score in zip(sample["boxes"], sample["labels"], sample["scores"], strict=True):
            corners = [v * scale for v in box]
            draw.rectangle(corners, outline=(230, 0, 0), width=2)
            draw.text((corners[0] + 2, corners[1] + 1), f"{label} {score:.2f}", fill=(255, 255, 0))
        tiles.append(tile)
    canvas = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
