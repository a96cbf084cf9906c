"""Interactions: rows, bad rows named, id maps, the leave-last-out split, negative sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from finetune_trainer.data.config import DataConfig, NegativeSamplingConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.interactions import prepare_interactions, sample_negatives
from recommendation_fixtures import make_interactions


def _config(source: Path, **extra: object) -> DataConfig:
    fields = {"kind": "interactions", "rating": "rating", "timestamp": "timestamp"}
    return DataConfig.model_validate({"source": str(source), "fields": fields, **extra})


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("user,item,rating,timestamp\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_leave_last_out_by_time_per_user(tmp_path: Path) -> None:
    # Rows out of time order; u2 has only two interactions; u1 repeats item a (the later one is kept).
    source = _csv(
        tmp_path / "data.csv",
        [
            "u1,c,1,30",
            "u1,a,1,10",
            "u1,b,2,20",
            "u1,d,1,40",
            "u1,a,5,50",  # repeated pair: the interaction at 50 wins, so a is u1's last (test) item
            "u2,b,1,5",
            "u2,c,1,6",
            "u3,d,1,1",
            "u3,c,1,1",  # a tie at t=1: row order decides (c after d)
            "u3,b,1,2",
        ],
    )
    prepared = prepare_interactions(_config(source), tmp_path / "work")
    users, items = prepared.user_ids, prepared.item_ids
    assert users == ["u1", "u2", "u3"]
    assert items == ["a", "b", "c", "d"]

    def named(split: object) -> list[tuple[str, str]]:
        return [(users[e["user"]], items[e["item"]]) for e in split]  # type: ignore[attr-defined]

    assert sorted(named(prepared.test)) == [("u1", "a"), ("u3", "b")]
    assert sorted(named(prepared.validation)) == [("u1", "d"), ("u3", "c")]
    assert sorted(named(prepared.train)) == [("u1", "b"), ("u1", "c"), ("u2", "b"), ("u2", "c"), ("u3", "d")]
    # The ranking leaves out the training items, and at test time the validation item too.
    test_u1 = next(e for e in prepared.test if users[e["user"]] == "u1")
    assert sorted(items[i] for i in test_u1["seen"]) == ["b", "c", "d"]
    val_u1 = next(e for e in prepared.validation if users[e["user"]] == "u1")
    assert sorted(items[i] for i in val_u1["seen"]) == ["b", "c"]
    assert prepared.item_counts.tolist() == [0, 2, 2, 1]  # train popularity of a, b, c, d
    record = prepared.report.interactions
    assert record is not None
    assert (record.held_out_users, record.train_only_users) == (2, 1)
    assert record.interactions == {"train": 5, "validation": 2, "test": 2}
    removed = prepared.report.removed_by_reason()
    assert removed == {"repeated_pair": 1}
    assert json.loads((tmp_path / "work" / "data_report.json").read_text())["interactions"]["users"] == 3


def test_split_is_deterministic_and_independent_of_row_order(tmp_path: Path) -> None:
    source = make_interactions(tmp_path / "a.csv", users=40, items=30, seed=3)
    lines = source.read_text().splitlines()
    shuffled = tmp_path / "b.csv"
    shuffled.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    first = prepare_interactions(_config(source), tmp_path / "w1")
    second = prepare_interactions(_config(shuffled), tmp_path / "w2")
    for split in ("train", "validation", "test"):
        a = sorted((e["user"], e["item"]) for e in getattr(first, split))
        b = sorted((e["user"], e["item"]) for e in getattr(second, split))
        assert a == b, split


def test_bad_rows_are_named_with_line_and_column(tmp_path: Path) -> None:
    good = [f"u{i % 4},i{i},1,{i}" for i in range(40)]
    source = _csv(
        tmp_path / "data.csv", [*good[:10], ",i99,1,5", "u1,i98,lots,5", "u2,i97,1,yesterday", *good[10:]]
    )
    with pytest.raises(DataError) as refused:
        prepare_interactions(_config(source), tmp_path / "work")
    message = str(refused.value)
    assert refused.value.reason == "TooManyBadRows"
    assert "data.csv:12: missing field 'user'" in message
    assert "data.csv:13: field 'rating' must be a number, got 'lots'" in message
    assert "data.csv:14: field 'timestamp' must be a number, got 'yesterday'" in message
    report = json.loads((tmp_path / "work" / "data_report.json").read_text())
    assert [b["line"] for b in report["badRows"]["lines"]] == [12, 13, 14]
    # Within the tolerated ratio, the same rows are skipped and counted.
    prepared = prepare_interactions(_config(source, badRows={"maxRatio": 0.1}), tmp_path / "work2")
    assert prepared.report.bad_rows.count == 3
    assert sum(prepared.report.interactions.interactions.values()) == 40  # type: ignore[union-attr]


def test_a_second_preparation_reuses_the_published_folder(tmp_path: Path) -> None:
    source = _csv(tmp_path / "data.csv", [f"u{i % 5},i{i % 7},1,{i}" for i in range(60)])
    store = tmp_path / "store"
    first = prepare_interactions(_config(source), tmp_path / "w1", store=store)
    again = prepare_interactions(_config(source), tmp_path / "w2", store=store)
    assert first.report.cache is not None
    assert again.report.cache is not None
    assert (first.report.cache.reused, again.report.cache.reused) == (False, True)
    assert first.folder is not None
    assert again.folder == first.folder
    assert first.folder.name.startswith("interactions-")
    assert sorted(p.name for p in first.folder.iterdir()) == [
        "READY",
        "id_maps.json",
        "interactions.npz",
        "meta.json",
    ]
    assert [p.name for p in store.iterdir()] == [first.folder.name]  # no temporary folder left
    assert json.loads((first.folder / "meta.json").read_text())["key"] == first.folder.name
    assert np.array_equal(again.train.items, first.train.items)
    assert json.loads((tmp_path / "w2" / "data_report.json").read_text())["cache"]["reused"] is True
    # Another run's seed (negatives are drawn when examples are loaded) is the same prepared data.
    reseeded = _config(source, augmentation={"seed": 7, "negatives": {"strategy": "uniform", "count": 2}})
    other_run = prepare_interactions(reseeded, tmp_path / "w4", store=store)
    assert other_run.report.cache is not None
    assert other_run.report.cache.reused is True
    # An edited source is other data.
    _csv(source, [f"u{i % 5},i{i % 6},1,{i}" for i in range(60)])
    edited = prepare_interactions(_config(source), tmp_path / "w3", store=store)
    assert edited.report.cache is not None
    assert edited.report.cache.reused is False


def test_parquet_with_integer_ids_and_non_positive_ratings(tmp_path: Path) -> None:
    table = pa.table(
        {
            "customer": [1, 1, 1, 2, 2, 2, 2],
            "product": [10, 11, 12, 10, 11, 13, 14],
            "clicks": [1.0, 2.0, 1.0, 0.0, 3.0, 1.0, 1.0],
        }
    )
    pq.write_table(table, tmp_path / "clicks.parquet")
    cfg = DataConfig.model_validate(
        {
            "source": str(tmp_path / "clicks.parquet"),
            "fields": {"kind": "interactions", "user": "customer", "item": "product", "rating": "clicks"},
        }
    )
    prepared = prepare_interactions(cfg, tmp_path / "work")
    assert prepared.user_ids == ["1", "2"]
    assert prepared.report.removed_by_reason() == {"non_positive_rating": 1}
    assert prepared.report.interactions is not None
    assert prepared.report.interactions.ordered_by == "row order"
    # Without a timestamp, row order: user 2's last rows (13, 14) are validation and test.
    assert sorted(prepared.item_ids[e["item"]] for e in prepared.test) == ["12", "14"]


def test_no_user_with_three_interactions_is_an_empty_split(tmp_path: Path) -> None:
    source = _csv(tmp_path / "d.csv", ["u1,a,1,1", "u1,b,1,2", "u2,a,1,1"])
    with pytest.raises(DataError, match="no user has 3 or more interactions") as refused:
        prepare_interactions(_config(source), tmp_path / "work")
    assert refused.value.reason == "EmptySplit"


def test_split_ratios_are_refused_for_interactions(tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match=r"data\.split validation: interactions are split leave-last-out"
    ):
        _config(tmp_path / "x.csv", split={"validation": 0.1})
    assert _config(tmp_path / "x.csv", split={"seed": 7}).split.seed == 7


def _negatives(prepared: object, strategy: str, epoch: int, seed: int = 1) -> np.ndarray:
    train = prepared.train  # type: ignore[attr-defined]
    return sample_negatives(
        np.arange(len(train)),
        train.users,
        config=NegativeSamplingConfig(strategy=strategy, count=5),  # type: ignore[arg-type]
        seed=seed,
        epoch=epoch,
        item_counts=prepared.item_counts,  # type: ignore[attr-defined]
        seen_keys=prepared.seen_keys(),  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_negative_sampling_is_seeded_per_epoch_and_avoids_training_items(
    tmp_path: Path, strategy: str
) -> None:
    prepared = prepare_interactions(
        _config(make_interactions(tmp_path / "d.csv", users=60, items=40, seed=5)), tmp_path / "w"
    )
    first = _negatives(prepared, strategy, epoch=0)
    assert first.shape == (len(prepared.train), 5)
    assert np.array_equal(first, _negatives(prepared, strategy, epoch=0))
    assert not np.array_equal(first, _negatives(prepared, strategy, epoch=1))
    assert not np.array_equal(first, _negatives(prepared, strategy, epoch=0, seed=2))
    # A batch draws the same negatives as the whole split (independent of batch composition).
    some = np.asarray([7, 3, 11])
    batch = sample_negatives(
        some,
        prepared.train.users[some],
        config=NegativeSamplingConfig(strategy=strategy, count=5),  # type: ignore[arg-type]
        seed=1,
        epoch=0,
        item_counts=prepared.item_counts,
        seen_keys=prepared.seen_keys(),
    )
    assert np.array_equal(batch, first[some])
    keys = set(prepared.seen_keys().tolist())
    users = prepared.train.users
    pairs = [(int(u), int(i)) for u, row in zip(users, first, strict=True) for i in row]
    assert not any(u * prepared.num_items + i in keys for u, i in pairs)


def test_popularity_sampling_follows_the_train_counts(tmp_path: Path) -> None:
    prepared = prepare_interactions(
        _config(make_interactions(tmp_path / "d.csv", users=200, items=60, seed=2)), tmp_path / "w"
    )
    drawn = np.concatenate([_negatives(prepared, "popularity", e).ravel() for e in range(4)])
    frequency = np.bincount(drawn, minlength=prepared.num_items) / len(drawn)
    expected = prepared.item_counts / prepared.item_counts.sum()
    popular, rare = np.argsort(-expected)[:5], np.argsort(expected)[:5]
    # Redraws of a user's own items bend it a little; the shape stays the train counts'.
    want = expected[popular].sum() / expected[rare].sum()
    got = frequency[popular].sum() / frequency[rare].sum()
    print(f"popular/rare draw ratio {got:.2f} (train counts {want:.2f})")
    assert want > 2.5
    assert got > 0.6 * want
    assert np.corrcoef(frequency, expected)[0, 1] > 0.9
    uniform = np.concatenate([_negatives(prepared, "uniform", e).ravel() for e in range(4)])
    spread = np.bincount(uniform, minlength=prepared.num_items) / len(uniform)
    assert spread.max() < 2.5 / prepared.num_items
