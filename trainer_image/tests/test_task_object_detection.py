"""Object detection: COCO data checked image by image, an FCOS detector that learns synthetic shapes through
the real entrypoint (launcher -> torchrun -> worker), and an artifact the server's loader serves."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detection_shapes import (
    CATEGORIES,
    KIND,
    detection_config,
    make_detector_folder,
    make_shapes_coco,
    trained_detection_config,
)
from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data.config import DataConfig, ImageAugmentationConfig
from finetune_trainer.data.detection import prepare_detection
from finetune_trainer.data.errors import DataError
from finetune_trainer.tasks import make_task
from finetune_trainer.tasks.object_detection import (
    collate_detection,
    mean_average_precision,
    training_mode_without_statistics,
)
from trainer_fixtures import run_trainer, write_config


def _coco(root: Path) -> dict[str, Any]:
    return json.loads((root / "annotations.json").read_text())  # type: ignore[no-any-return]


def _write_coco(root: Path, document: dict[str, Any]) -> Path:
    path = root / "annotations.json"
    path.write_text(json.dumps(document))
    return path


def test_bad_annotations_and_images_are_named(tmp_path: Path) -> None:
    make_shapes_coco(tmp_path, 10, seed=3)
    doc = _coco(tmp_path)
    first_box = {a["image_id"]: a for a in reversed(doc["annotations"])}
    first_box[0]["bbox"] = [90, 10, 20, 20]  # passes the right edge of a 96x96 image
    first_box[1]["bbox"] = [10, 10, 0, 12]  # zero width
    first_box[2]["category_id"] = 9  # no such category
    (tmp_path / doc["images"][3]["file_name"]).unlink()  # missing file
    (tmp_path / doc["images"][4]["file_name"]).write_bytes(b"not a png")  # undecodable
    doc["images"][5]["width"] = 128  # declared size differs from the file's
    doc["annotations"].append({"id": 999, "image_id": 77, "bbox": [1, 1, 5, 5], "category_id": 1})
    source = _write_coco(tmp_path, doc)

    cfg = DataConfig.model_validate({"source": str(source), "fields": KIND, "badRows": {"maxRatio": 1.0}})
    data = prepare_detection(cfg, tmp_path / "work")
    reasons = {line.line: line.reason for line in data.report.bad_rows.lines}
    print(json.dumps(reasons, indent=1))
    assert data.report.bad_rows.count == 7
    assert data.report.bad_rows.total == 11  # 10 images + 1 annotation that belongs to none
    assert "lies outside the 96x96 image" in reasons[1]
    assert f"annotation {first_box[0]['id']}" in reasons[1]
    assert "zero or negative area" in reasons[2]
    assert "unknown category_id 9" in reasons[3]
    assert "does not exist" in reasons[4]
    assert "cannot decode the image" in reasons[5]
    assert "the annotations say 128x96, the file is 96x96" in reasons[6]
    assert "image_id 77 is not in images" in reasons[len(doc["annotations"])]
    assert len(data.train) + len(data.validation) + len(data.test) == 4
    assert (tmp_path / "work" / "data_report.json").is_file()

    strict = DataConfig.model_validate({"source": str(source), "fields": KIND, "badRows": {"maxRatio": 0.1}})
    with pytest.raises(DataError, match=r"7 of 11 rows are malformed.*lies outside") as refused:
        prepare_detection(strict, tmp_path / "strict")
    assert refused.value.reason == "TooManyBadRows"


def test_split_is_deterministic_and_duplicates_never_cross_splits(tmp_path: Path) -> None:
    make_shapes_coco(tmp_path, 40, seed=4)
    doc = _coco(tmp_path)
    # Image 39 is a byte-for-byte copy of image 0 under another name.
    shutil.copy(tmp_path / doc["images"][0]["file_name"], tmp_path / doc["images"][39]["file_name"])
    source = _write_coco(tmp_path, doc)
    cfg = DataConfig.model_validate(
        {"source": str(source), "fields": KIND, "split": {"validation": 0.25, "test": 0.25, "seed": 5}}
    )
    first = prepare_detection(cfg, tmp_path / "a")
    again = prepare_detection(cfg, tmp_path / "b")
    assert (first.train, first.validation, first.test) == (again.train, again.validation, again.test)
    assert first.report.removed_by_reason() == {"duplicate": 1}
    images = [e["image"] for split in (first.train, first.validation, first.test) for e in split]
    assert len(images) == 39
    assert not any(i.endswith(doc["images"][39]["file_name"]) for i in images)
    assert min(len(first.train), len(first.validation), len(first.test)) > 0
    assert first.category_names == list(CATEGORIES)
    # Boxes become corners; class ids index the categories in id order.
    example = next(e for e in first.train)
    assert all(x2 > x1 and y2 > y1 for x1, y1, x2, y2 in example["boxes"])
    assert set(example["labels"]) <= {0, 1, 2}


def test_rows_with_image_and_objects_columns(tmp_path: Path) -> None:
    make_shapes_coco(tmp_path, 6, seed=5)
    doc = _coco(tmp_path)
    names = {c["id"]: c["name"] for c in doc["categories"]}
    lines = []
    for image in doc["images"]:
        objects = [
            {"bbox": a["bbox"], "category": names[a["category_id"]]}
            for a in doc["annotations"]
            if a["image_id"] == image["id"]
        ]
        lines.append(json.dumps({"path": image["file_name"], "boxes": objects}))
    lines.append(json.dumps({"path": doc["images"][0]["file_name"], "boxes": "[not json"}))
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(lines) + "\n")
    cfg = DataConfig.model_validate(
        {
            "source": str(source),
            "fields": {**KIND, "image": "path", "objects": "boxes"},
            "split": {"validation": 0.0},
            "badRows": {"maxRatio": 0.5},
        }
    )
    data = prepare_detection(cfg, tmp_path / "work")
    assert len(data.train) == 6
    used = {names[a["category_id"]] for a in doc["annotations"]}
    assert data.category_names == sorted(used)  # rows name their categories: sorted names are the ids
    [bad] = data.report.bad_rows.lines
    assert bad.line == 7
    assert "field 'boxes': not a JSON list" in bad.reason


def test_a_failed_preparation_writes_the_report_naming_the_bad_rows(tmp_path: Path) -> None:
    make_shapes_coco(tmp_path, 10, seed=7)
    doc = _coco(tmp_path)
    for image in doc["images"][:4]:
        (tmp_path / image["file_name"]).write_bytes(b"not a png")
    source = _write_coco(tmp_path, doc)
    cfg = DataConfig.model_validate({"source": str(source), "fields": KIND, "badRows": {"maxRatio": 0.2}})
    with pytest.raises(DataError, match=r"4 of 10 rows are malformed") as refused:
        prepare_detection(cfg, tmp_path / "work", store=tmp_path / "store")
    assert refused.value.reason == "TooManyBadRows"
    report = json.loads((tmp_path / "work" / "data_report.json").read_text())
    assert (report["badRows"]["count"], report["badRows"]["total"]) == (4, 10)
    named = {line["line"]: line["reason"] for line in report["badRows"]["lines"]}
    assert sorted(named) == [1, 2, 3, 4]
    assert doc["images"][0]["file_name"] in named[1]
    assert "cannot decode the image" in named[1]
    assert report["provenance"]["sources"][0]["uri"] == str(source)
    assert (tmp_path / "work" / "provenance.json").is_file()
    assert [p.name for p in (tmp_path / "store").iterdir()] == []  # nothing half-written is left


def test_a_second_preparation_reuses_the_cached_folder_and_a_changed_image_does_not(tmp_path: Path) -> None:
    source = make_shapes_coco(tmp_path / "data", 12, seed=8)
    cfg = DataConfig.model_validate({"source": str(source), "fields": KIND, "split": {"validation": 0.25}})
    store = tmp_path / "store"
    first = prepare_detection(cfg, tmp_path / "a", store=store)
    again = prepare_detection(cfg, tmp_path / "b", store=store)
    assert first.report.cache is not None
    assert again.report.cache is not None
    assert (first.report.cache.reused, again.report.cache.reused) == (False, True)
    assert first.folder is not None
    assert again.folder == first.folder
    assert first.folder.parent == store
    assert again.report.cache.key == first.report.cache.key
    assert first.report.cache.key.startswith("detection-")
    assert json.loads((first.folder / "meta.json").read_text())["key"] == first.report.cache.key
    assert (again.train, again.validation, again.category_names) == (
        first.train,
        first.validation,
        first.category_names,
    )
    assert json.loads((tmp_path / "b" / "data_report.json").read_text())["cache"]["reused"] is True
    # An image edited in place (same annotation file, same name) is other data: prepared anew.
    image = tmp_path / "data" / _coco(tmp_path / "data")["images"][0]["file_name"]
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    changed = prepare_detection(cfg, tmp_path / "c", store=store)
    assert changed.report.cache is not None
    assert changed.report.cache.reused is False
    assert changed.folder != first.folder
    # Another data.images limit is another config: prepared anew too.
    limited = DataConfig.model_validate({**cfg.model_dump(by_alias=True), "images": {"maxSize": 200}})
    other = prepare_detection(limited, tmp_path / "d", store=store)
    assert other.report.cache is not None
    assert other.report.cache.reused is False


def test_data_images_limits_apply_to_detection_images_as_to_classification(tmp_path: Path) -> None:
    make_shapes_coco(tmp_path, 10, seed=9)
    doc = _coco(tmp_path)
    grey = tmp_path / doc["images"][0]["file_name"]
    Image.open(grey).convert("L").save(grey)
    source = _write_coco(tmp_path, doc)
    base = {"source": str(source), "fields": KIND, "split": {"validation": 0.0}}

    converted = prepare_detection(DataConfig.model_validate(base), tmp_path / "convert")
    assert len(converted.train) == 10  # mode convert (the default): the greyscale image is kept

    refuse = DataConfig.model_validate({**base, "images": {"mode": "refuse"}, "badRows": {"maxRatio": 0.2}})
    refused = prepare_detection(refuse, tmp_path / "refuse")
    [bad] = refused.report.bad_rows.lines
    assert bad.line == 1
    assert "colour mode L is not RGB (data.images.mode: refuse)" in bad.reason
    assert str(grey) in bad.reason
    assert len(refused.train) == 9

    small = DataConfig.model_validate({**base, "images": {"maxSize": 64}})
    with pytest.raises(
        DataError, match=r"10 of 10 rows are malformed.*96x96 pixels is above data.images.maxSize 64"
    ):
        prepare_detection(small, tmp_path / "small")
    large = DataConfig.model_validate({**base, "images": {"minSize": 128}, "badRows": {"maxRatio": 1.0}})
    with pytest.raises(DataError, match="train split is empty"):
        prepare_detection(large, tmp_path / "large")
    reasons = [
        line["reason"]
        for line in json.loads((tmp_path / "large" / "data_report.json").read_text())["badRows"]["lines"]
    ]
    assert len(reasons) == 10
    assert all("below data.images.minSize 128" in r for r in reasons)


def test_an_image_in_the_validation_source_and_the_training_source_stays_held_out(tmp_path: Path) -> None:
    make_shapes_coco(tmp_path, 12, seed=10)
    doc = _coco(tmp_path)
    ids = {image["id"] for image in doc["images"][:3]}
    kept = [a for a in doc["annotations"] if a["image_id"] in ids]
    held_out = {**doc, "images": doc["images"][:3], "annotations": kept}
    (tmp_path / "validation.json").write_text(json.dumps(held_out))
    source = _write_coco(tmp_path, doc)  # all 12 images, the 3 validation images among them
    cfg = DataConfig.model_validate(
        {
            "source": str(source),
            "fields": KIND,
            "split": {"validationSource": str(tmp_path / "validation.json")},
        }
    )
    data = prepare_detection(cfg, tmp_path / "work")
    held = {e["image"] for e in data.validation}
    assert held == {str(tmp_path / image["file_name"]) for image in doc["images"][:3]}
    assert len(data.train) == 9
    assert not held & {e["image"] for e in data.train + data.test}
    assert data.report.removed_by_reason() == {"duplicate": 3}


def test_training_images_are_augmented_with_their_boxes_deterministically(tmp_path: Path) -> None:
    source = make_shapes_coco(tmp_path, 12, seed=6)
    cfg = DataConfig.model_validate({"source": str(source), "fields": KIND, "split": {"validation": 0.3}})
    data = prepare_detection(cfg, tmp_path / "work")
    augmentation = ImageAugmentationConfig.model_validate(
        {"horizontalFlip": True, "randomResizedCrop": True, "rotationDegrees": 20, "colorJitter": 0.3}
    )
    cpu = torch.device("cpu")

    def batch(examples: list[Any], epoch: int) -> dict[str, torch.Tensor]:
        return collate_detection(examples, cpu, augmentation, seed=3, epoch=epoch)

    train = data.train[:4]
    first, again, other = batch(train, 0), batch(train, 0), batch(train, 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["images"], other["images"])
    assert not torch.equal(first["images"], collate_detection(train, cpu)["images"])
    for b in (first, other):
        kept = b["labels"] >= 0
        boxes = b["boxes"][kept]
        assert (boxes[:, 2] > boxes[:, 0]).all()
        assert (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all()
        assert (boxes <= 96).all()
    held_out = data.validation[:2]
    assert all(torch.equal(batch(held_out, 0)[k], collate_detection(held_out, cpu)[k]) for k in first)


def test_evaluation_loss_moves_no_batchnorm_statistics() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    module.eval()
    before = module[1].running_mean.clone()  # type: ignore[union-attr]
    with training_mode_without_statistics(module), torch.no_grad():
        assert module.training
        assert not module[1].training
        module(torch.randn(2, 3, 8, 8) + 5)
    assert torch.equal(module[1].running_mean, before)  # type: ignore[union-attr]
    assert not module.training
    assert not module[0].training


def test_map_is_one_for_perfect_detections_and_zero_for_none() -> None:
    truth = np.array([[10, 10, 40, 40], [50, 50, 90, 80]], dtype=np.float32)
    labels = np.array([0, 2], dtype=np.int16)
    perfect = {
        "boxes": truth,
        "scores": np.array([0.9, 0.8], dtype=np.float32),
        "labels": labels,
        "gt_boxes": truth,
        "gt_labels": labels,
    }
    assert mean_average_precision([perfect]) == {"map": 1.0, "map50": 1.0, "map75": 1.0}
    nothing = {
        **perfect,
        "boxes": np.zeros((0, 4), np.float32),
        "scores": np.zeros(0, np.float32),
        "labels": np.zeros(0, np.int16),
    }
    assert mean_average_precision([nothing]) == {"map": 0.0, "map50": 0.0, "map75": 0.0}


def test_lora_and_hub_models_are_refused_for_detection(tmp_path: Path) -> None:
    model = make_detector_folder(tmp_path / "model")
    data = tmp_path / "annotations.json"
    with pytest.raises(ValueError, match="object-detection, recommendation train the full model only"):
        TrainerConfig.model_validate(detection_config(tmp_path, model, data, method="lora"))
    hub_config = detection_config(tmp_path, model, data)
    hub_config["model"] = {"path": "hf://facebook/detr-resnet-50"}
    hub = TrainerConfig.model_validate(hub_config)
    with pytest.raises(ConfigError, match="local detector folder"):
        make_task(hub)


@pytest.mark.slow
def test_fcos_learns_shapes_through_the_entrypoint_and_is_served(tmp_path: Path) -> None:
    data = make_shapes_coco(tmp_path / "data", 280, seed=0)
    model = make_detector_folder(tmp_path / "model")
    config = trained_detection_config(tmp_path, model, data)
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["validation"], metrics["after"]["validation"]
    print(f"object-detection validation before {before} -> after {after}")
    assert set(after) == {"loss", "map", "map50", "map75"}
    assert after["loss"] < 0.7 * before["loss"]
    assert after["map50"] >= before["map50"] + 0.2
    assert after["map"] > before["map"]

    # The artifact: detector folder + serving files; the card draws sample detections.
    for name in ("config.json", "model.safetensors", "serving.json", "sha256sums.json"):
        assert (out / "model" / name).is_file(), name
    assert metrics["artifact"]["format"] == "full"
    assert json.loads((out / "model" / "config.json").read_text())["categories"] == list(CATEGORIES)
    card = (out / "README.md").read_text()
    assert "## Sample detections" in card
    assert "sample_detections.png" in card
    with Image.open(out / "sample_detections.png") as plot:
        assert plot.width > plot.height > 0
    assert len(metrics["samples"]) > 0

    _served_detections(out / "model", metrics["samples"][0]["image"])


def _served_detections(model_dir: Path, image_path: str) -> None:
    """The server's loader for the task loads the artifact and answers /v1/predict with boxes."""
    from fastapi.testclient import TestClient

    from finetune_server.app import create_app
    from finetune_server.config import ServerConfig
    from finetune_server.models import MODEL_KINDS

    config = ServerConfig.model_validate(
        {"modelDir": str(model_dir), "modelName": "shapes", "auth": {"mode": "none"}}
    )
    model = MODEL_KINDS["object-detection"](config)
    model.load()
    assert model.ready, model.status.message
    image = base64.b64encode(Path(image_path).read_bytes()).decode()
    with TestClient(create_app(config, model)) as client:
        answer = client.post("/v1/predict", json={"model": "shapes", "inputs": [image]})
        assert answer.status_code == 200, answer.text
        [prediction] = answer.json()["predictions"]
        assert prediction["boxes"]
        assert len(prediction["boxes"]) == len(prediction["labels"])
        assert set(prediction["labels"]) <= set(CATEGORIES)
        assert all(0.0 <= s <= 1.0 for s in prediction["scores"])
        refused = client.post("/v1/predict", json={"model": "shapes", "inputs": ["bm90IGFuIGltYWdl"]})
        assert refused.status_code == 400
        assert "inputs[0]" in refused.text


def test_the_example_manifest_is_accepted_by_the_api_and_its_config_by_the_trainer() -> None:
    import yaml

    from finetune_operator.api import parse_finetunejob
    from finetune_operator.builders.trainer_config import validated_trainer_config

    example = Path(__file__).parents[2] / "examples" / "finetunejob-object-detection.yaml"
    body = yaml.safe_load(example.read_text())
    body["metadata"]["namespace"] = "vision"  # the API server sets it on apply
    job = parse_finetunejob(body)
    cfg = validated_trainer_config(job, shutdown_timeout_seconds=60)
    assert cfg.task.value == "object-detection"
    assert cfg.data.fields.kind == "object-detection"
    assert cfg.evaluation.metrics == ["loss", "map", "map50", "map75"]
    assert cfg.data.source.endswith("annotations.json")
    task = make_task(cfg)
    assert task.name == "object-detection"
