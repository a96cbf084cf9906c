"""Random image transforms of training images (``data.augmentation.image``), box-aware and seeded.

One function serves image classification and object detection: :func:`augment` takes an image, or a dict
with an ``image`` and any of ``boxes`` (``tv_tensors.BoundingBoxes``), ``labels`` and ``masks``
(``tv_tensors.Mask``, one per box), and transforms them all with the same random parameters (torchvision's
``transforms.v2`` moves boxes and masks with the pixels). With boxes, boxes that the crop or rotation made
degenerate (under one pixel wide or tall, or off the canvas) are removed together with their labels and
masks (``SanitizeBoundingBoxes``); the survivors are clamped to the canvas.

The transforms, in order (each only when configured):

- ``randomResizedCrop``: a crop of 8 to 100 percent of the area (aspect 3/4 to 4/3), resized back to the
  image's own size (the model's processor resizes later);
- ``horizontalFlip``: left-right with probability 0.5;
- ``rotationDegrees``: a rotation by an angle uniform in [-d, d], same canvas, black corners; a box becomes
  the axis-aligned box around its rotated corners (it still encloses its object);
- ``colorJitter`` s: brightness, contrast and saturation by a factor in [1 - s, 1 + s], hue by up to s/4;
- ``randomErasing`` p: with probability p, one rectangle (2 to 33 percent of the area) set to black.

Deterministic: the randomness comes from ``seed``, ``epoch`` and ``index`` alone (a private generator state
for the call, restored afterwards), so the same three give the same output on any rank and after a resume,
and two examples or two epochs get different draws. Only the training split is augmented (the caller's
rule: validation and test images go through unchanged).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, TypeVar

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from finetune_trainer.data.config import ImageAugmentationConfig

__all__ = ["augment", "augmentation_seed", "build_transforms"]

#: The crop's share of the image area and its aspect-ratio range (torchvision's ImageNet defaults).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: Hue moves by at most this fraction of the colour-jitter strength (hue is a turn of the colour wheel:
#: a full strength of 1 would make any colour any other).
HUE_SHARE = 0.25
#: The erased rectangle's share of the area (torchvision's defaults).
ERASE_SCALE = (0.02, 0.33)

Sample = TypeVar("Sample")


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one example in one epoch, independent between (seed, epoch, index) triples."""
    digest = hashlib.sha256(f"image-augmentation:{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def build_transforms(
    cfg: ImageAugmentationConfig, size: tuple[int, int], *, boxes: bool = False
) -> v2.Compose | None:
    """The configured pipeline for images of ``size`` (height, width); None when nothing is switched on.
    With ``boxes`` it ends by clamping boxes to the canvas and removing degenerate ones."""
    steps: list[v2.Transform] = []
    if cfg.random_resized_crop:
        steps.append(v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True))
    if cfg.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if cfg.rotation_degrees:
        steps.append(v2.RandomRotation(cfg.rotation_degrees))
    if cfg.color_jitter:
        strength = cfg.color_jitter
        steps.append(
            v2.ColorJitter(
                brightness=strength, contrast=strength, saturation=strength, hue=strength * HUE_SHARE
            )
        )
    if cfg.random_erasing:
        steps.append(v2.RandomErasing(p=cfg.random_erasing, scale=ERASE_SCALE, value=0))
    if not steps:
        return None
    if boxes:
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)


def _image_of(sample: Any) -> Any:
    return sample["image"] if isinstance(sample, dict) else sample


def _size(image: Any) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    raise TypeError(f"cannot augment an image of type {type(image).__name__} (a PIL image or a tensor)")


def augment(sample: Sample, cfg: ImageAugmentationConfig, *, seed: int, epoch: int, index: int) -> Sample:
    """``sample`` transformed with the draws of (seed, epoch, index); see the module docstring.

    A PIL image comes back as a ``tv_tensors.Image`` (uint8, channels first) when any transform ran, so
    every augmented image has one type; with nothing configured the sample is returned as it is."""
    image = _image_of(sample)
    with_boxes = isinstance(sample, dict) and isinstance(sample.get("boxes"), tv_tensors.BoundingBoxes)
    transforms = build_transforms(cfg, _size(image), boxes=with_boxes)
    if transforms is None:
        return sample
    if isinstance(image, Image.Image):
        converted = v2.functional.pil_to_tensor(image)
        image = tv_tensors.Image(converted)
        sample = {**sample, "image": image} if isinstance(sample, dict) else image  # type: ignore[assignment]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Erasing hides pixels and leaves boxes and masks where they are, as intended: not worth a warning.
        warnings.filterwarnings("ignore", message=r"RandomErasing\(\) is currently passing through")
        torch.manual_seed(augmentation_seed(seed, epoch, index))
        result: Sample = transforms(sample)
    return result
