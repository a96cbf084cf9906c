"""Image classification end to end: scikit-learn's handwritten digits written out as PNG files (real data),
a tiny randomly initialised ResNet trained through the trainer's worker entry, held-out accuracy before
(about chance) and after (well above it), bad image files reported per row, and the artifact served by the
inference server's image-classification kind (a base64 image in, the digit out); two DeepSpeed ZeRO-2 ranks on
the CPU."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.images import prepare_images
from finetune_trainer.tasks.image_classification import ImageClassification
from finetune_trainer.tasks.sequence_classification import SequenceClassification
from image_fixtures import image_config, make_tiny_image_model, write_digits
from server_fixtures import running_server, write_server_config
from trainer_fixtures import (
    ZERO2_CPU,
    check_two_rank_classification,
    run_trainer,
    run_two_ranks,
    write_config,
)

CLASSES = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits")
    data = write_digits(tmp / "digits")
    model = make_tiny_image_model(tmp / "model", num_labels=CLASSES)
    result = run_trainer(write_config(tmp, image_config(tmp, model, data)))
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp / "out"


def test_training_lifts_held_out_accuracy_far_above_chance(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    before, after = metrics["before"]["test"], metrics["after"]["test"]
    print(
        f"digits test accuracy before {before['accuracy']:.3f} after {after['accuracy']:.3f}; "
        f"macro-F1 after {after['f1']:.3f}; AUC before {before['auc']:.3f} after {after['auc']:.3f}; "
        f"top-5 after {after['top5_accuracy']:.3f}"
    )
    chance = 1 / CLASSES
    assert before["accuracy"] < chance + 0.15  # a random head is about chance
    assert after["accuracy"] > 0.8
    assert after["accuracy"] > before["accuracy"] + 0.5
    assert {"loss", "accuracy", "f1", "precision", "recall", "auc", "top5_accuracy"} <= set(after)
    assert after["auc"] > before["auc"]
    card = (trained / "README.md").read_text()
    assert "![confusion matrix](confusion_matrix.png)" in card
    assert (trained / "confusion_matrix.png").stat().st_size > 0
    config = json.loads((trained / "model" / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(CLASSES)}
    report = json.loads((trained / "data_report.json").read_text())
    assert sum(report["images"]["test"]["perClass"]) == report["images"]["test"]["images"] > 0
    assert report["images"]["train"]["modes"] == {"L": report["images"]["train"]["images"]}


def test_the_artifact_predicts_through_the_server(trained: Path, tmp_path: Path) -> None:
    server = write_server_config(tmp_path, trained / "model", modelName="digits")
    digits = sorted((trained.parent / "digits").glob("*/*.png"))[::150]
    inputs = [base64.b64encode(p.read_bytes()).decode() for p in digits]
    with running_server(server) as base:
        answer = httpx.post(f"{base}/v1/predict", json={"model": "digits", "inputs": inputs}, timeout=60)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        right = sum(p["label"] == path.parent.name for p, path in zip(predictions, digits, strict=True))
        assert right >= 0.7 * len(digits)
        assert all(set(p["scores"]) == {str(i) for i in range(CLASSES)} for p in predictions)
        bad = httpx.post(
            f"{base}/v1/predict", json={"model": "digits", "inputs": ["bm90IGFuIGltYWdl"]}, timeout=60
        )
        assert bad.status_code == 400
        assert "inputs[0]" in bad.text


def test_image_scores_are_sequence_classification_scores_with_auc_and_top5(tmp_path: Path) -> None:
    """AUC is reported (status extra, metrics.json and the card all take final_metrics) as for sequence
    classification, can be asked for and stopped on, and equals scikit-learn's one-vs-rest macro AUC."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    config = image_config(
        tmp_path,
        tmp_path / "model",
        tmp_path / "digits",
        evaluation={"metrics": ["loss", "accuracy", "auc"]},
        earlyStopping={"enabled": True, "metric": "auc", "mode": "max"},
    )
    task = ImageClassification(TrainerConfig.model_validate(config))
    task.label_names = [str(i) for i in range(CLASSES)]
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % CLASSES
    # Logits that lean towards the true class: better than chance, short of perfect.
    lean = torch.nn.functional.one_hot(labels, CLASSES)
    logits = torch.randn(60, CLASSES, generator=generator) + 1.5 * lean
    batches = [{"labels": labels[i : i + 16]} for i in range(0, 60, 16)]
    outputs = [logits[i : i + 16] for i in range(0, 60, 16)]
    sums: dict[str, float] = {}
    records = []
    for out, batch in zip(outputs, batches, strict=True):
        for key, value in task.eval_sums(out, batch).items():
            sums[key] = sums.get(key, 0.0) + value
        records += task.eval_records(out, batch)
    metrics = task.final_metrics(sums, records)

    probabilities = torch.softmax(logits, dim=-1).numpy()
    expected_auc = roc_auc_score(labels.numpy(), probabilities, multi_class="ovr", average="macro")
    assert metrics["auc"] == pytest.approx(expected_auc)
    assert 0.6 < metrics["auc"] < 1.0
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    in_top5 = [int(y) in row for y, row in zip(labels.numpy(), top5, strict=True)]
    assert metrics["top5_accuracy"] == pytest.approx(np.mean(in_top5))
    text_task = SequenceClassification(task.cfg)
    text_metrics = text_task.final_metrics(sums, records)
    assert metrics == {**text_metrics, "top5_accuracy": metrics["top5_accuracy"]}
    assert "AUC is the mean one-vs-rest ROC AUC" in task.card_section({"after": {"test": metrics}}, tmp_path)


def test_image_augmentation_is_seeded_by_the_augmentation_seed_else_the_runs(tmp_path: Path) -> None:
    """One rule for every augmentation: ``data.augmentation.seed`` where the config sets it, else ``seed``
    (TrainerConfig resolves it, so text perturbations read the same field)."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    example = {"path": str(tmp_path / "noise.png"), "data": None, "label": 0, "split": "train", "index": 3}
    transforms = {"horizontalFlip": True, "randomResizedCrop": True, "rotationDegrees": 30.0}

    def task(run_seed: int, **augmentation: Any) -> ImageClassification:
        config = image_config(tmp_path, tmp_path / "model", tmp_path / "digits")
        config["seed"] = run_seed
        config["data"]["augmentation"] = {"image": transforms, **augmentation}
        return ImageClassification(TrainerConfig.model_validate(config))

    run7, run8, run8_aug7 = task(7), task(8), task(8, seed=7)
    assert [t.cfg.data.augmentation.seed for t in (run7, run8, run8_aug7)] == [7, 8, 7]

    def pixels(t: ImageClassification, **changes: Any) -> Any:
        return np.asarray(t._image({**example, **changes}))  # type: ignore[typeddict-item]

    assert np.array_equal(pixels(run7), pixels(run8_aug7))
    assert not np.array_equal(pixels(run7), pixels(run8))
    assert np.array_equal(pixels(run7, split="validation"), noise)  # never augmented


def test_bad_images_are_reported_per_row(tmp_path: Path) -> None:
    data = write_digits(tmp_path / "digits", limit=120)
    good = sorted((data / "3").glob("*.png"))[0]
    (data / "3" / "truncated.png").write_bytes(good.read_bytes()[:40])
    (data / "3" / "notes.txt").write_text("not an image")
    from PIL import Image

    Image.new("RGB", (2, 2)).save(data / "5" / "tiny.png")
    (data / "stray.png").write_bytes(good.read_bytes())
    cfg = DataConfig.model_validate(
        {
            "source": str(data),
            "format": "image-folder",
            "fields": {"kind": "image-classification"},
            "images": {"minSize": 4},
            "badRows": {"maxRatio": 0.1},
            "split": {"validation": 0.2},
        }
    )
    prepared = prepare_images(cfg, tmp_path / "work")
    reasons = {
        Path(line.reason.split("'")[1]).name if "'" in line.reason else line.reason: line.reason
        for line in prepared.report.bad_rows.lines
    }
    assert prepared.report.bad_rows.count == 4
    assert "cannot decode" in reasons["truncated.png"]
    assert "cannot decode" in reasons["notes.txt"]
    assert "below data.images.minSize 4" in reasons["tiny.png"]
    assert any("stray.png: directly in the folder" in r for r in reasons.values())
    assert len(prepared.train) + len(prepared.validation) == 120
    # Refusing non-RGB images makes every greyscale digit a bad row: over the limit, the error names rows.
    strict = cfg.model_copy(update={"images": cfg.images.model_copy(update={"mode": "refuse"})})
    with pytest.raises(DataError, match=r"colour mode L is not RGB \(data.images.mode: refuse\)"):
        prepare_images(strict, tmp_path / "strict")


@pytest.mark.slow
def test_two_ranks_zero2_train_image_classification(tmp_path: Path) -> None:
    data = write_digits(tmp_path / "digits", limit=500)
    model = make_tiny_image_model(tmp_path / "model", num_labels=CLASSES)
    config = image_config(
        tmp_path,
        model,
        data,
        distributed=ZERO2_CPU,
        # micro 16 x 2 ranks: a global batch of 32, as the single-process run's.
        hyperparameters={"microBatchSize": 16, "epochs": 4},
        # 24 rows a rank a round: the test split's last round leaves rank 1 only a padding batch.
        evaluation={"batchSize": 24},
    )
    result = run_two_ranks(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-5000:]
    test_rows = json.loads((tmp_path / "out" / "data_report.json").read_text())["images"]["test"]["images"]
    before, after = check_two_rank_classification(
        tmp_path, {str(i): str(i) for i in range(CLASSES)}, test_rows
    )
    print(f"digits (500), ZeRO-2 x2, test split of {test_rows}: before {before}\n  after {after}")
    assert 0 < test_rows % 48 <= 24  # the last round leaves rank 1 without rows
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert (tmp_path / "out" / "model" / "model.safetensors").stat().st_size > 0
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 0
