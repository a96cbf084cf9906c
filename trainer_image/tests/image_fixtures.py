"""Real image data and a tiny image classifier for the image tests: scikit-learn's handwritten digits
(1797 8x8 greyscale scans shipped with the package) written out as PNG files, one folder per digit, and a
randomly initialised small ResNet with a ViT-style image processor (32x32, no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainer_fixtures import make_config, merge_overrides


def write_digits(root: Path, *, limit: int | None = None) -> Path:
    """``root/<digit>/<n>.png`` for every digit image (greyscale 'L', 0-16 scaled to 0-255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images[:limit] if limit else digits.images
    for n, (pixels, label) in enumerate(zip(images, digits.target, strict=False)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L").save(folder / f"{n:04d}.png")
    return root


def make_tiny_image_model(directory: Path, *, num_labels: int = 10, seed: int = 0) -> Path:
    """A ResNet of two basic stages (about 30k parameters), random weights, with its image processor."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
    )
    ResNetForImageClassification(config).save_pretrained(str(directory))
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(str(directory))
    return directory


def image_config(tmp: Path, model: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    config = make_config(tmp, model, data)
    config["task"] = "image-classification"
    config["data"] = {
        "source": str(data),
        "format": "image-folder",
        "fields": {"kind": "image-classification"},
        "split": {"validation": 0.15, "test": 0.15, "seed": 3},
        "augmentation": {"image": {"rotationDegrees": 10.0}},
    }
    config["hyperparameters"] = {
        **config["hyperparameters"],
        "epochs": 3,
        "microBatchSize": 32,
        "warmupSteps": 5,
    }
    config["evaluation"] = {
        "everySteps": 0,
        "everyEpoch": True,
        "batchSize": 64,
        "metrics": ["loss", "accuracy", "f1"],
    }
    config["checkpointing"] = {**config["checkpointing"], "everySteps": 0, "saveOnEpochEnd": True}
    return merge_overrides(config, overrides)
