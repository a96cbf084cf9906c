"""User-item interactions (``data.fields.kind: interactions``): read, validate, index, split leave-last-out.

The generic stages do the reading: sources are resolved and hashed (:mod:`.sources`), read row by row with
their line numbers (:mod:`.formats`), malformed rows are logged and checked against ``badRows.maxRatio``
(:class:`.validation.BadRowLog`), and the outcome is a :class:`.report.DataReport`. What is particular to
interactions is here:

- a row maps to (user, item, rating, timestamp): user and item are strings or integers (an empty cell is
  missing), rating and timestamp numbers (a numeric string from CSV, or a parquet timestamp, counts); a row
  that breaks one of these is malformed and named with its file, line and column. A rating of 0 or below is
  not an interaction: removed and counted (``non_positive_rating``);
- a (user, item) pair seen again keeps only its latest interaction (``repeated_pair``), so a held-out item is
  never among the user's training items;
- id maps: users and items are indexed in sorted order of their ids (independent of row order);
- the split: each user's interactions ordered by timestamp (ties and no timestamp column: row order); a user
  with 3 or more gives the last to test and the one before to validation, the rest to train;
- :func:`sample_negatives`: negatives per training interaction drawn from (seed, epoch, interaction) alone.

Rank 0 prepares into ``store`` under a key of the config and the sources' bytes and publishes it; the other
ranks wait for it (:mod:`.sharing`), as for text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from finetune_trainer.data.compliance import check_licences, config_digest
from finetune_trainer.data.config import DataConfig, FieldMapping, NegativeSamplingConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import read_rows
from finetune_trainer.data.mapping import MappingError
from finetune_trainer.data.report import (
    DataReport,
    InteractionsRecord,
    PiiRecord,
    Provenance,
    SourceRecord,
    StageRecord,
)
from finetune_trainer.data.sharing import Plan, content_key, prepare_shared
from finetune_trainer.data.sources import ResolvedSource, resolve_source
from finetune_trainer.data.store import META, read_meta
from finetune_trainer.data.validation import BadRowLog

__all__ = [
    "MIN_HELD_OUT_INTERACTIONS",
    "HeldOut",
    "Interaction",
    "PreparedInteractions",
    "TrainInteractions",
    "map_interaction",
    "prepare_interactions",
    "sample_negatives",
]

log = logging.getLogger(__name__)

#: A user needs this many interactions to give one to test and one to validation (and keep one to train on).
MIN_HELD_OUT_INTERACTIONS = 3
#: Bumped whenever the stored layout or what the stages compute changes.
LAYOUT_VERSION = 1
#: Redraws of a negative that hit one of the user's training items.
NEGATIVE_REDRAWS = 64
TOP_ITEMS_REPORTED = 10
_ARRAYS = "interactions.npz"
_IDS = "id_maps.json"


# ------------------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Interaction:
    user: str
    item: str
    rating: float
    timestamp: float | None


def _id(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise MappingError(f"missing field {column!r}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(f"field {column!r} must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _number(row: dict[str, Any], column: str) -> float | None:
    """A finite number, or None for an absent / empty cell."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dt.datetime):  # a parquet timestamp column
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return aware.timestamp()
    if isinstance(value, bool):
        raise MappingError(f"field {column!r} must be a number, got bool")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise MappingError(f"field {column!r} must be a number, got {value!r}") from None
    else:
        raise MappingError(f"field {column!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise MappingError(f"field {column!r} must be a finite number, got {value!r}")
    return number


def map_interaction(row: dict[str, Any], fields: FieldMapping) -> Interaction:
    """The interaction a row holds; raises :class:`MappingError` naming the missing or mistyped column."""
    user, item = _id(row, fields.user), _id(row, fields.item)
    rating = 1.0
    if fields.rating is not None:
        value = _number(row, fields.rating)
        if value is None:
            raise MappingError(f"missing field {fields.rating!r}")
        rating = value
    timestamp = None
    if fields.timestamp is not None:
        timestamp = _number(row, fields.timestamp)
        if timestamp is None:
            raise MappingError(f"missing field {fields.timestamp!r}")
    return Interaction(user, item, rating, timestamp)


# ------------------------------------------------------------------------------------------- examples
class _Examples(Sequence[dict[str, Any]]):
    """A split held as arrays (one entry per interaction in ``users``), read as example dicts by index."""

    users: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self._example(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._example(index % len(self))

    def _example(self, index: int) -> dict[str, Any]:
        raise NotImplementedError


class TrainInteractions(_Examples):
    """The train split as examples ``{"index", "user", "item", "weight"}`` (index: the interaction's
    position, the key of its negatives)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> None:
        self.users, self.items, self.weights = users, items, weights

    def _example(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "user": int(self.users[index]),
            "item": int(self.items[index]),
            "weight": float(self.weights[index]),
        }

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for array in (self.users, self.items, self.weights):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]


class HeldOut(_Examples):
    """A held-out split as examples ``{"user", "item", "seen"}``: the user's held-out item and the items
    the ranking leaves out (the user's training items; for test also the validation item)."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        seen_indptr: np.ndarray,
        seen: np.ndarray,
        extra: np.ndarray,
    ) -> None:
        self.users, self.items = users, items
        self._indptr, self._seen, self._extra = seen_indptr, seen, extra

    def _example(self, index: int) -> dict[str, Any]:
        user = int(self.users[index])
        seen = self._seen[self._indptr[user] : self._indptr[user + 1]]
        if self._extra[index] >= 0:
            seen = np.append(seen, self._extra[index])
        return {"user": user, "item": int(self.items[index]), "seen": seen}


@dataclass
class PreparedInteractions:
    """What :func:`prepare_interactions` returns; the splits are sequences of examples (see the classes)."""

    train: TrainInteractions
    validation: HeldOut
    test: HeldOut
    report: DataReport
    user_ids: list[str]
    item_ids: list[str]
    #: Interactions per item in the train split (the popularity baseline and popularity sampling).
    item_counts: np.ndarray
    #: Each user's training items: ``seen_items[seen_indptr[u]:seen_indptr[u + 1]]``, sorted.
    seen_indptr: np.ndarray
    seen_items: np.ndarray
    folder: Path | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def all_seen(self) -> tuple[np.ndarray, np.ndarray]:
        """Each user's items in every split, as ``(indptr, items)`` like ``seen_indptr``/``seen_items``:
        what a served model leaves out of a user's recommendations (the held-out items are theirs too)."""
        train_users = np.repeat(np.arange(self.num_users, dtype=np.int64), np.diff(self.seen_indptr))
        users = np.concatenate([train_users, self.validation.users, self.test.users]).astype(np.int64)
        items = np.concatenate([self.seen_items, self.validation.items, self.test.items]).astype(np.int64)
        return _csr(users, items, self.num_users)

    def seen_keys(self) -> np.ndarray:
        """``user * num_items + item`` of every training pair, sorted (membership by binary search)."""
        users = np.repeat(np.arange(self.num_users, dtype=np.int64), np.diff(self.seen_indptr))
        return users * self.num_items + self.seen_items.astype(np.int64)


# ------------------------------------------------------------------------------------- negative sampling
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of uint64 values (wrapping arithmetic)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & _MASK


def _uniform(seed: int, epoch: int, indices: np.ndarray, draw: np.ndarray, attempt: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per (index, draw), a pure function of every argument."""
    with np.errstate(over="ignore"):
        key = _mix(np.full(indices.shape, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        for part in (np.uint64(epoch & 0xFFFFFFFF), indices.astype(np.uint64)):
            key = _mix(key ^ part)
        key = _mix(key[:, None] ^ draw.astype(np.uint64)[None, :])
        key = _mix(key ^ np.uint64(attempt))
    return (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_negatives(
    indices: np.ndarray,
    users: np.ndarray,
    *,
    config: NegativeSamplingConfig,
    seed: int,
    epoch: int,
    item_counts: np.ndarray,
    seen_keys: np.ndarray,
) -> np.ndarray:
    """``config.count`` negative items for each training interaction ``indices[i]`` of user ``users[i]``:
    a pure function of (seed, epoch, interaction index), so every rank, batch composition and resumption
    draws the same ones, and a new epoch draws new ones. ``uniform`` draws every item alike, ``popularity``
    in proportion to ``item_counts``. A draw that is one of the user's training items (``seen_keys``) is
    redrawn up to :data:`NEGATIVE_REDRAWS` times (a user who interacted with almost every item may keep
    one)."""
    num_items = len(item_counts)
    indices = np.asarray(indices, dtype=np.int64)
    users = np.asarray(users, dtype=np.int64)
    draw = np.arange(config.count, dtype=np.int64)
    cumulative = np.cumsum(item_counts.astype(np.float64)) if config.strategy == "popularity" else None

    def items_of(u: np.ndarray) -> np.ndarray:
        if cumulative is None:
            return np.minimum((u * num_items).astype(np.int64), num_items - 1)
        found: np.ndarray = np.searchsorted(cumulative, u * cumulative[-1], side="right")
        capped: np.ndarray = np.minimum(found, num_items - 1).astype(np.int64)
        return capped

    negatives = items_of(_uniform(seed, epoch, indices, draw, 0))
    for attempt in range(1, NEGATIVE_REDRAWS + 1):
        keys = users[:, None] * num_items + negatives
        where = np.searchsorted(seen_keys, keys)
        clash = (where < len(seen_keys)) & (seen_keys[np.minimum(where, len(seen_keys) - 1)] == keys)
        if not clash.any():
            break
        redrawn = items_of(_uniform(seed, epoch, indices, draw, attempt))
        negatives = np.where(clash, redrawn, negatives)
    return negatives


# ------------------------------------------------------------------------------------------ preparation
def _read(
    cfg: DataConfig, sources: list[ResolvedSource], bad: BadRowLog
) -> tuple[list[Interaction], list[SourceRecord]]:
    rows: list[Interaction] = []
    records: list[SourceRecord] = []
    for src in sources:
        count = 0
        try:
            for raw in read_rows(src, hf_split=cfg.hf_split):
                count += 1
                bad.row_read()
                if raw.data is None:
                    bad.bad(raw.source, raw.line, raw.error or "malformed")
                    continue
                try:
                    rows.append(map_interaction(raw.data, cfg.fields))
                except MappingError as exc:
                    bad.bad(raw.source, raw.line, str(exc))
        except (OSError, ValueError) as exc:  # a damaged file (pyarrow's errors derive from these)
            raise DataError(
                f"{src.uri}: unreadable after {count} rows: {exc}", reason="SourceUnreadable"
            ) from exc
        for name, digest, size in src.hashes:
            uri = src.uri if len(src.hashes) == 1 else f"{src.uri.rstrip('/')}/{name}"
            records.append(SourceRecord(uri=uri, role=src.role, sha256=digest, bytes=size, rows=count))
    return rows, records


def _stage(stages: list[StageRecord], name: str, rows_in: int, rows_out: int, **removed: int) -> None:
    stages.append(
        StageRecord(
            name=name, rows_in=rows_in, rows_out=rows_out, removed={k: n for k, n in removed.items() if n}
        )
    )
    log.info("data stage %s: %d -> %d rows %s", name, rows_in, rows_out, removed)


def _csr(users: np.ndarray, items: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((items, users))
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.add.at(indptr, users + 1, 1)
    return np.cumsum(indptr), items[order].astype(np.int64)


def _build(
    rows: list[Interaction], cfg: DataConfig, report: DataReport, stages: list[StageRecord]
) -> dict[str, Any]:
    """Arrays of the splits and the id maps from the valid rows (in source order)."""
    n = len(rows)
    ratings = np.asarray([r.rating for r in rows], dtype=np.float64)
    positive = ratings > 0
    _stage(stages, "ratings", n, int(positive.sum()), non_positive_rating=int(n - positive.sum()))
    kept = [r for r, ok in zip(rows, positive.tolist(), strict=True) if ok]
    if not kept:
        raise DataError("no interaction with a positive rating is left", reason="EmptySplit")
    user_ids = sorted({r.user for r in kept})
    item_ids = sorted({r.item for r in kept})
    user_index = {u: i for i, u in enumerate(user_ids)}
    item_index = {t: i for i, t in enumerate(item_ids)}
    users = np.asarray([user_index[r.user] for r in kept], dtype=np.int64)
    items = np.asarray([item_index[r.item] for r in kept], dtype=np.int64)
    weights = np.asarray([r.rating for r in kept], dtype=np.float32)
    times = np.asarray([r.timestamp if r.timestamp is not None else 0.0 for r in kept], dtype=np.float64)
    position = np.arange(len(kept), dtype=np.int64)
    # Chronological per user: by timestamp, then row order (without a timestamp column: row order alone).
    order = np.lexsort((position, times, users))
    users, items, weights, times = users[order], items[order], weights[order], times[order]
    # A repeated (user, item) pair keeps its latest interaction.
    pair = users * len(item_ids) + items
    last = np.ones(len(pair), dtype=bool)
    seen_pairs: set[int] = set()
    for i in range(len(pair) - 1, -1, -1):
        key = int(pair[i])
        if key in seen_pairs:
            last[i] = False
        seen_pairs.add(key)
    _stage(stages, "dedup", len(kept), int(last.sum()), repeated_pair=int((~last).sum()))
    users, items, weights = users[last], items[last], weights[last]

    counts = np.bincount(users, minlength=len(user_ids))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_user = np.arange(len(users)) - np.repeat(starts, counts)
    from_end = np.repeat(counts, counts) - rank_in_user  # 1 for each user's last interaction
    held = np.repeat(counts >= MIN_HELD_OUT_INTERACTIONS, counts)
    test = held & (from_end == 1)
    validation = held & (from_end == 2)
    train = ~(test | validation)
    _stage(stages, "split (leave-last-out)", len(users), len(users))
    if not train.any():
        raise DataError("no training interaction is left", reason="EmptySplit")
    if not validation.any():
        raise DataError(
            f"no user has {MIN_HELD_OUT_INTERACTIONS} or more interactions, so the leave-last-out split "
            "has no validation or test interaction",
            reason="EmptySplit",
        )
    seen_indptr, seen_items = _csr(users[train], items[train], len(user_ids))
    item_counts = np.bincount(items[train], minlength=len(item_ids)).astype(np.int64)
    val_users, test_users = users[validation], users[test]
    # At test time the validation item is known too: it is left out of the test ranking.
    val_item_of_user = np.full(len(user_ids), -1, dtype=np.int64)
    val_item_of_user[val_users] = items[validation]
    top = np.argsort(-item_counts, kind="stable")[:TOP_ITEMS_REPORTED]
    report.interactions = InteractionsRecord(
        users=len(user_ids),
        items=len(item_ids),
        interactions={
            "train": int(train.sum()),
            "validation": int(validation.sum()),
            "test": int(test.sum()),
        },
        held_out_users=int((counts >= MIN_HELD_OUT_INTERACTIONS).sum()),
        train_only_users=int((counts < MIN_HELD_OUT_INTERACTIONS).sum()),
        ordered_by=f"column {cfg.fields.timestamp!r}" if cfg.fields.timestamp else "row order",
        density=len(users) / (len(user_ids) * len(item_ids)),
        top_items=[(item_ids[i], int(item_counts[i])) for i in top.tolist() if item_counts[i]],
    )
    arrays = {
        "train_users": users[train],
        "train_items": items[train],
        "train_weights": weights[train],
        "validation_users": val_users,
        "validation_items": items[validation],
        "validation_extra": np.full(len(val_users), -1, dtype=np.int64),
        "test_users": test_users,
        "test_items": items[test],
        "test_extra": val_item_of_user[test_users],
        "item_counts": item_counts,
        "seen_indptr": seen_indptr,
        "seen_items": seen_items,
    }
    return {"arrays": arrays, "users": user_ids, "items": item_ids}


def _open(folder: Path) -> PreparedInteractions:
    with np.load(folder / _ARRAYS) as stored:
        a = {name: stored[name] for name in stored.files}
    ids = json.loads((folder / _IDS).read_text(encoding="utf-8"))
    report = DataReport.model_validate(read_meta(folder)["report"])
    indptr, seen = a["seen_indptr"], a["seen_items"]
    return PreparedInteractions(
        train=TrainInteractions(a["train_users"], a["train_items"], a["train_weights"]),
        validation=HeldOut(a["validation_users"], a["validation_items"], indptr, seen, a["validation_extra"]),
        test=HeldOut(a["test_users"], a["test_items"], indptr, seen, a["test_extra"]),
        report=report,
        user_ids=list(ids["users"]),
        item_ids=list(ids["items"]),
        item_counts=a["item_counts"],
        seen_indptr=indptr,
        seen_items=seen,
        folder=folder,
    )


def _write(
    cfg: DataConfig, sources: list[ResolvedSource], report: DataReport, folder: Path, key: str
) -> None:
    """Read, validate, index and split into ``folder``; the report records the stages as far as they got."""
    bad = BadRowLog()
    stages: list[StageRecord] = []
    try:
        rows, report.provenance.sources = _read(cfg, sources, bad)
        _stage(stages, "read", bad.total, bad.total - bad.count, malformed=bad.count)
        report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
        bad.check(cfg.bad_rows.max_ratio)
        built = _build(rows, cfg, report, stages)
    finally:
        report.provenance.stages = stages
        report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
    np.savez(folder / _ARRAYS, **built["arrays"])
    (folder / _IDS).write_text(
        json.dumps({"users": built["users"], "items": built["items"]}), encoding="utf-8"
    )
    meta = {"key": key, "report": report.model_dump(mode="json", by_alias=True)}
    (folder / META).write_text(json.dumps(meta), encoding="utf-8")


def prepare_interactions(
    cfg: DataConfig,
    workdir: Path,
    *,
    model_license: str | None = None,
    store: Path | None = None,
    attempt: str | None = None,
    wait: bool = False,
) -> PreparedInteractions:
    """Read, validate, index and split the interactions; write ``data_report.json``/``provenance.json`` into
    ``workdir`` (also when a :class:`DataError` stops it). ``store``/``attempt``/``wait`` as in
    :func:`finetune_trainer.data.pipeline.prepare`: rank 0 prepares and publishes, the others wait."""
    if cfg.fields.kind != "interactions":
        raise DataError(f"data.fields.kind is {cfg.fields.kind!r}, not 'interactions'", reason="InvalidData")
    report = DataReport(
        provenance=Provenance(config_digest=config_digest(cfg), tokenizer=""),
        mapping_kind=cfg.fields.kind,
        template=cfg.template,
        pii=PiiRecord(policy="not applied (ids only)"),
    )

    def plan(downloads: Path) -> Plan:
        report.provenance.licences = check_licences(cfg.compliance, model_license=model_license)
        sources = [
            s
            for uri in cfg.all_sources
            for s in resolve_source(uri, cfg.format, role="main", cache_dir=downloads, hf_split=cfg.hf_split)
        ]
        key = content_key("interactions", LAYOUT_VERSION, cfg, sources, model_license)
        return Plan(key, lambda folder: _write(cfg, sources, report, folder, key))

    return prepare_shared(
        "interactions", workdir, report, plan, _open, logger=log, store=store, attempt=attempt, wait=wait
    )
