"""Synthetic object-detection data made by the tests: coloured squares, circles and triangles on noise, with
a COCO annotation file, and a randomly initialised detector folder (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("square", "circle", "triangle")

KIND = {"kind": "object-detection"}


def draw_shapes(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple[list[int], int]]]:
    """One image with 1-3 shapes and their [x, y, w, h] boxes with category indices."""
    pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, len(CATEGORIES)))
        side = int(rng.integers(size // 7, size // 3))
        x, y = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
        colour = tuple(int(v) for v in rng.integers(80, 256, 3))
        if kind == 0:
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=colour)
        elif kind == 1:
            draw.ellipse([x, y, x + side - 1, y + side - 1], fill=colour)
        else:
            draw.polygon([(x, y + side - 1), (x + side - 1, y + side - 1), (x + side / 2, y)], fill=colour)
        objects.append(([x, y, side, side], kind))
    return image, objects


def make_shapes_coco(root: Path, images: int, *, seed: int = 0, size: int = 96) -> Path:
    """``root/images/*.png`` and ``root/annotations.json`` (COCO; category ids start at 1)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)],
    }
    for index in range(images):
        image, objects = draw_shapes(rng, size)
        name = f"images/{index:04d}.png"
        image.save(root / name)
        document["images"].append({"id": index, "file_name": name, "width": size, "height": size})
        for bbox, kind in objects:
            document["annotations"].append(
                {
                    "id": len(document["annotations"]) + 1,
                    "image_id": index,
                    "bbox": bbox,
                    "category_id": kind + 1,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    path = root / "annotations.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def make_detector_folder(directory: Path, **spec: Any) -> Path:
    """A detector folder with only its config.json: the task trains it from random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"architecture": "fcos", "backbone": "tiny", **spec}), encoding="utf-8"
    )
    return directory


def detection_config(tmp: Path, model: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    """A trainer config for ``make_shapes_coco`` data (a validation split only); ``overrides`` per section."""
    from trainer_fixtures import make_config

    config = make_config(tmp, model, data, task="object-detection", **overrides)
    config["data"] = {"source": str(data), "fields": KIND, "split": {"validation": 0.15, "seed": 1}}
    return config


def trained_detection_config(tmp: Path, model: Path, data: Path) -> dict[str, Any]:
    """The run that learns the shapes: 4 epochs of FCOS from random weights (about 2 minutes on a CPU)."""
    return detection_config(
        tmp,
        model,
        data,
        hyperparameters={
            "epochs": 4,
            "microBatchSize": 8,
            "learningRate": 3e-3,
            "lrScheduler": "constant",
            "warmupSteps": 0,
            "maxGradNorm": 5.0,
        },
        evaluation={"everySteps": 0, "everyEpoch": False, "batchSize": 16},
        checkpointing={"dir": str(tmp / "ckpt"), "everySteps": 0, "saveOnEpochEnd": True},
        # From random weights FCOS's start depends on the seed: with seed 7 this detector sat at mAP@0.5
        # ~0.12 for 6 epochs, with seeds 1 and 2 it passed 0.4 in 4 (docs/object-detection.md).
        seed=1,
    )
