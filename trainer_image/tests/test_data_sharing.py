"""Prepared once, shared and reused: one rank prepares and the others memory-map its result; a restarted
attempt reuses the cache; an edited source or config never does; a failure ends every rank with exit 4.
Object-detection data is shared the same way: rank 0 opens the images, the others read its result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from detection_shapes import KIND, make_shapes_coco
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.pipeline import prepare
from finetune_trainer.data.sharing import PreparationLostError, status_path, wait_for
from finetune_trainer.exit_codes import ExitCode
from tiny_tokenizer import make_tiny_tokenizer
from trainer_fixtures import (
    make_config,
    make_task_data,
    make_tiny_model,
    run_trainer,
    trainer_env,
    write_config,
)

RANK = Path(__file__).with_name("data_rank.py")


def _data(path: Path, rows: int, start: int = 0) -> Path:
    with path.open("a", encoding="utf-8") as handle:
        for i in range(start, start + rows):
            handle.write(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n")
    return path


def _rank(config: dict[str, Any], store: Path, attempt: str, role: str, workdir: Path, *hold: str) -> Any:
    return subprocess.Popen(
        [sys.executable, str(RANK), json.dumps(config), str(store), attempt, role, str(workdir), *hold],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=trainer_env(),
    )


def _finish(process: Any) -> tuple[int, dict[str, Any]]:
    code, result, _ = _finish_with_log(process)
    return code, result


def _finish_with_log(process: Any) -> tuple[int, dict[str, Any], str]:
    """Exit code, the rank's JSON line and its log (stderr, at the trainer's INFO level)."""
    out, err = process.communicate(timeout=300)
    assert out.strip(), err[-3000:]
    return process.returncode, json.loads(out.strip().splitlines()[-1]), err


def _one_prepares_one_waits(
    config: dict[str, Any], store: Path, tmp: Path, *, waits_first: bool = False
) -> tuple[tuple[int, dict[str, Any]], tuple[int, dict[str, Any]]]:
    """Two ranks of attempt a1 on one store: the waiting one (workdir w1) and the preparing one (w0); with
    ``waits_first`` the waiting rank starts a second earlier and must still be waiting. Their results, the
    preparing rank's first."""
    waiting = _rank(config, store, "a1", "wait", tmp / "w1")
    if waits_first:
        time.sleep(1.0)
        assert waiting.poll() is None
    preparing = _rank(config, store, "a1", "prepare", tmp / "w0")
    return _finish(preparing), _finish(waiting)


def _entries(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name != "attempts")


def test_two_ranks_prepare_once_the_second_waits_and_maps_the_first_result(tmp_path: Path) -> None:
    config = {"source": str(_data(tmp_path / "d.jsonl", 400))}
    store = tmp_path / "store"
    (code0, first), (code1, second) = _one_prepares_one_waits(config, store, tmp_path, waits_first=True)
    assert (code0, code1) == (0, 0)
    assert second["train"] == first["train"]
    assert len(first["train"]) > 300
    assert second["folder"] == first["folder"]
    assert second["key"] == first["key"]
    assert second["seconds"] > first["seconds"]  # it waited for the whole preparation
    assert _entries(store) == [first["key"]]  # one preparation, nothing half-written left
    assert (tmp_path / "w0" / "data_report.json").is_file()
    assert not (tmp_path / "w1").exists()  # the waiting rank writes nothing


def test_a_sigkilled_attempt_is_restarted_and_reuses_the_cache(tmp_path: Path) -> None:
    config = {"source": str(_data(tmp_path / "d.jsonl", 300))}
    store = tmp_path / "store"
    first = _rank(config, store, "a1", "prepare", tmp_path / "w", "--hold")
    try:
        assert first.stdout is not None
        prepared = json.loads(first.stdout.readline())  # prepared; now "training"
    finally:
        first.send_signal(signal.SIGKILL)  # also when it failed: --hold would keep it for an hour
    _, first_log = first.communicate(timeout=30)
    code, restarted, log = _finish_with_log(_rank(config, store, "a2", "prepare", tmp_path / "w"))
    assert code == 0
    assert restarted["reused"] is True
    assert prepared["reused"] is False
    pipeline = "finetune_trainer.data.pipeline"
    assert f"{pipeline}: reusing the prepared data in {restarted['folder']}" in log
    assert "reusing" not in first_log
    assert f"{pipeline}: prepared the data into {prepared['folder']}" in first_log
    assert restarted["train"] == prepared["train"]
    assert restarted["key"] == prepared["key"]
    report = json.loads((tmp_path / "w" / "data_report.json").read_text())
    assert report["cache"] == {"key": prepared["key"], "folder": restarted["folder"], "reused": True}


def test_a_rank_killed_while_preparing_fails_its_waiters_and_the_restart_prepares_anew(
    tmp_path: Path,
) -> None:
    config = {"source": str(_data(tmp_path / "d.jsonl", 30_000)), "maxSeqLength": 64}
    store = tmp_path / "store"
    killed = _rank(config, store, "a1", "prepare", tmp_path / "w")
    deadline = time.monotonic() + 120
    while not list(store.glob(".*.tmp/work/read.arrow")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert killed.poll() is None, "the preparation ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    with pytest.raises(PreparationLostError, match="stopped without a result"):
        wait_for(store, "a1", stale_seconds=0.5)
    code, restarted = _finish(_rank(config, store, "a2", "prepare", tmp_path / "w"))
    assert code == 0
    assert restarted["reused"] is False
    assert _entries(store) == [restarted["key"]]  # the killed attempt's half-written folder is gone


def test_an_edited_source_or_config_invalidates_the_cache(tmp_path: Path) -> None:
    source = _data(tmp_path / "d.jsonl", 200)
    store = tmp_path / "store"
    tokenizer = make_tiny_tokenizer()

    def run(**overrides: Any) -> Any:
        cfg = DataConfig.model_validate({"source": str(source), **overrides})
        return prepare(cfg, tokenizer, tmp_path / "w", store=store).report.cache

    first = run()
    again = run()
    assert (first.reused, again.reused, again.key) == (False, True, first.key)
    _data(source, 1, start=200)  # one appended row
    edited = run()
    assert edited.reused is False
    assert edited.key != first.key
    other_config = run(maxSeqLength=512)
    assert other_config.reused is False
    assert other_config.key not in (first.key, edited.key)
    assert run(maxSeqLength=512).reused is True
    other_tokenizer = make_tiny_tokenizer(extra_chars="é")
    cfg = DataConfig.model_validate({"source": str(source)})
    assert prepare(cfg, other_tokenizer, tmp_path / "w", store=store).report.cache.key != edited.key


def test_a_failure_on_the_preparing_rank_ends_the_waiting_rank_with_its_data_error(tmp_path: Path) -> None:
    source = _data(tmp_path / "d.jsonl", 40)
    source.write_text(source.read_text() + "{broken\n" * 5)
    config = {"source": str(source)}
    store = tmp_path / "store"
    (code0, first), (code1, second) = _one_prepares_one_waits(config, store, tmp_path)
    assert code0 == code1 == 4
    assert first == second
    assert first["reason"] == "TooManyBadRows"
    assert "5 of 45 rows are malformed" in second["error"]
    report = json.loads((tmp_path / "w0" / "data_report.json").read_text())
    assert report["badRows"]["count"] == 5
    assert json.loads(status_path(store, "a1").read_text())["status"] == "failed"


def test_detection_data_is_prepared_by_one_rank_and_read_by_the_other(tmp_path: Path) -> None:
    annotations = make_shapes_coco(tmp_path / "shapes", 40)
    config = {"source": str(annotations), "fields": KIND, "split": {"validation": 0.2, "seed": 1}}
    store = tmp_path / "store"
    (code0, first), (code1, second) = _one_prepares_one_waits(config, store, tmp_path, waits_first=True)
    assert (code0, code1) == (0, 0)
    assert second["train"] == first["train"]
    assert second["validation"] == first["validation"]
    assert len(first["train"]) + len(first["validation"]) == 40
    assert all(example["boxes"] and example["labels"] for example in first["train"])
    assert second["categories"] == first["categories"] == ["square", "circle", "triangle"]
    assert second["report"] == first["report"]
    assert second["folder"] == first["folder"]
    assert second["seconds"] > first["seconds"]  # it waited for the whole preparation
    assert _entries(store) == [Path(first["folder"]).name]  # one folder, nothing half-written left
    assert (store / _entries(store)[0] / "READY").is_file()
    assert (tmp_path / "w0" / "data_report.json").is_file()
    assert not (tmp_path / "w1").exists()  # the waiting rank opened no image and writes nothing


def test_a_detection_data_error_on_the_preparing_rank_ends_the_waiting_rank_with_it(tmp_path: Path) -> None:
    annotations = make_shapes_coco(tmp_path / "shapes", 10)
    for png in sorted((tmp_path / "shapes" / "images").glob("*.png"))[:5]:
        png.write_bytes(b"not a png")
    config = {"source": str(annotations), "fields": KIND, "split": {"validation": 0.2, "seed": 1}}
    store = tmp_path / "store"
    (code0, first), (code1, second) = _one_prepares_one_waits(config, store, tmp_path)
    assert code0 == code1 == 4
    assert first == second
    assert first["reason"] == "TooManyBadRows"
    assert json.loads(status_path(store, "a1").read_text())["status"] == "failed"
    assert _entries(store) == []


@pytest.mark.slow
def test_a_data_error_ends_both_trainer_ranks_with_exit_4_and_the_report(tmp_path: Path) -> None:
    """Two ranks under torchrun, as in a pod: rank 0 finds too many bad rows while rank 1 waits for its
    result; both end with the data error (each rank logs its own code), the pod with exit code 4."""
    model_dir = make_tiny_model(tmp_path / "model", hidden=16, layers=1)
    data = make_task_data(tmp_path / "data" / "train.jsonl", rows=40)
    data.write_text(data.read_text() + "{not json\n" * 4)
    config = write_config(tmp_path, make_config(tmp_path, model_dir, data))
    result = run_trainer(config, PET_NPROC_PER_NODE="2")
    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} failed (exit code 4): DataError: 4 of 44 rows are malformed" in result.stderr
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["badRows"]["count"] == 4


@pytest.mark.parametrize("modality", ["images", "detection"])
def test_near_dedup_of_image_data_is_refused_with_a_report_and_the_waiting_rank_gets_it(
    tmp_path: Path, modality: str
) -> None:
    """Images are de-duplicated by their bytes: `dedup.near` is a data error the preparing rank reports
    (data_report.json) and publishes, so a waiting rank ends with it instead of waiting."""
    from finetune_trainer.data.detection import prepare_detection
    from finetune_trainer.data.errors import DataError
    from finetune_trainer.data.images import prepare_images

    if modality == "images":
        fields: dict[str, Any] = {"kind": "image-classification"}
        prepare_fn: Any = prepare_images
    else:
        fields, prepare_fn = KIND, prepare_detection
    cfg = DataConfig.model_validate(
        {"source": str(tmp_path / "data"), "fields": fields, "dedup": {"near": True}}
    )
    store = tmp_path / "store"
    with pytest.raises(DataError, match=r"data\.dedup\.near") as refused:
        prepare_fn(cfg, tmp_path / "w0", store=store, attempt="a1")
    assert refused.value.reason == "InvalidConfig"
    assert (tmp_path / "w0" / "data_report.json").is_file()
    with pytest.raises(DataError, match=r"data\.dedup\.near") as waited:
        prepare_fn(cfg, tmp_path / "w1", store=store, attempt="a1", wait=True)
    assert (waited.value.reason, str(waited.value)) == (refused.value.reason, str(refused.value))
