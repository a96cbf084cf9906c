"""Recommendation: user and item embeddings (matrix factorisation or a two-tower model) learnt from implicit
feedback with BPR or a sampled softmax over negatives, ranked over the whole catalogue.

The "base model" (``model.path``) is a model definition: a folder with ``recommender.json`` (or that file)::

    {"architecture": "matrix-factorization" | "two-tower", "embeddingDim": 64, "hiddenDims": [128],
     "loss": "bpr" | "sampled-softmax"}

Weights start from ``seed`` (users and items are the data's own). Training examples are interactions; each
gets ``data.augmentation.negatives.count`` negatives drawn from (``data.augmentation.seed``, epoch,
interaction) (:func:`finetune_trainer.data.interactions.sample_negatives`). Evaluation ranks every item the
user has not interacted with in training (at test time the validation item is left out too) and scores the
held-out item: recall@k, NDCG@k, hit-rate@k (k = ``evaluation.topK``), the AUC of the held-out item, and the
same for a popularity baseline (train-split counts) beside them, plus recall@1..K curves for the model card.
With one held-out item per user (leave-last-out), recall@k and hit-rate@k coincide. Every figure is a per-user
sum, so ranks add them up.

The artifact (``format: recommender``) holds ``embeddings.safetensors`` (``users`` and ``items``: a user's
scores are ``items @ users[u]``, the item bias folded in), ``id_maps.json``, the training items of each user
and the train popularity; ``finetune_server.models.recommender.load_recommender`` loads it and answers
top-k queries (the server's ``recommendation`` kind).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F  # noqa: N812

from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data.config import NegativeSamplingConfig
from finetune_trainer.data.interactions import PreparedInteractions, prepare_interactions, sample_negatives
from finetune_trainer.schema import ConfigSection
from finetune_trainer.tasks.base import Batch, Exported

#: The model definition's file name, in the base-model folder and in the artifact.
DEFINITION_FILE = "recommender.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
ID_MAPS_FILE = "id_maps.json"
SEEN_FILE = "seen.safetensors"
#: The recall@k curve runs to at least this k (and at least evaluation.topK), at most the catalogue size.
CURVE_MIN_K = 20
SAMPLE_USERS = 5
#: Negatives when data.augmentation.negatives is unset (as its description says).
DEFAULT_NEGATIVES = NegativeSamplingConfig()


class RecommenderDefinition(ConfigSection):
    """``recommender.json``: the architecture to train."""

    section_name = "recommender.json"

    architecture: Literal["matrix-factorization", "two-tower"] = Field(
        default="matrix-factorization",
        description="'matrix-factorization': user and item embeddings and an item bias; 'two-tower': each "
        "embedding through its own MLP (hiddenDims) before the dot product.",
    )
    embedding_dim: int = Field(default=64, ge=2, le=4096, description="Size of the user and item vectors.")
    hidden_dims: list[int] = Field(
        default_factory=lambda: [128], description="Hidden layer sizes of each tower (two-tower only)."
    )
    loss: Literal["bpr", "sampled-softmax"] = Field(
        default="bpr",
        description="'bpr': -log sigmoid(positive - negative), averaged over the negatives; "
        "'sampled-softmax': cross-entropy of the positive among itself and its negatives.",
    )
    init_std: float = Field(default=0.1, gt=0.0, description="Standard deviation of the initial embeddings.")


class TwoTower(nn.Module):
    """Scores ``user · item (+ item bias)``; with hidden layers each side goes through its own MLP."""

    def __init__(self, users: int, items: int, definition: RecommenderDefinition, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        dim = definition.embedding_dim
        self.user_embedding = nn.Embedding(users, dim)
        self.item_embedding = nn.Embedding(items, dim)
        self.item_bias = nn.Embedding(items, 1)
        with torch.no_grad():
            for table in (self.user_embedding, self.item_embedding):
                table.weight.copy_(torch.randn(table.weight.shape, generator=generator) * definition.init_std)
            self.item_bias.weight.zero_()
        towers = definition.architecture == "two-tower"
        self.user_tower = _mlp(dim, definition.hidden_dims, generator) if towers else nn.Identity()
        self.item_tower = _mlp(dim, definition.hidden_dims, generator) if towers else nn.Identity()

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        vectors: torch.Tensor = self.user_tower(self.user_embedding(users))
        return vectors

    def item_vectors(self, items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors, biases) of ``items``, or of every item."""
        if items is None:
            vectors, bias = self.item_tower(self.item_embedding.weight), self.item_bias.weight[:, 0]
        else:
            vectors, bias = self.item_tower(self.item_embedding(items)), self.item_bias(items)[..., 0]
        return vectors, bias

    def forward(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[batch, candidates]`` of ``items`` (``[batch, candidates]``), or of every item."""
        user = self.user_vectors(users)
        vectors, bias = self.item_vectors(items)
        if items is None:
            return user @ vectors.T + bias[None, :]
        return torch.einsum("bd,bcd->bc", user, vectors) + bias


def _mlp(dim: int, hidden: Sequence[int], generator: torch.Generator) -> nn.Module:
    layers: list[nn.Module] = []
    width = dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, dim))
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                layer.bias.zero_()
    return nn.Sequential(*layers)


def read_definition(path: str) -> RecommenderDefinition:
    """The model definition at ``model.path`` (a folder with recommender.json, or the file)."""
    if "://" in path and not path.startswith("file://"):
        raise ConfigError(
            f"model.path {path!r}: a recommendation model is defined by a local {DEFINITION_FILE} (a folder "
            "or the file); hub and remote models do not apply"
        )
    local = Path(path.removeprefix("file://"))
    file = local / DEFINITION_FILE if local.is_dir() else local
    if not file.is_file():
        raise ConfigError(f"model.path {path!r}: no {DEFINITION_FILE} there (the recommender's definition)")
    if (file.parent / EMBEDDINGS_FILE).exists():
        raise ConfigError(
            f"model.path {path!r} holds a trained recommender; starting from its weights is not supported "
            f"(point model.path at a folder with only {DEFINITION_FILE})"
        )
    try:
        return RecommenderDefinition.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError
        raise ConfigError(f"model.path {file}: {exc}") from exc


class Recommendation:
    name: ClassVar[str] = "recommendation"
    unit: ClassVar[str] = "interactions"

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        self.k = cfg.evaluation.top_k
        self.negatives = cfg.data.augmentation.negatives or DEFAULT_NEGATIVES
        self.epoch = 0
        self.prepared: PreparedInteractions | None = None
        self._popularity: torch.Tensor | None = None
        self._seen_keys: np.ndarray | None = None
        self.last_curves: dict[str, list[float]] = {}

    # ---------------------------------------------------------------------------------------- set-up
    def check_model_source(self) -> None:
        """The launcher's pre-flight check: the model definition exists and parses."""
        read_definition(self.cfg.model.path)

    def load_processor(self) -> RecommenderDefinition:
        self.definition = read_definition(self.cfg.model.path)
        return self.definition

    def prepare(
        self, processor: Any, workdir: Path, *, store: Path, attempt: str, wait: bool
    ) -> PreparedInteractions:
        prepared = prepare_interactions(
            self.cfg.data,
            workdir,
            model_license=self.cfg.model.license,
            store=store,
            attempt=attempt,
            wait=wait,
        )
        self._use(prepared)
        return prepared

    def _use(self, prepared: PreparedInteractions) -> None:
        self.prepared = prepared
        self._popularity = torch.as_tensor(prepared.item_counts, dtype=torch.float32)
        self._seen_keys = prepared.seen_keys()
        self.curve_k = min(max(self.k, CURVE_MIN_K), prepared.num_items)

    def load_model(self, prepared: Any, device: torch.device, ds_config: dict[str, Any] | None) -> nn.Module:
        if self.prepared is not prepared:
            self._use(prepared)
        definition = getattr(self, "definition", None) or self.load_processor()
        return TwoTower(prepared.num_users, prepared.num_items, definition, self.cfg.seed).to(device)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next training batches belong to (their negatives are drawn for it)."""
        self.epoch = epoch

    # ------------------------------------------------------------------------------------- the loop
    def collate(self, examples: Sequence[Any], device: torch.device) -> Batch:
        users = torch.tensor([e["user"] for e in examples], dtype=torch.long)
        items = torch.tensor([e["item"] for e in examples], dtype=torch.long)
        if "seen" not in examples[0]:  # training interactions: the positive first, then its negatives
            assert self.prepared is not None
            assert self._seen_keys is not None
            indices = np.asarray([e["index"] for e in examples], dtype=np.int64)
            negatives = sample_negatives(
                indices,
                users.numpy(),
                config=self.negatives,
                seed=self.cfg.data.augmentation.seed,
                epoch=self.epoch,
                item_counts=self.prepared.item_counts,
                seen_keys=self._seen_keys,
            )
            candidates = torch.cat([items[:, None], torch.from_numpy(negatives)], dim=1)
            weights = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
            return {
                "users": users.to(device),
                "candidates": candidates.to(device),
                "weights": weights.to(device),
            }
        width = max(1, max(len(e["seen"]) for e in examples))
        seen = torch.full((len(examples), width), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            seen[row, : len(example["seen"])] = torch.as_tensor(example["seen"], dtype=torch.long)
        return {"users": users.to(device), "targets": items.to(device), "seen": seen.to(device)}

    def forward(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Scores of the candidates (training) or of every item (evaluation)."""
        scores: torch.Tensor = module(batch["users"], batch.get("candidates"))
        return scores

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        per_example = self._pairwise_loss(outputs.float())
        weights = batch["weights"]
        return (per_example * weights).sum() / weights.sum()

    def _pairwise_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """The loss of each row whose first score is the positive and the rest its negatives."""
        if self.definition.loss == "bpr":
            return F.softplus(scores[:, 1:] - scores[:, :1]).mean(dim=1)
        return torch.logsumexp(scores, dim=1) - scores[:, 0]

    def units(self, examples: Sequence[Any]) -> int:
        return len(examples)

    def fingerprint(self, examples: Sequence[Any]) -> str:
        computed = getattr(examples, "fingerprint", None)
        if callable(computed):
            return str(computed())
        digest = hashlib.sha256(json.dumps([[e["user"], e["item"]] for e in examples]).encode())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------------------------- evaluation
    def eval_sums(self, outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Per-user sums of the model's and the popularity baseline's ranking figures, and the loss of the
        held-out item against every candidate (the training objective over the whole catalogue)."""
        assert self._popularity is not None
        scores = outputs.float()
        candidates = _candidates(scores.shape, batch["seen"])
        targets = batch["targets"]
        sums: dict[str, float] = {"users": float(len(targets))}
        loss = self._full_loss(scores, targets, candidates)
        sums["loss_sum"] = float(loss.sum())
        popularity = self._popularity.to(scores.device).expand_as(scores)
        for prefix, ranked in (("", scores), ("popularity_", popularity)):
            rank = _rank(ranked, targets, candidates)
            for key, value in _ranking_sums(rank, candidates.sum(dim=1), self.k, self.curve_k).items():
                sums[prefix + key] = value
        return sums

    def _full_loss(
        self, scores: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        target = scores.gather(1, targets[:, None])
        if self.definition.loss == "bpr":
            others = candidates.clone()
            others.scatter_(1, targets[:, None], False)
            pairwise = F.softplus(scores - target) * others
            return pairwise.sum(dim=1) / others.sum(dim=1).clamp(min=1)
        masked = scores.masked_fill(~candidates, float("-inf"))
        return torch.logsumexp(masked, dim=1) - target[:, 0]

    def eval_records(self, outputs: Any, batch: Batch) -> list[Any]:
        return []

    def final_metrics(self, sums: Mapping[str, float], records: Sequence[Any]) -> dict[str, float]:
        users = max(sums["users"], 1.0)
        metrics = {"loss": sums["loss_sum"] / users}
        for prefix, name in (("", ""), ("popularity_", "popularity-")):
            metrics[f"{name}recall"] = sums[f"{prefix}recall"] / users
            metrics[f"{name}ndcg"] = sums[f"{prefix}ndcg"] / users
            metrics[f"{name}hit-rate"] = sums[f"{prefix}hits"] / users
            metrics[f"{name}auc"] = sums[f"{prefix}auc"] / users
        # The recall@1..K curves are kept for the model card (the last evaluation is the final test split),
        # not made metrics: they would crowd metrics.json, the card's table and the job's status.
        self.last_curves = {
            name: [sums[f"{prefix}recall@{k}"] / users for k in range(1, self.curve_k + 1)]
            for prefix, name in (("", "model"), ("popularity_", "popularity"))
        }
        return metrics

    # --------------------------------------------------------------------------------------- finish
    def samples(
        self, module: nn.Module, prepared: Any, device: torch.device, synced: bool
    ) -> list[dict[str, Any]]:
        """The top-5 of the first validation users beside their held-out item (ids as in the data)."""
        examples = list(prepared.validation[:SAMPLE_USERS])
        if not examples:
            return []
        batch = self.collate(examples, device)
        with torch.no_grad():
            scores = self.forward(module, batch).float()
        scores = scores.masked_fill(~_candidates(scores.shape, batch["seen"]), float("-inf"))
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices.tolist()
        return [
            {
                "user": prepared.user_ids[e["user"]],
                "heldOut": prepared.item_ids[e["item"]],
                "recommended": [prepared.item_ids[i] for i in row],
            }
            for e, row in zip(examples, top, strict=True)
        ]

    def export(
        self, module: nn.Module, state_dict: dict[str, torch.Tensor], out: Path, prepared: Any
    ) -> Exported:
        """``out/model``: the user and item vectors (bias folded in), id maps, each user's training items,
        the train popularity, the definition and serving.json; the server's recommendation kind loads it."""
        from safetensors.torch import save_file

        from finetune_trainer.serving_files import SERVING_FORMAT_VERSION, write_manifest

        target = out / "model"
        target.mkdir(parents=True, exist_ok=True)
        model = TwoTower(prepared.num_users, prepared.num_items, self.definition, self.cfg.seed)
        model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()})
        model.eval()
        with torch.no_grad():
            users = model.user_vectors(torch.arange(prepared.num_users))
            items, bias = model.item_vectors()
        save_file(
            {
                "users": torch.cat([users, torch.ones(len(users), 1)], dim=1).contiguous(),
                "items": torch.cat([items, bias[:, None]], dim=1).contiguous(),
            },
            str(target / EMBEDDINGS_FILE),
        )
        seen_indptr, seen_items = prepared.all_seen()
        save_file(
            {
                "indptr": torch.as_tensor(seen_indptr, dtype=torch.int64),
                "items": torch.as_tensor(seen_items, dtype=torch.int64),
                "popularity": torch.as_tensor(prepared.item_counts, dtype=torch.int64),
            },
            str(target / SEEN_FILE),
        )
        ids = {"users": prepared.user_ids, "items": prepared.item_ids}
        (target / ID_MAPS_FILE).write_text(json.dumps(ids), encoding="utf-8")
        definition = self.definition.model_dump(mode="json", by_alias=True)
        (target / DEFINITION_FILE).write_text(json.dumps(definition, indent=1), encoding="utf-8")
        serving = {
            "version": SERVING_FORMAT_VERSION,
            "task": self.name,
            "rowKind": "interactions",
            "topK": self.k,
            "entryPoint": "finetune_server.models.recommender:load_recommender",
        }
        (target / "serving.json").write_text(json.dumps(serving, indent=1), encoding="utf-8")
        write_manifest(target)
        return Exported(directory=target, format="full")  # every weight (embeddings) of the recommender

    def card_section(self, metrics: Mapping[str, Any], out: Path) -> str:
        """Model vs popularity at k, and the recall@k curve (k = 1..K) of both as ``recall_at_k.png``."""
        split_name, figures = _final_split(metrics)
        lines = ["## Recommendation", ""]
        if not figures:
            return "\n".join([*lines, "No held-out users were evaluated.", ""])
        lines += [
            f"Ranking over every item the user has not interacted with in training, on the {split_name} "
            f"split (leave-last-out: each user's last interaction), at k = {self.k}. The popularity "
            "baseline ranks items by their interactions in the train split.",
            "",
            "| metric | model | popularity |",
            "| --- | --- | --- |",
        ]
        for metric in ("recall", "ndcg", "hit-rate", "auc"):
            if metric in figures:
                label = f"{metric}@{self.k}" if metric != "auc" else metric
                lines.append(f"| {label} | {figures[metric]:.4f} | {figures[f'popularity-{metric}']:.4f} |")
        if self.last_curves:
            _plot_curve(self.last_curves["model"], self.last_curves["popularity"], out / "recall_at_k.png")
            (out / "recall_at_k.json").write_text(json.dumps(self.last_curves), encoding="utf-8")
            lines += [
                "",
                f"Recall@k for k = 1..{len(self.last_curves['model'])} (numbers in `recall_at_k.json`):",
                "",
                "![recall@k, model and popularity](recall_at_k.png)",
            ]
        return "\n".join(lines) + "\n"


def _candidates(shape: torch.Size, seen: torch.Tensor) -> torch.Tensor:
    """True for every item the ranking includes (all but the padded ``seen`` lists, -1 = padding)."""
    mask = torch.ones(shape, dtype=torch.bool, device=seen.device)
    rows = torch.arange(shape[0], device=seen.device)[:, None].expand_as(seen)
    valid = seen >= 0
    mask[rows[valid], seen[valid]] = False
    return mask


def _rank(scores: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among its candidates; ties go to the lower item index (as a stable
    sort by score would), so a constant score ranks by index, not in the target's favour."""
    target = scores.gather(1, targets[:, None])
    index = torch.arange(scores.shape[1], device=scores.device)[None, :]
    ahead = (scores > target) | ((scores == target) & (index < targets[:, None]))
    return (ahead & candidates).sum(dim=1)


def _ranking_sums(rank: torch.Tensor, candidates: torch.Tensor, k: int, curve_k: int) -> dict[str, float]:
    hit = (rank < k).float()
    sums = {
        "hits": float(hit.sum()),
        "recall": float(hit.sum()),  # one held-out item per user: recall@k = hits@k / 1
        "ndcg": float((hit / torch.log2(rank.float() + 2)).sum()),
        "auc": float((1 - rank.float() / (candidates - 1).clamp(min=1).float()).sum()),
    }
    for cut in range(1, curve_k + 1):
        sums[f"recall@{cut}"] = float((rank < cut).sum())
    return sums


def _final_split(metrics: Mapping[str, Any]) -> tuple[str, Mapping[str, float]]:
    """The held-out figures the card shows: after training, test when there is one, else validation
    (``metrics`` is metrics.json's shape, or one split's flat figures)."""
    after = metrics.get("after", metrics)
    for split in ("test", "validation"):
        figures = after.get(split) if isinstance(after, Mapping) else None
        if figures:
            return split, figures
    return "held-out", {k: v for k, v in after.items() if isinstance(v, int | float)}


def _plot_curve(model: list[float], popularity: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, len(model) + 1))
    figure, axes = plt.subplots(figsize=(5, 3.2), dpi=110)
    axes.plot(ks, model, marker="o", markersize=3, label="model")
    axes.plot(ks, popularity, marker="s", markersize=3, label="popularity")
    axes.set_xlabel("k")
    axes.set_ylabel("recall@k")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
