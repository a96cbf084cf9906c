"""Recommendation (task ``recommendation``): the top-k items for a user, from the trainer's embeddings.

:func:`load_recommender` is the artifact's scoring entry point (its serving.json names it): it reads
``embeddings.safetensors`` (``users``, ``items``; the item bias is folded in, so a user's scores are
``items @ users[u]``), ``id_maps.json`` and ``seen.safetensors`` (each user's training items and the train
popularity) with numpy only. :meth:`Recommender.top_k` ranks every item, leaving out the user's training items
unless asked not to. :class:`RecommenderModel` serves it behind the common load path (manifest check,
readiness) and ``POST /v1/recommend`` (``finetune_server.protocol.recommend``). Embedding tables are not
quantised or pruned: a compression method in the config is refused, naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finetune_server.artifact import read_artifact
from finetune_server.config import ConfigError
from finetune_server.errors import ArtifactError, InvalidInputError
from finetune_server.models.base import LoadedModel

EMBEDDINGS_FILE = "embeddings.safetensors"
ID_MAPS_FILE = "id_maps.json"
SEEN_FILE = "seen.safetensors"


@dataclass(frozen=True)
class Recommendation:
    item: str
    score: float


class UnknownUserError(KeyError):
    """The user id is not in the artifact's id map (the model has no vector for it)."""


class Recommender:
    """Scores every item for a user by a dot product of the exported vectors."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        user_ids: list[str],
        item_ids: list[str],
        seen_indptr: np.ndarray,
        seen_items: np.ndarray,
        popularity: np.ndarray,
    ) -> None:
        if users.shape[0] != len(user_ids) or items.shape[0] != len(item_ids):
            raise ArtifactError(
                f"{EMBEDDINGS_FILE} has {users.shape[0]} users and {items.shape[0]} items, {ID_MAPS_FILE} "
                f"{len(user_ids)} and {len(item_ids)}"
            )
        self.users, self.items = users, items
        self.user_ids, self.item_ids = user_ids, item_ids
        self.user_index = {user: i for i, user in enumerate(user_ids)}
        self.seen_indptr, self.seen_items, self.popularity = seen_indptr, seen_items, popularity

    def index_of(self, user: str) -> int:
        try:
            return self.user_index[user]
        except KeyError:
            raise UnknownUserError(user) from None

    def seen(self, user: str) -> list[str]:
        """The user's items in the data the model was trained on (every split), which ``top_k`` leaves out."""
        u = self.index_of(user)
        return [self.item_ids[i] for i in self.seen_items[self.seen_indptr[u] : self.seen_indptr[u + 1]]]

    def top_k(self, user: str, k: int, *, exclude_seen: bool = True) -> list[Recommendation]:
        """The ``k`` best items for ``user`` (ties: the lower item index first); raises
        :class:`UnknownUserError` for a user the model was not trained with."""
        u = self.index_of(user)
        scores = self.items @ self.users[u]
        if exclude_seen:
            scores = scores.copy()
            scores[self.seen_items[self.seen_indptr[u] : self.seen_indptr[u + 1]]] = -np.inf
        k = min(k, len(scores))
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            Recommendation(self.item_ids[i], float(scores[i]))
            for i in order.tolist()
            if np.isfinite(scores[i])
        ]


def load_recommender(directory: Path | str) -> Recommender:
    """The scoring entry point: the recommender in an artifact folder (``model/`` of a recommendation job)."""
    from safetensors.numpy import load_file

    folder = Path(directory)
    for name in (EMBEDDINGS_FILE, ID_MAPS_FILE, SEEN_FILE):
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder} has no {name}: not a recommendation artifact")
    tables = load_file(str(folder / EMBEDDINGS_FILE))
    seen = load_file(str(folder / SEEN_FILE))
    ids = json.loads((folder / ID_MAPS_FILE).read_text(encoding="utf-8"))
    return Recommender(
        tables["users"].astype(np.float32),
        tables["items"].astype(np.float32),
        [str(u) for u in ids["users"]],
        [str(i) for i in ids["items"]],
        seen["indptr"],
        seen["items"],
        seen["popularity"],
    )


class RecommenderModel(LoadedModel):
    task: ClassVar[str] = "recommendation"
    auto_class: ClassVar[str] = ""
    causal: ClassVar[bool] = False

    def _load(self) -> None:
        config = self.config
        if config.quantization.method != "none" or config.pruning.method != "none":
            raise ConfigError(
                f"quantization.method {config.quantization.method!r}, "
                f"pruning.method {config.pruning.method!r}: "
                "a recommender's embedding tables are served as trained; use none"
            )
        self.status.device = "cpu"
        self.artifact = read_artifact(
            config.model_dir, task=config.task or self.task, verify=config.verify_manifest
        )
        self.recommender = load_recommender(config.model_dir)
        self.default_k = int(self.artifact.serving.get("topK") or 10)
        size = sum((config.model_dir / name).stat().st_size for name in (EMBEDDINGS_FILE, SEEN_FILE))
        self.status.size_bytes = self.status.original_size_bytes = size
        self.backend = self.recommender

    def recommend(self, user: str, k: int | None, exclude_seen: bool, index: int) -> list[Recommendation]:
        self.require_ready()
        try:
            return self.recommender.top_k(user, k or self.default_k, exclude_seen=exclude_seen)
        except UnknownUserError:
            raise InvalidInputError(
                f"users[{index}]: {user!r} is not a user this model was trained with", param=f"users[{index}]"
            ) from None

    def run_batch(self, batch: list[Any]) -> None:
        """Each work item is (user, k, exclude_seen, index); scoring is one matrix-vector product each."""
        for work in batch:
            user, k, exclude_seen, index = work.payload
            try:
                work.finish(self.recommend(user, k, exclude_seen, index))
            except InvalidInputError as exc:
                work.fail(exc)
