"""The split: deterministic, seed-dependent, stable when rows are appended; explicit split sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.data.config import DataConfig, SplitConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pipeline import PreparedData, prepare
from finetune_trainer.data.split import assign_split, split_point
from tiny_tokenizer import make_tiny_tokenizer

TOKENIZER = make_tiny_tokenizer()


def _rows(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"id": i, "prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(start, stop)]


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(workdir: Path, source: str, **overrides: Any) -> PreparedData:
    cfg = DataConfig.model_validate({"source": source, **overrides})
    return prepare(cfg, TOKENIZER, workdir)


def _membership(prepared: PreparedData) -> dict[str, str]:
    """Prompt text → split, decoded from the token ids."""
    where = {}
    for name in ("train", "validation", "test"):
        for example in getattr(prepared, name):
            text = TOKENIZER.decode(example["input_ids"])
            where[text.split("\n", 1)[0]] = name
    return where


def test_split_is_deterministic(tmp_path: Path) -> None:
    source = _write(tmp_path / "d.jsonl", _rows(0, 300))
    first = _prepare(tmp_path / "a", source, split={"validation": 0.1, "test": 0.1})
    second = _prepare(tmp_path / "b", source, split={"validation": 0.1, "test": 0.1})
    assert first.train == second.train
    assert first.validation == second.validation
    assert first.test == second.test


def test_appending_rows_never_moves_existing_rows(tmp_path: Path) -> None:
    split = {"validation": 0.15, "test": 0.15, "seed": 7}
    before = _membership(_prepare(tmp_path / "a", _write(tmp_path / "v1.jsonl", _rows(0, 200)), split=split))
    after = _membership(_prepare(tmp_path / "b", _write(tmp_path / "v2.jsonl", _rows(0, 400)), split=split))
    assert len(before) == 200
    assert len(after) == 400
    moved = {prompt: (name, after[prompt]) for prompt, name in before.items() if after[prompt] != name}
    assert moved == {}
    # Appended rows land in every split, so the test above is not vacuous.
    assert {after[p] for p in after if p not in before} == {"train", "validation", "test"}


def test_reordering_rows_does_not_change_the_split(tmp_path: Path) -> None:
    rows = _rows(0, 150)
    split = {"validation": 0.2, "test": 0.2}
    forward = _membership(_prepare(tmp_path / "a", _write(tmp_path / "f.jsonl", rows), split=split))
    backward = _membership(_prepare(tmp_path / "b", _write(tmp_path / "r.jsonl", rows[::-1]), split=split))
    assert forward == backward


def test_seed_changes_the_assignment_and_ratios_are_respected() -> None:
    keys = [f"content:{i}" for i in range(4000)]
    cfg = SplitConfig(validation=0.1, test=0.2, seed=1)
    assigned = [assign_split(k, cfg) for k in keys]
    share = {name: assigned.count(name) / len(keys) for name in ("validation", "test", "train")}
    assert share["validation"] == pytest.approx(0.1, abs=0.03)
    assert share["test"] == pytest.approx(0.2, abs=0.03)
    reseeded = [assign_split(k, cfg.model_copy(update={"seed": 2})) for k in keys]
    assert reseeded != assigned
    assert 0.0 <= split_point("k", 0) < 1.0


def test_id_column_keys_the_split_so_edited_rows_stay_put(tmp_path: Path) -> None:
    rows = _rows(0, 200)
    split = {"validation": 0.2, "test": 0.2}
    fields = {"id": "id"}
    original = _prepare(tmp_path / "a", _write(tmp_path / "a.jsonl", rows), split=split, fields=fields)
    edited_rows = [{**r, "completion": r["completion"] + " (edited)"} for r in rows]
    edited = _prepare(tmp_path / "b", _write(tmp_path / "b.jsonl", edited_rows), split=split, fields=fields)
    assert _membership(original) == _membership(edited)


def test_explicit_validation_and_test_sources(tmp_path: Path) -> None:
    main = _write(tmp_path / "train.jsonl", _rows(0, 100))
    validation = _write(tmp_path / "val.jsonl", _rows(100, 110))
    # A test row that also appears in the main file: it stays in test and is removed from train (no leakage).
    test = _write(tmp_path / "test.jsonl", _rows(110, 118) + _rows(5, 6))
    prepared = _prepare(
        tmp_path / "w", main, split={"validationSource": validation, "testSource": test, "validation": 0.5}
    )
    assert len(prepared.validation) == 10
    assert len(prepared.test) == 9
    assert len(prepared.train) == 99
    membership = _membership(prepared)
    assert membership["Question 5?"] == "test"
    assert {s.role for s in prepared.report.provenance.sources} == {"main", "validation", "test"}
    dedup = next(s for s in prepared.report.stages if s.name == "dedup")
    assert dedup.removed == {"exact_duplicate": 1}


def test_an_empty_held_out_split_is_a_data_error(tmp_path: Path) -> None:
    source = _write(tmp_path / "d.jsonl", _rows(0, 2))
    with pytest.raises(DataError) as info:
        _prepare(tmp_path / "w", source, split={"validation": 0.01, "test": 0.0})
    assert info.value.reason == "EmptySplit"
    assert "validation" in str(info.value)
