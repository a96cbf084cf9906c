"""The recommendation task on interactions with planted structure: the trained model's recall@10 is clearly
above the popularity baseline and above the untrained model; the artifact loads back through the server's
loader and its top-k agrees with the evaluation; the model card draws the recall@k curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetune_server.config import parse_config as parse_server_config
from finetune_server.models import MODEL_KINDS
from finetune_server.models.recommender import load_recommender
from finetune_trainer.config import ConfigError, Method, Task, TrainerConfig, parse_config
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data_order import DataOrder
from finetune_trainer.tasks.recommendation import Recommendation
from recommendation_fixtures import make_interactions, make_model_definition, recommendation_config

EPOCHS = 12
BATCH = 128


def _config(tmp: Path, model: Path, data: Path, **data_extra: Any) -> TrainerConfig:
    """A trainer config for the task (built around the loop until the trainer runs the task itself)."""
    base = parse_config(
        {"model": {"path": str(model)}, "data": {"source": str(data)}, "output": {"dir": str(tmp / "out")}}
    )
    fields = {"kind": "interactions", "rating": "rating", "timestamp": "timestamp"}
    data_cfg = DataConfig.model_validate({"source": str(data), "fields": fields, **data_extra})
    return base.model_copy(update={"task": Task.RECOMMENDATION, "method": Method.FULL, "data": data_cfg})


def _evaluate(
    task: Recommendation, module: torch.nn.Module, examples: Any, batch: int = 32
) -> dict[str, float]:
    sums: dict[str, float] = {}
    module.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            collated = task.collate(examples[start : start + batch], torch.device("cpu"))
            for key, value in task.eval_sums(task.forward(module, collated), collated).items():
                sums[key] = sums.get(key, 0.0) + value
    return task.final_metrics(sums, [])


def _train(task: Recommendation, module: torch.nn.Module, prepared: Any, lr: float) -> list[float]:
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    order = DataOrder(len(prepared.train), BATCH, 1, 1, seed=1)
    losses = []
    module.train()
    for epoch in range(EPOCHS):
        task.set_epoch(epoch)
        permutation = order.permutation(epoch)
        for step in range(order.steps_per_epoch):
            (indices,) = order.micro_batches(permutation, step, 0)
            batch = task.collate([prepared.train[i] for i in indices], torch.device("cpu"))
            loss = task.loss(task.forward(module, batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(
    ("definition", "negatives", "lr"),
    [
        ({"architecture": "matrix-factorization", "loss": "bpr"}, {"strategy": "uniform", "count": 4}, 0.05),
        (
            {"architecture": "two-tower", "loss": "sampled-softmax", "hiddenDims": [64]},
            {"strategy": "popularity", "count": 8},
            0.01,
        ),
    ],
    ids=["mf-bpr-uniform", "two-tower-softmax-popularity"],
)
def test_recall_at_10_beats_popularity_and_before(
    tmp_path: Path, definition: dict[str, Any], negatives: dict[str, Any], lr: float
) -> None:
    data = make_interactions(tmp_path / "clicks.csv")
    model_dir = make_model_definition(tmp_path / "base", **definition)
    cfg = _config(tmp_path, model_dir, data, augmentation={"negatives": negatives})
    task = Recommendation(cfg)
    prepared = task.prepare(
        task.load_processor(), tmp_path / "out", store=tmp_path / "store", attempt="a", wait=False
    )
    module = task.load_model(prepared, torch.device("cpu"), None)
    before = _evaluate(task, module, prepared.test)
    losses = _train(task, module, prepared, lr)
    after = _evaluate(task, module, prepared.test)
    validation = _evaluate(task, module, prepared.validation)
    print(
        f"\n{'/'.join(str(v) for v in definition.values())}: test recall@10 before {before['recall']:.3f}, "
        f"after {after['recall']:.3f}, popularity {after['popularity-recall']:.3f}; ndcg@10 before "
        f"{before['ndcg']:.3f} after {after['ndcg']:.3f} popularity {after['popularity-ndcg']:.3f}; "
        f"auc {after['auc']:.3f} vs {after['popularity-auc']:.3f}; "
        f"validation recall@10 {validation['recall']:.3f}; "
        f"train loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}; users {len(prepared.test)}"
    )
    assert after["recall"] > after["popularity-recall"] + 0.1
    assert after["recall"] > 1.5 * after["popularity-recall"]
    assert after["recall"] > before["recall"] + 0.15
    assert after["ndcg"] > after["popularity-ndcg"]
    assert after["loss"] < before["loss"]
    assert after["hit-rate"] == after["recall"]  # one held-out item per user
    assert before["popularity-recall"] == after["popularity-recall"]  # the baseline does not train
    curve = task.last_curves["model"]  # of the last evaluation: validation
    assert len(curve) == 20
    assert curve == sorted(curve)
    assert curve[9] == validation["recall"]

    # The artifact: exported, loaded back by the scoring entry point and by the server's loader.
    exported = task.export(module, module.state_dict(), tmp_path / "out", prepared)
    assert exported.format == "full"
    recommender = load_recommender(exported.directory)
    hits = 0
    for example in prepared.test:
        user, held_out = prepared.user_ids[example["user"]], prepared.item_ids[example["item"]]
        served_top = [r.item for r in recommender.top_k(user, 10)]
        # Served recommendations leave out every item of the user's, the held-out ones included.
        assert held_out in recommender.seen(user)
        assert not set(served_top) & set(recommender.seen(user))
        # Ranked as the evaluation ranks the test split (its training and validation items left out).
        left_out = {prepared.item_ids[i] for i in example["seen"]}
        ranked = [r.item for r in recommender.top_k(user, prepared.num_items, exclude_seen=False)]
        hits += held_out in [item for item in ranked if item not in left_out][:10]
    assert abs(hits / len(prepared.test) - after["recall"]) < 0.02
    server_config = parse_server_config({"modelDir": str(exported.directory), "modelName": "recs"})
    served = MODEL_KINDS["recommendation"](server_config)
    served.load()
    assert served.ready, served.health()
    first = prepared.user_ids[prepared.test[0]["user"]]
    assert [r.item for r in served.recommend(first, 5, True, 0)] == [
        r.item for r in recommender.top_k(first, 5)
    ]

    section = task.card_section({"after": {"test": after}}, tmp_path / "out")
    assert "| recall@10 |" in section
    assert "recall_at_k.png" in section
    assert (tmp_path / "out" / "recall_at_k.png").stat().st_size > 5000
    samples = task.samples(module, prepared, torch.device("cpu"), False)
    assert len(samples) == 5
    assert all(len(s["recommended"]) == 5 for s in samples)


def test_the_definition_and_method_are_checked(tmp_path: Path) -> None:
    data = make_interactions(tmp_path / "clicks.csv", users=20, items=10)
    cfg = _config(tmp_path, tmp_path / "missing", data)
    with pytest.raises(ConfigError, match=r"no recommender\.json"):
        Recommendation(cfg).load_processor()
    bad = make_model_definition(tmp_path / "bad", architecture="transformer")
    with pytest.raises(ConfigError, match="architecture"):
        Recommendation(_config(tmp_path, bad, data)).load_processor()
    lora = _config(tmp_path, bad, data).model_dump(mode="json", by_alias=True, exclude_defaults=True)
    lora["method"] = "lora"
    with pytest.raises(ValueError, match="recommendation train the full model only; set method full"):
        TrainerConfig.model_validate(lora)


def test_served_model_refuses_compression_and_unknown_users(tmp_path: Path) -> None:
    data = make_interactions(tmp_path / "clicks.csv", users=30, items=20)
    cfg = _config(tmp_path, make_model_definition(tmp_path / "base"), data)
    task = Recommendation(cfg)
    prepared = task.prepare(
        task.load_processor(), tmp_path / "w", store=tmp_path / "s", attempt="a", wait=False
    )
    module = task.load_model(prepared, torch.device("cpu"), None)
    directory = task.export(module, module.state_dict(), tmp_path / "out", prepared).directory
    assert json.loads((directory / "serving.json").read_text())["task"] == "recommendation"
    compressed = parse_server_config(
        {"modelDir": str(directory), "modelName": "r", "quantization": {"method": "int8-dynamic"}}
    )
    refused = MODEL_KINDS["recommendation"](compressed)
    refused.load()
    assert refused.status.reason == "InvalidConfig"
    assert "quantization.method" in str(refused.status.message)
    served = MODEL_KINDS["recommendation"](
        parse_server_config({"modelDir": str(directory), "modelName": "r"})
    )
    served.load()
    from finetune_server.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"users\[0\]: 'nobody' is not a user"):
        served.recommend("nobody", 3, True, 0)


@pytest.mark.slow
def test_the_trainer_runs_the_task_end_to_end(tmp_path: Path) -> None:
    """``python -m finetune_trainer`` (launcher -> worker) trains, evaluates before/after, exports, writes the
    card with the recall@k curve; the artifact predicts through the server's loader."""
    from trainer_fixtures import run_trainer, write_config

    data = make_interactions(tmp_path / "clicks.csv")
    model_dir = make_model_definition(tmp_path / "base")
    config = recommendation_config(tmp_path, model_dir, data)
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["test"], metrics["after"]["test"]
    print(
        f"\nworker run: test recall@10 before {before['recall']:.3f} after {after['recall']:.3f} popularity "
        f"{after['popularity-recall']:.3f}; ndcg@10 {before['ndcg']:.3f} -> {after['ndcg']:.3f}"
    )
    assert after["recall"] > after["popularity-recall"] + 0.1
    assert after["recall"] > before["recall"] + 0.15
    assert metrics["artifact"]["format"] == "full"
    card = (out / "README.md").read_text()
    assert "## Recommendation" in card
    assert "recall_at_k.png" in card
    assert "leave-last-out" in card
    assert (out / "recall_at_k.png").is_file()
    assert (out / "data_report.json").is_file()
    served = MODEL_KINDS["recommendation"](
        parse_server_config({"modelDir": str(out / "model"), "modelName": "recs"})
    )
    served.load()
    assert served.ready, served.health()
    assert len(served.recommend("u0", None, True, 0)) == 10
