"""The recommendation example is accepted by the API and its rendered trainer config by the trainer, with
negative sampling, the ranking cut-off, the timestamp column and the leave-last-out split carried over."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune_operator.api import parse_finetunejob
from finetune_operator.builders.trainer_config import validated_trainer_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetunejob-recommendation.yaml"


def test_recommendation_example_renders_a_config_the_trainer_accepts() -> None:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = "shop"
    cfg = validated_trainer_config(parse_finetunejob(body), shutdown_timeout_seconds=60)
    assert cfg.task.value == "recommendation"
    assert cfg.method.value == "full"
    negatives = cfg.data.augmentation.negatives
    assert negatives is not None
    assert (negatives.strategy, negatives.count) == ("popularity", 8)
    assert cfg.evaluation.top_k == 10
    assert cfg.evaluation.metrics == ["loss", "recall", "ndcg", "hit-rate"]
    fields = cfg.data.fields
    assert (fields.kind, fields.user, fields.item, fields.rating, fields.timestamp) == (
        "interactions",
        "customer_id",
        "product_id",
        "clicks",
        "clicked_at",
    )
    assert cfg.data.split.model_fields_set == set()  # leave-last-out: no ratios, no seed rendered
