"""Interactions with planted structure, made by the tests (nothing downloaded).

Users and items each belong to one of ``clusters`` groups; a user's interactions pick an item group from a
preference matrix (``affinity`` on the user's own group, the rest spread evenly) and, within the group, an
item with Zipf-like popularity. A model that learns the groups ranks a user's next item far better than
global popularity, which knows nothing of the user.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np


def make_interactions(
    path: Path,
    *,
    users: int = 240,
    items: int = 120,
    clusters: int = 6,
    affinity: float = 0.9,
    per_user: tuple[int, int] = (6, 14),
    seed: int = 0,
) -> Path:
    """A CSV ``user,item,rating,timestamp`` (rows shuffled, so order is not time); returns ``path``."""
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, clusters, size=users)
    item_group = np.arange(items) % clusters
    preference = np.full((clusters, clusters), (1.0 - affinity) / (clusters - 1))
    np.fill_diagonal(preference, affinity)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.7
    rows = []
    for u in range(users):
        count = min(int(rng.integers(per_user[0], per_user[1] + 1)), items)
        chosen: list[int] = []
        while len(chosen) < count:
            group = rng.choice(clusters, p=preference[user_group[u]])
            members = np.flatnonzero(item_group == group)
            weights = popularity[members] / popularity[members].sum()
            item = int(rng.choice(members, p=weights))
            if item not in chosen:
                chosen.append(item)
        times = np.sort(rng.uniform(1.6e9, 1.7e9, size=count))
        for item, t in zip(chosen, times, strict=True):
            rows.append((f"u{u}", f"i{item}", int(rng.integers(1, 6)), f"{t:.0f}"))
    order = rng.permutation(len(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "item", "rating", "timestamp"])
        writer.writerows(rows[i] for i in order)
    return path


def make_model_definition(directory: Path, **definition: object) -> Path:
    """A recommender "base model": the folder with its recommender.json."""
    directory.mkdir(parents=True, exist_ok=True)
    body = {"architecture": "matrix-factorization", "embeddingDim": 32, "loss": "bpr", **definition}
    (directory / "recommender.json").write_text(json.dumps(body), encoding="utf-8")
    return directory


def recommendation_config(tmp: Path, model_dir: Path, data: Path) -> dict[str, Any]:
    """The trainer config of a worker run on ``make_interactions`` data (10 epochs, uniform negatives)."""
    from trainer_fixtures import make_config

    config = make_config(tmp, model_dir, data)
    config["task"] = "recommendation"
    config["data"] = {
        "source": str(data),
        "fields": {"kind": "interactions", "rating": "rating", "timestamp": "timestamp"},
        "augmentation": {"negatives": {"strategy": "uniform", "count": 4}},
    }
    config["hyperparameters"] = {"epochs": 10, "microBatchSize": 128, "learningRate": 0.05, "warmupSteps": 0}
    config["evaluation"] = {"everyEpoch": True, "batchSize": 64, "metrics": ["loss", "recall", "ndcg"]}
    config["checkpointing"] = {"dir": str(tmp / "ckpt"), "saveOnEpochEnd": True, "keepLast": 1}
    return config
