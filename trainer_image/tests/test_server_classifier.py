"""A classifier served over real HTTP: /v1/predict, its limits, its quality gate (accuracy)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from finetune_trainer.serving_files import QUALITY_SAMPLE_FILE, SERVING_FILE, write_manifest
from server_fixtures import running_server, write_server_config
from trainer_fixtures import tiny_tokenizer

LABELS = ["negative", "positive"]


def make_tiny_classifier(directory: Path) -> Path:
    """A random-initialised Llama-style sequence classifier with the files a trainer artifact carries."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(LABELS),
    )
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    texts = [f"sample {i} {'good' if i % 2 else 'bad'}" for i in range(24)]
    with (directory / QUALITY_SAMPLE_FILE).open("w") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"input_ids": tokenizer(text)["input_ids"], "labels": [i % 2]}) + "\n")
    serving = {
        "version": 1,
        "task": "sequence-classification",
        "template": "plain",
        "rowKind": "classification",
        "labelNames": LABELS,
        "qualitySample": {"file": QUALITY_SAMPLE_FILE, "split": "test", "rows": len(texts)},
    }
    (directory / SERVING_FILE).write_text(json.dumps(serving))
    write_manifest(directory)
    return directory


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("classifier")
    model_dir = make_tiny_classifier(root / "model")
    config = write_server_config(
        root,
        model_dir,
        modelName="sentiment",
        quantization={"method": "int8-dynamic", "maxQualityDrop": 0.2},
        limits={"maxPredictInputs": 4, "maxInputTokens": 40},
    )
    with running_server(config) as base:
        yield base


def test_predict_answers_each_input_in_order(classifier: str) -> None:
    body = {"model": "sentiment", "inputs": ["a good day", "a bad day", "meh"]}
    answer = httpx.post(f"{classifier}/v1/predict", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == 3
    for p in predictions:
        assert p["label"] in LABELS
        assert set(p["scores"]) == set(LABELS)
        assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert p["score"] == pytest.approx(p["scores"][p["label"]], abs=1e-4)


def test_predict_limits_name_the_field(classifier: str) -> None:
    many = httpx.post(f"{classifier}/v1/predict", json={"model": "sentiment", "inputs": ["x"] * 5})
    assert many.status_code == 413
    assert many.json()["error"]["param"] == "inputs"
    long = httpx.post(f"{classifier}/v1/predict", json={"model": "sentiment", "inputs": ["ok", "y" * 60]})
    assert long.status_code == 413
    assert long.json()["error"]["param"] == "inputs[1]"
    empty = httpx.post(f"{classifier}/v1/predict", json={"model": "sentiment", "inputs": []})
    assert empty.status_code == 400
    assert empty.json()["error"]["param"] == "inputs"


def test_the_classifier_gate_measures_accuracy(classifier: str) -> None:
    (gate,) = httpx.get(f"{classifier}/readyz").json()["quality"]
    assert gate["metric"] == "accuracy"
    assert gate["passed"]
    assert 0.0 <= gate["value"] <= 1.0
    assert "/v1/predict" in httpx.get(f"{classifier}/openapi.json").json()["paths"]
