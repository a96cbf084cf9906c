"""The detector the object-detection task trains and the server serves: a torchvision FCOS described by a
model folder's ``config.json``, with its weights in ``model.safetensors``.

One folder layout is both the base model the task starts from (``model.path``) and the artifact it exports,
so a trained detector can be fine-tuned again::

    config.json         DetectorSpec: architecture, backbone, sizes, thresholds, category names (once trained)
    model.safetensors   the detector's state dict (absent: random initialisation)

Why FCOS with a small GroupNorm backbone by default: it is single-stage and anchor-free, so its loss has no
random proposal sampling (an evaluation loss consumes no random numbers and is reproducible), and it has no
BatchNorm (GroupNorm in the head and in the ``tiny`` backbone, frozen BatchNorm in the ResNet backbones), so
computing the loss in training mode changes no statistics. From random weights the ``tiny`` backbone learns
synthetic shapes on a CPU in a minute; DETR-style models need hundreds of epochs to converge, and Faster
R-CNN's sampled proposals make its loss random. Nothing is downloaded: ResNet backbones start from random
weights or from a trained detector's ``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: The classification layer of the FCOS head: re-initialised when the categories change.
CLASSIFIER_PREFIX = "head.classification_head.cls_logits."

#: torchvision's resnet_fpn_backbone always builds a 256-channel pyramid.
RESNET_FPN_CHANNELS = 256

Backbone = Literal["tiny", "resnet18", "resnet34", "resnet50"]


class DetectorSpec(BaseModel):
    """``config.json`` of a detector folder (camelCase keys; unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel, frozen=True)

    architecture: Literal["fcos"] = Field(default="fcos", description="torchvision detection architecture.")
    backbone: Backbone = Field(
        default="tiny",
        description="'tiny' (a small GroupNorm CNN, fast on CPU) or a torchvision ResNet with frozen "
        "BatchNorm and an FPN.",
    )
    widths: tuple[int, int, int, int] = Field(
        default=(16, 32, 48, 64), description="Channels of the tiny backbone's four stages."
    )
    fpn_channels: Annotated[int, Field(ge=8)] = Field(
        default=32, description="Channels of the tiny backbone's feature pyramid (ResNets: 256)."
    )
    head_convs: Annotated[int, Field(ge=1, le=8)] = Field(
        default=2, description="Convolutions in each branch of the FCOS head."
    )
    min_size: Annotated[int, Field(ge=16)] = Field(
        default=96, description="Images are resized so that their shorter side is minSize..."
    )
    max_size: Annotated[int, Field(ge=16)] = Field(
        default=96, description="...unless their longer side would pass maxSize."
    )
    score_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.05, description="Detections below this score are dropped (low: mAP ranks them all)."
    )
    nms_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.6, description="IoU above which non-maximum suppression drops the lower-scored box."
    )
    detections_per_image: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=100, description="The most detections kept per image."
    )
    categories: list[str] | None = Field(
        default=None, description="Category names in class-id order (written when a detector is trained)."
    )


class DetectorFolderError(ValueError):
    """The folder is not a detector this module can build (the message names the file and the key)."""


def read_spec(folder: Path) -> DetectorSpec:
    path = folder / CONFIG_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DetectorFolderError(f"{path}: no readable detector config ({exc})") from exc
    if isinstance(document, dict) and "model_type" in document:
        raise DetectorFolderError(
            f"{path}: a transformers model (model_type {document['model_type']!r}); object-detection "
            "trains torchvision detectors described by a config.json with 'architecture' (fcos) and "
            "'backbone' (docs/object-detection.md)"
        )
    try:
        return DetectorSpec.model_validate(document)
    except ValidationError as exc:
        raise DetectorFolderError(f"{path}: {exc}") from exc


class TinyBackbone(nn.Module):
    """A stride-2 stem and four stride-2 stages of GroupNorm convolutions; an FPN over strides 8, 16, 32."""

    def __init__(self, widths: tuple[int, int, int, int], fpn_channels: int) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        super().__init__()
        w0, w1, w2, w3 = widths

        def stage(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, 2, 1, bias=False),
                nn.GroupNorm(_groups(outputs), outputs),
                nn.ReLU(inplace=True),
                nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
                nn.GroupNorm(_groups(outputs), outputs),
                nn.ReLU(inplace=True),
            )

        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.GroupNorm(_groups(w0), w0), nn.ReLU(inplace=True)
        )
        self.stages = nn.ModuleList([stage(w0, w1), stage(w1, w2), stage(w2, w3), stage(w3, w3)])
        self.fpn = FeaturePyramidNetwork([w2, w3, w3], fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features[1:])))  # type: ignore[no-any-return]


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def build_detector(spec: DetectorSpec, num_classes: int) -> nn.Module:
    """A randomly initialised detector for ``num_classes`` categories (seed the RNG first for determinism)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone: nn.Module
    if spec.backbone == "tiny":
        backbone = TinyBackbone(spec.widths, spec.fpn_channels)
        strides: tuple[int, ...] = (8, 16, 32)
    else:
        channels = RESNET_FPN_CHANNELS
        backbone = resnet_fpn_backbone(
            backbone_name=spec.backbone,
            weights=None,
            trainable_layers=5,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(channels, channels),
        )
        strides = (8, 16, 32, 64, 128)
    # FCOS assigns a box to the level whose range (4x to 8x the anchor size) holds its extent: anchor
    # size = the level's stride, as torchvision's own FCOS does.
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    channels_out: int = backbone.out_channels  # type: ignore[assignment]
    head = FCOSHead(channels_out, 1, num_classes, num_convs=spec.head_convs)
    detector: nn.Module = FCOS(
        backbone,
        num_classes=num_classes,
        min_size=spec.min_size,
        max_size=spec.max_size,
        anchor_generator=anchors,
        head=head,
        score_thresh=spec.score_threshold,
        nms_thresh=spec.nms_threshold,
        detections_per_img=spec.detections_per_image,
    )
    return detector


def load_weights(model: nn.Module, folder: Path, *, same_categories: bool) -> list[str]:
    """Load ``model.safetensors`` of ``folder`` into ``model`` when it is there; return the parameters left
    at their initialisation: the classification layer when the categories differ from the folder's (a new
    label set needs a new classifier), nothing otherwise. A shape mismatch elsewhere is an error."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        return [name for name, _ in model.named_parameters()]
    from safetensors.torch import load_file

    state = load_file(str(path))
    kept = (
        state if same_categories else {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    )
    try:
        missing, unexpected = model.load_state_dict(kept, strict=False)
    except RuntimeError as exc:
        raise DetectorFolderError(
            f"{path}: the weights do not fit the detector of {CONFIG_FILE}: {exc}"
        ) from exc
    if unexpected:
        raise DetectorFolderError(f"{path}: weights the detector does not have: {unexpected[:5]}")
    allowed = set() if same_categories else {k for k in state if k.startswith(CLASSIFIER_PREFIX)}
    surprising = [k for k in missing if k not in allowed]
    if surprising:
        raise DetectorFolderError(f"{path}: weights missing for {surprising[:5]}")
    return list(missing)


def save_detector(folder: Path, spec: DetectorSpec, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(
        json.dumps(spec.model_dump(mode="json", by_alias=True), indent=1) + "\n", encoding="utf-8"
    )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))


def load_trained_detector(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, list[str]]:
    """A trained detector folder (the task's artifact) → the model in eval mode and its category names."""
    spec = read_spec(folder)
    if not spec.categories:
        raise DetectorFolderError(f"{folder / CONFIG_FILE}: no 'categories' (not a trained detector)")
    if not (folder / WEIGHTS_FILE).is_file():
        raise DetectorFolderError(f"{folder}: no {WEIGHTS_FILE}")
    model = build_detector(spec, len(spec.categories))
    load_weights(model, folder, same_categories=True)
    model.eval()
    return model.to(device), list(spec.categories)


def detections_of(output: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One image's torchvision detection output as plain lists (boxes xyxy in pixels, label ids, scores)."""
    return {
        "boxes": [[round(float(v), 2) for v in box] for box in output["boxes"].tolist()],
        "labels": [int(v) for v in output["labels"].tolist()],
        "scores": [round(float(v), 4) for v in output["scores"].tolist()],
    }
