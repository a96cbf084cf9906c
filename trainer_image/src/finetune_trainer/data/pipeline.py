"""Data preparation entry point used by the trainer.

Public API (stable; the trainer codes against it)::

    from finetune_trainer.data import DataConfig, DataError
    from finetune_trainer.data.pipeline import PreparedData, prepare
    from finetune_trainer.data.report import DataReport, render_data_section, write_report

    prepared: PreparedData = prepare(cfg.data, tokenizer, workdir, model_license="apache-2.0")
    prepared.train / .validation / .test   # Sequence[Example] read by index from memory-mapped Arrow;
                                           #   Example = {"input_ids": list[int], "attention_mask":
                                           #   list[int], "labels": list[int]}; slices give lists.
                                           # labels are -100 on prompt tokens (completionOnlyLoss) and, for
                                           # kind "classification", a one-element list [class_id].
    prepared.samples["validation"]         # list[TextSample(prompt, completion)]: rendered prompt text for
                                           #   generation samples and the reference completion (<= 32 each)
    prepared.label_names                   # class names for kind "classification", else None
    prepared.report                        # DataReport; prepare() already wrote workdir/data_report.json
                                           #   and workdir/provenance.json

With ``store=`` (a folder on the job's volume) the prepared examples are cached there under a key of the
data config, the sources' hashes and the tokenizer (:mod:`finetune_trainer.data.keys`) and reused by any
later call with the same key; ``attempt=`` + ``wait=True`` make a rank wait for the preparing rank of the same
attempt and memory-map its result instead of preparing (:mod:`finetune_trainer.data.sharing`).

``prepare`` raises :class:`DataError` (message names the cause; ``.reason`` is a CamelCase code) for: too many
malformed rows, PII rejections above the limit, a licence not in the allowlist, an unreadable or empty source,
an empty train split. The trainer maps it to ``ExitCode.DATA_ERROR``. Examples are not padded; the collator
pads (``tokenizer.pad_token_id`` for input_ids, 0 for attention_mask, -100 for labels). ``prepare`` is
deterministic: the same config, data and tokenizer give the same examples in the same order on every rank.

How it runs (memory does not grow with the rows, except exact de-duplication's 16 bytes a row and
near-duplicate detection's index): the sources are streamed into an Arrow table (:func:`_read`); a batched,
multi-process ``datasets`` map parses, maps, cleans, scrubs and places every row
(:func:`stages.examine_rows`);
sequential passes over small columns count, de-duplicate and split; a second map renders and tokenizes
(:func:`stages.encode_rows`) into Arrow ``int32`` lists, which the trainer reads by index.

Tests build a tiny tokenizer with ``trainer_image/tests/tiny_tokenizer.py`` (``make_tiny_tokenizer()``:
a character-level ``PreTrainedTokenizerFast`` with pad/eos/bos and a chatml-like chat template; no download).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune_trainer.data.augmentation import augmentation_copies, augmented_copy, text_vocabulary
from finetune_trainer.data.compliance import check_licences, config_digest
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.encoding import IGNORE_INDEX, Example
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import jsonl_lines, read_rows
from finetune_trainer.data.keys import cache_key
from finetune_trainer.data.mapping import MappingError, Record, map_row
from finetune_trainer.data.report import (
    DataReport,
    PiiRecord,
    Provenance,
    SourceRecord,
    SplitRecord,
    StageRecord,
    histogram,
)
from finetune_trainer.data.sharing import Plan, prepare_shared
from finetune_trainer.data.sources import ResolvedSource, resolve_source
from finetune_trainer.data.split import SPLITS
from finetune_trainer.data.stages import READ_SCHEMA, ROLES, encode_rows, examine_rows
from finetune_trainer.data.store import (
    META,
    memory_mapped_table,
    open_split,
    read_meta,
)
from finetune_trainer.data.templates import render
from finetune_trainer.data.validation import BadRowLog

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DataError", "Example", "PreparedData", "TextSample", "prepare"]

log = logging.getLogger(__name__)

#: Text samples kept per evaluation split for generation.
SAMPLES_KEPT = 32
#: Rows per Arrow record batch (and per map batch).
BATCH_ROWS = 1000
#: The fewest rows a map process gets by default (``prepare(rows_per_process=…)``): a worker costs more to
#: start than it saves on fewer rows, so below twice this many rows one process does the maps.
ROWS_PER_PROCESS = 20_000
#: Environment variable that caps the preparation processes (default: the CPUs this process may use).
NUM_PROC_ENV = "FTO_DATA_NUM_PROC"


@dataclass(frozen=True)
class TextSample:
    """A rendered prompt (what the model sees before generating) and its reference completion."""

    prompt: str
    completion: str


@dataclass
class PreparedData:
    train: Sequence[Example]
    validation: Sequence[Example]
    test: Sequence[Example]
    report: DataReport
    samples: dict[str, list[TextSample]] = field(default_factory=dict)
    label_names: list[str] | None = None
    #: The prepared folder the examples are memory-mapped from.
    folder: Path | None = None


class _Stages:
    """Row counts per stage, in order; every removal has a reason."""

    def __init__(self) -> None:
        self.records: list[StageRecord] = []

    def add(self, name: str, rows_in: int, rows_out: int, removed: dict[str, int] | None = None) -> None:
        removed = {reason: n for reason, n in (removed or {}).items() if n}
        self.records.append(StageRecord(name=name, rows_in=rows_in, rows_out=rows_out, removed=removed))
        log.info("data stage %s: %d -> %d rows %s", name, rows_in, rows_out, removed or "")


@dataclass(frozen=True)
class _Workers:
    """How many processes a map may use: at most ``num_proc``, each with ``rows_per_process`` rows or more."""

    num_proc: int
    rows_per_process: int

    def for_rows(self, rows: int) -> int:
        return max(1, min(self.num_proc, rows // self.rows_per_process))


def default_num_proc() -> int:
    configured = os.environ.get(NUM_PROC_ENV)
    if configured:
        return max(1, int(configured))
    return max(1, len(os.sched_getaffinity(0)))


def _resolve_all(cfg: DataConfig, cache_dir: Path) -> list[ResolvedSource]:
    # Held-out sources first: de-duplication keeps the first copy, so a row that is both in a held-out file
    # and in the training data stays held out (no leakage).
    sources: list[ResolvedSource] = []
    if cfg.split.validation_source:
        sources += resolve_source(
            cfg.split.validation_source, cfg.format, role="validation", cache_dir=cache_dir
        )
    if cfg.split.test_source:
        sources += resolve_source(
            cfg.split.test_source, cfg.format, role="test", cache_dir=cache_dir, hf_split=cfg.hf_split
        )
    for uri in cfg.all_sources:
        sources += resolve_source(uri, cfg.format, role="main", cache_dir=cache_dir, hf_split=cfg.hf_split)
    return sources


# ------------------------------------------------------------------------------------------------- reading
class _BatchWriter:
    """Rows appended one by one, written as Arrow record batches of :data:`BATCH_ROWS`."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self._writer = pa.ipc.new_stream(str(path), schema)
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.rows = 0

    def add(self, **values: Any) -> None:
        for name, column in self._columns.items():
            column.append(values.get(name))
        self.rows += 1
        if len(self._columns[self.schema.names[0]]) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._columns[self.schema.names[0]]:
            self._writer.write_batch(pa.RecordBatch.from_pydict(self._columns, schema=self.schema))
            self._columns = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self.flush()
        self._writer.close()


def _read(cfg: DataConfig, sources: list[ResolvedSource], path: Path) -> tuple[list[SourceRecord], list[str]]:
    """Stream every source into the read table (JSONL lines unparsed: parsing is part of the parallel map;
    CSV, Parquet and saved datasets mapped here, where their readers run)."""
    writer = _BatchWriter(path, READ_SCHEMA)
    records: list[SourceRecord] = []
    names: list[str] = []
    try:
        for index, src in enumerate(sources):
            names.append(src.uri)
            role = ROLES.index(src.role)
            count = 0
            try:
                if src.format == "jsonl":
                    for line, raw in jsonl_lines(src):
                        count += 1
                        writer.add(source=index, line=line, role=role, raw=raw)
                else:
                    for row in read_rows(src, hf_split=cfg.hf_split):
                        count += 1
                        if row.data is None:
                            writer.add(source=index, line=row.line, role=role, error=row.error or "malformed")
                            continue
                        try:
                            mapped = map_row(row.data, cfg.fields, source=row.source, line=row.line).dumps()
                        except MappingError as exc:
                            writer.add(source=index, line=row.line, role=role, error=str(exc))
                        else:
                            writer.add(source=index, line=row.line, role=role, record=mapped)
            except (OSError, ValueError) as exc:  # a damaged file (pyarrow's errors derive from these)
                raise DataError(
                    f"{src.uri}: unreadable after {count} rows: {exc}", reason="SourceUnreadable"
                ) from exc
            for name, digest, size in src.hashes:
                uri = src.uri if len(src.hashes) == 1 else f"{src.uri.rstrip('/')}/{name}"
                records.append(
                    SourceRecord(
                        uri=uri,
                        role=src.role,
                        sha256=digest,
                        bytes=size,
                        rows=count if len(src.hashes) == 1 else 0,
                    )
                )
            if len(src.hashes) > 1 and records:  # a saved dataset: rows belong to the folder, not one file
                records[-1] = records[-1].model_copy(update={"rows": count})
    finally:
        writer.close()
    return records, names


# ----------------------------------------------------------------------------------------------- the maps
def _map(
    source: Path,
    function: Any,
    target: Path,
    *,
    workers: _Workers,
    fingerprint: str,
    fn_kwargs: dict[str, Any],
) -> list[Path]:
    """A batched ``datasets`` map from one memory-mapped Arrow file into ``target`` (one file per process)."""
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_file(str(source))
    processes = workers.for_rows(len(dataset))
    result = dataset.with_format("arrow").map(
        function,
        batched=True,
        batch_size=BATCH_ROWS,
        remove_columns=dataset.column_names,
        num_proc=processes if processes > 1 else None,
        cache_file_name=str(target),
        new_fingerprint=fingerprint,
        load_from_cache_file=False,
        fn_kwargs=fn_kwargs,
        desc=None,
    )
    files = [Path(f["filename"]) for f in result.cache_files]
    del result, dataset
    return files


def _column(paths: Sequence[Path], name: str) -> pa.ChunkedArray:
    return pa.chunked_array(
        [chunk for p in paths for chunk in memory_mapped_table(str(p)).column(name).chunks],
        type=memory_mapped_table(str(paths[0])).schema.field(name).type,
    )


def _valid_rows(column: pa.ChunkedArray) -> np.ndarray:
    return np.flatnonzero(pc.is_valid(column).to_numpy(zero_copy_only=False))


def _counts(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ counting passes
@dataclass
class _Placed:
    """What the sequential passes decided: the surviving rows of each split (rows of the examined table)."""

    splits: dict[str, np.ndarray]
    labels: pa.ChunkedArray


def _check_bad_rows(
    cfg: DataConfig, read: Path, rows: Sequence[Path], names: list[str], bad: BadRowLog, stages: _Stages
) -> int:
    errors = _column(rows, "error")
    bad.total = len(errors)
    failing = _valid_rows(errors)
    if len(failing):
        table = memory_mapped_table(str(read))
        where = pa.array(failing)
        source = table.column("source").take(where).to_pylist()
        line = table.column("line").take(where).to_pylist()
        for s, n, reason in zip(source, line, errors.take(where).to_pylist(), strict=True):
            bad.bad(names[s], n, reason)
    stages.add("read", bad.total, bad.total - bad.count, {"malformed": bad.count})
    bad.check(cfg.bad_rows.max_ratio)
    return bad.total - bad.count


def _place(
    cfg: DataConfig, rows: Sequence[Path], read_rows_out: int, stages: _Stages
) -> tuple[_Placed, PiiRecord]:
    removed = _column(rows, "removed")
    removed_at = _valid_rows(removed)
    stages.add(
        "clean",
        read_rows_out,
        read_rows_out - len(removed_at),
        _counts(removed.take(pa.array(removed_at)).to_pylist()),
    )
    kept_after_clean = read_rows_out - len(removed_at)

    pii_column = _column(rows, "pii")
    with_pii_at = _valid_rows(pii_column)
    matches: dict[str, int] = {}
    for found in pii_column.take(pa.array(with_pii_at)).to_pylist():
        for kind, n in json.loads(found).items():
            matches[kind] = matches.get(kind, 0) + n
    rejected = len(with_pii_at) if cfg.pii.policy == "reject" else 0
    stages.add("pii", kept_after_clean, kept_after_clean - rejected, {"pii": rejected})
    pii = PiiRecord(
        policy=cfg.pii.policy, matches=matches, rows_with_pii=len(with_pii_at), rows_rejected=rejected
    )
    if kept_after_clean and rejected / kept_after_clean > cfg.pii.max_reject_ratio:
        raise DataError(
            f"{rejected} of {kept_after_clean} rows contain personal data "
            f"({rejected / kept_after_clean:.2%} > pii.maxRejectRatio {cfg.pii.max_reject_ratio:.2%}); "
            f"found {matches}. Use policy 'scrub' or clean the data.",
            reason="TooMuchPersonalData",
        )

    digests = _column(rows, "digest")
    alive = pc.is_valid(digests).to_numpy(zero_copy_only=False)
    if cfg.pii.policy == "reject" and len(with_pii_at):
        alive[with_pii_at] = False
    candidates = np.flatnonzero(alive)
    removed_dedup: dict[str, int] = {}
    survivors = candidates
    if cfg.dedup.exact and len(candidates):
        keys = np.frombuffer(
            digests.take(pa.array(candidates)).combine_chunks().buffers()[1], dtype=np.uint64
        ).reshape(-1, 2)[: len(candidates)]
        _, first = np.unique(keys, axis=0, return_index=True)
        survivors = candidates[np.sort(first)]
        removed_dedup["exact_duplicate"] = len(candidates) - len(survivors)
    if cfg.dedup.near and len(survivors):
        survivors, near = _near_dedup(cfg, rows, survivors)
        removed_dedup["near_duplicate"] = near
    stages.add("dedup", len(candidates), len(survivors), removed_dedup)

    split_of = _column(rows, "split").take(pa.array(survivors)).to_numpy(zero_copy_only=False)
    splits = {name: survivors[split_of == index] for index, name in enumerate(SPLITS)}
    stages.add("split", len(survivors), sum(len(v) for v in splits.values()))
    if not len(splits["train"]):
        raise DataError("the train split is empty after filtering; see data_report.json", reason="EmptySplit")
    for name, wanted in (
        ("validation", cfg.split.validation_source or cfg.split.validation > 0),
        ("test", cfg.split.test_source or cfg.split.test > 0),
    ):
        if wanted and not len(splits[name]):
            raise DataError(
                f"the {name} split is empty ({len(survivors)} rows after filtering); add rows, raise "
                f"split.{name}, give split.{name}Source, or set split.{name} to 0",
                reason="EmptySplit",
            )
    return _Placed(splits, _column(rows, "label")), pii


def _near_dedup(cfg: DataConfig, rows: Sequence[Path], candidates: np.ndarray) -> tuple[np.ndarray, int]:
    """MinHash LSH over the exact-unique rows, in order (the first of near copies wins)."""
    from finetune_trainer.data.dedup import NearDeduplicator

    near = NearDeduplicator(cfg.dedup)
    signatures = _column(rows, "minhash")
    kept: list[int] = []
    for start in range(0, len(candidates), BATCH_ROWS):
        chunk = candidates[start : start + BATCH_ROWS]
        for row, value in zip(chunk.tolist(), signatures.take(pa.array(chunk)).to_pylist(), strict=True):
            if not near.is_near_duplicate_signature(np.frombuffer(value, dtype=np.uint32)):
                kept.append(row)
    return np.asarray(kept, dtype=np.int64), len(candidates) - len(kept)


def _label_names(labels: pa.ChunkedArray, rows: np.ndarray) -> list[str]:
    names = set(pc.unique(labels.take(pa.array(rows))).drop_null().to_pylist()) if len(rows) else set()
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


# ------------------------------------------------------------------------------------------- encoding passes
@dataclass
class _Plan:
    """The rows to encode, in order: train rows, then each augmentation copy of them, then validation and
    test. ``ranges[split]`` is that split's [start, stop) in the plan (and in the encoded table)."""

    rows: np.ndarray
    copies: np.ndarray
    ranges: dict[str, tuple[int, int]]


def _plan(cfg: DataConfig, splits: dict[str, np.ndarray]) -> _Plan:
    train = splits["train"]
    copies = augmentation_copies(cfg.augmentation)
    parts_rows = [train] + [train] * copies + [splits["validation"], splits["test"]]
    parts_copies = [np.full(len(train), c, dtype=np.int8) for c in range(copies + 1)] + [
        np.zeros(len(splits["validation"]), dtype=np.int8),
        np.zeros(len(splits["test"]), dtype=np.int8),
    ]
    train_stop = len(train) * (copies + 1)
    validation_stop = train_stop + len(splits["validation"])
    return _Plan(
        np.concatenate(parts_rows).astype(np.int64),
        np.concatenate(parts_copies),
        {
            "train": (0, train_stop),
            "validation": (train_stop, validation_stop),
            "test": (validation_stop, validation_stop + len(splits["test"])),
        },
    )


def _write_plan(plan: _Plan, path: Path) -> None:
    schema = pa.schema([("row", pa.int64()), ("copy", pa.int8())])
    with pa.ipc.new_stream(str(path), schema) as writer:
        for start in range(0, len(plan.rows), BATCH_ROWS * 10):
            stop = start + BATCH_ROWS * 10
            writer.write_batch(
                pa.RecordBatch.from_arrays(
                    [pa.array(plan.rows[start:stop]), pa.array(plan.copies[start:stop])], schema=schema
                )
            )


def _split_record(lengths: np.ndarray, loss: int, truncated: int, max_length: int) -> SplitRecord:
    as_list = lengths.tolist()
    return SplitRecord(
        rows=len(as_list),
        tokens=int(lengths.sum()),
        loss_tokens=loss,
        truncated=truncated,
        length_histogram=histogram(as_list, max(as_list, default=max_length)),
        min_tokens=min(as_list, default=0),
        max_tokens=max(as_list, default=0),
        mean_tokens=float(lengths.sum()) / len(as_list) if as_list else 0.0,
    )


def _record_of(rows: Sequence[Path], cfg: DataConfig, row: int, copy: int, vocabulary: list[str]) -> Record:
    record = Record.loads(_column(rows, "record")[row].as_py())
    if copy:
        record = augmented_copy(record, cfg.augmentation, vocabulary, row=row, copy=copy)
    return record


def _insertion_vocabulary(cfg: DataConfig, rows: Sequence[Path], train: np.ndarray) -> list[str]:
    """The training split's words, for text augmentation's insertions (empty when it inserts nothing)."""
    text = cfg.augmentation.text
    if text is None or text.word_insertion == 0 or not len(train):
        return []
    records = _column(rows, "record").take(pa.array(train))
    return list(
        text_vocabulary(value for item in records.to_pylist() for value in Record.loads(item).parts.values())
    )


def _pack(encoded: Sequence[Path], stop: int, block: int, target: Path) -> tuple[int, int]:
    """Concatenate the training examples (encoded rows [0, stop); dropped rows are empty) and cut the
    stream into ``block``-token blocks, streaming; return blocks kept and blocks without loss tokens."""
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    carry_ids = np.zeros(0, dtype=np.int32)
    carry_labels = np.zeros(0, dtype=np.int32)
    kept = empty = 0

    def emit(
        writer: Any, ids: np.ndarray, labels: np.ndarray, *, final: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        nonlocal kept, empty
        full = len(ids) // block
        cut = full * block if not final else len(ids)
        if cut == 0:
            return ids, labels
        bounds = np.arange(0, cut, block, dtype=np.int64)
        bounds = np.append(bounds, cut)
        block_ids, block_labels = ids[:cut], labels[:cut]
        has_loss = np.add.reduceat((block_labels != IGNORE_INDEX).astype(np.int64), bounds[:-1]) > 0
        starts, stops = bounds[:-1][has_loss], bounds[1:][has_loss]
        empty += int((~has_loss).sum())
        if len(starts):
            index = np.concatenate(
                [np.arange(a, b) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
            )
            offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int32)
            writer.write_batch(
                pa.RecordBatch.from_arrays(
                    [
                        pa.ListArray.from_arrays(pa.array(offsets), pa.array(block_ids[index])),
                        pa.ListArray.from_arrays(pa.array(offsets), pa.array(block_labels[index])),
                    ],
                    schema=schema,
                )
            )
            kept += len(starts)
        return ids[cut:], labels[cut:]

    with pa.ipc.new_stream(str(target), schema) as writer:
        for ids_chunk, labels_chunk in _row_chunks(encoded, stop):
            carry_ids = np.concatenate([carry_ids, ids_chunk])
            carry_labels = np.concatenate([carry_labels, labels_chunk])
            carry_ids, carry_labels = emit(writer, carry_ids, carry_labels, final=False)
        emit(writer, carry_ids, carry_labels, final=True)
    return kept, empty


def _row_chunks(paths: Sequence[Path], stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The flat ids and labels of encoded rows [0, stop), batch by batch, read (not mapped) so that a pass
    over everything does not stay resident."""
    seen = 0
    for path in paths:
        with pa.OSFile(str(path), "rb") as handle:
            reader = pa.ipc.open_stream(handle)
            for batch in reader:
                if seen >= stop:
                    return
                batch = batch.slice(0, min(len(batch), stop - seen))
                seen += len(batch)
                ids = batch.column(batch.schema.get_field_index("input_ids"))
                labels = batch.column(batch.schema.get_field_index("labels"))
                yield _flat(ids), _flat(labels)


def _flat(lists: pa.Array) -> np.ndarray:
    offsets = lists.offsets.to_numpy()
    values: np.ndarray = lists.values.to_numpy()
    return values[offsets[0] : offsets[-1]]


def _fingerprint(paths: Sequence[Path], stop: int) -> str:
    """``finetune_trainer.train.fingerprint`` of rows [0, stop): SHA-256 over each example's int32 ids then
    its labels, in order (dropped rows are empty, so they add nothing)."""
    digest = hashlib.sha256()
    seen = 0
    for path in paths:
        with pa.OSFile(str(path), "rb") as handle:
            for batch in pa.ipc.open_stream(handle):
                if seen >= stop:
                    return digest.hexdigest()[:16]
                batch = batch.slice(0, min(len(batch), stop - seen))
                seen += len(batch)
                digest.update(_interleaved(batch.column(0), batch.column(1)).tobytes())
    return digest.hexdigest()[:16]


def _interleaved(ids: pa.Array, labels: pa.Array) -> np.ndarray:
    """ids[0], labels[0], ids[1], labels[1], … of a batch of rows as one int32 array."""
    id_offsets, label_offsets = ids.offsets.to_numpy(), labels.offsets.to_numpy()
    source: np.ndarray = np.concatenate([ids.values.to_numpy(), labels.values.to_numpy()])
    shift = len(ids.values)
    starts = np.stack([id_offsets[:-1], label_offsets[:-1] + shift], axis=1).ravel()
    lengths = np.stack([np.diff(id_offsets), np.diff(label_offsets)], axis=1).ravel()
    total = int(lengths.sum())
    if not total:
        return source[:0]
    out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    index = np.arange(total, dtype=np.int64) + np.repeat(starts - out_starts, lengths)
    gathered: np.ndarray = source[index]
    return gathered


# -------------------------------------------------------------------------------------------- the stages
def _build(
    cfg: DataConfig,
    tokenizer: Any,
    sources: list[ResolvedSource],
    folder: Path,
    key: str,
    workers: _Workers,
    stages: _Stages,
    bad: BadRowLog,
    report: DataReport,
) -> None:
    """Prepare everything into ``folder`` (a private temporary folder; published by the caller)."""
    work = folder / "work"
    work.mkdir(parents=True)
    read = work / "read.arrow"
    report.provenance.sources, names = _read(cfg, sources, read)
    rows = _map(
        read,
        examine_rows,
        work / "rows.arrow",
        workers=workers,
        fingerprint=f"{key}-rows",
        fn_kwargs={"cfg": cfg, "sources": names},
    )
    read_rows_out = _check_bad_rows(cfg, read, rows, names, bad, stages)
    report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
    placed, report.pii = _place(cfg, rows, read_rows_out, stages)

    classification = cfg.fields.kind == "classification"
    label_names = (
        _label_names(placed.labels, np.concatenate(list(placed.splits.values()))) if classification else None
    )
    label_index = {name: i for i, name in enumerate(label_names)} if label_names is not None else None
    plan = _plan(cfg, placed.splits)
    _write_plan(plan, work / "plan.arrow")
    vocabulary = _insertion_vocabulary(cfg, rows, placed.splits["train"])
    encoded = _map(
        work / "plan.arrow",
        encode_rows,
        folder / "examples.arrow",
        workers=workers,
        fingerprint=f"{key}-encoded",
        fn_kwargs={
            "cfg": cfg,
            "tokenizer": tokenizer,
            "rows_paths": [str(p) for p in rows],
            "label_index": label_index,
            "vocabulary": vocabulary,
        },
    )

    dropped = _column(encoded, "dropped").to_pylist()
    lengths = _column(encoded, "length").to_numpy()
    loss = _column(encoded, "loss_tokens").to_numpy()
    truncated = _column(encoded, "truncated").to_numpy(zero_copy_only=False)
    identical = np.asarray([d == "identical_copy" for d in dropped], dtype=bool)
    kept = np.asarray([d is None for d in dropped], dtype=bool)
    train_rows = len(placed.splits["train"])
    if augmentation_copies(cfg.augmentation):
        start, stop = plan.ranges["train"]
        report.augmented_rows = int((~identical[train_rows:stop]).sum())
        report.augmented_ratio = report.augmented_rows / train_rows if train_rows else 0.0
        stages.add("augment (train)", train_rows, train_rows + report.augmented_rows)
    removed = _counts([d for d in dropped if d is not None and d != "identical_copy"])
    samples: dict[str, list[dict[str, str]]] = {}
    split_rows: dict[str, np.ndarray] = {}
    for name in SPLITS:
        start, stop = plan.ranges[name]
        chosen = start + np.flatnonzero(kept[start:stop])
        split_rows[name] = chosen
        report.splits[name] = _split_record(
            lengths[chosen],
            len(chosen) if classification else int(loss[chosen].sum()),
            int(truncated[chosen].sum()),
            cfg.max_seq_length,
        )
        samples[name] = []
        for position in chosen[:SAMPLES_KEPT].tolist():
            record = _record_of(rows, cfg, int(plan.rows[position]), int(plan.copies[position]), vocabulary)
            samples[name].append(
                {
                    "prompt": render(record, cfg, tokenizer).prompt_text,
                    "completion": record.label if record.label is not None else record.target_text(),
                }
            )
    encoded_in = int((~identical).sum())
    stages.add("tokenize", encoded_in, int(kept.sum()), removed)
    if not len(split_rows["train"]):
        raise DataError("no training example is left after tokenization", reason="EmptySplit")

    files: dict[str, list[str]] = {"examples": [p.name for p in encoded]}
    train_stop = plan.ranges["train"][1]
    if cfg.packing:
        blocks, empty = _pack(encoded, train_stop, cfg.max_seq_length, folder / "packed.arrow")
        stages.add("pack", len(split_rows["train"]), blocks, {"no_loss_tokens": empty})
        report.splits["train"].packed_blocks = blocks
        split_rows["train"] = np.arange(blocks, dtype=np.int64)
        files["train"] = ["packed.arrow"]
        fingerprint = _fingerprint([folder / "packed.arrow"], blocks)
    else:
        fingerprint = _fingerprint(encoded, train_stop)
    for name, chosen in split_rows.items():
        np.save(folder / f"{name}.rows.npy", chosen)
    report.label_names = label_names
    report.provenance.stages = stages.records
    report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
    shutil.rmtree(work)
    meta = {
        "key": key,
        "files": files,
        "fingerprint": fingerprint,
        "samples": samples,
        "labelNames": label_names,
        "report": report.model_dump(mode="json", by_alias=True),
    }
    (folder / META).write_text(json.dumps(meta), encoding="utf-8")


def _open(folder: Path) -> PreparedData:
    meta = read_meta(folder)
    return PreparedData(
        train=open_split(folder, meta, "train"),
        validation=open_split(folder, meta, "validation"),
        test=open_split(folder, meta, "test"),
        report=DataReport.model_validate(meta["report"]),
        samples={
            name: [TextSample(s["prompt"], s["completion"]) for s in items]
            for name, items in meta["samples"].items()
        },
        label_names=meta["labelNames"],
        folder=folder,
    )


def prepare(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    workdir: Path,
    *,
    model_license: str | None = None,
    cache_dir: Path | None = None,
    store: Path | None = None,
    attempt: str | None = None,
    wait: bool = False,
    num_proc: int | None = None,
    rows_per_process: int = ROWS_PER_PROCESS,
) -> PreparedData:
    """Read, validate, clean, scrub, de-duplicate, split, render and tokenize; write the report into workdir.

    Stage order: read (+ validate) → clean + length filter → PII → de-duplicate → split → augment (train) →
    tokenize (+ truncate) → pack (train). ``data_report.json`` and ``provenance.json`` are written to
    ``workdir`` also when a :class:`DataError` stops the preparation (as far as it got). Remote sources are
    downloaded into ``cache_dir`` (kept, re-downloaded on the next call) or, by default, into a temporary
    folder removed on return, so that no copy of the data lands in ``workdir``.

    ``store``: the cache folder (the job's volume); without it the examples go to a temporary folder removed
    when the result is garbage-collected. ``attempt`` (needs ``store``): the token shared by the ranks of
    this attempt; with ``wait=True`` this call does not prepare but waits for the rank that does and
    memory-maps its result (it writes no report). ``num_proc``: processes for the maps (default: the CPUs
    this process may use, or ``$FTO_DATA_NUM_PROC``); ``rows_per_process``: the fewest rows a map process gets
    (fewer rows, fewer processes). Neither changes the result, only how the work is divided.
    """
    if rows_per_process < 1:
        raise ValueError(f"rows_per_process must be at least 1, not {rows_per_process}")
    workers = _Workers(num_proc if num_proc is not None else default_num_proc(), rows_per_process)
    stages = _Stages()
    bad = BadRowLog()
    report = DataReport(
        provenance=Provenance(
            config_digest=config_digest(cfg),
            tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        ),
        mapping_kind=cfg.fields.kind,
        template=cfg.template,
        pii=PiiRecord(policy=cfg.pii.policy),
        bad_rows=bad.record(cfg.bad_rows.max_ratio),
    )

    def plan(downloads: Path) -> Plan:
        report.provenance.licences = check_licences(cfg.compliance, model_license=model_license)
        if cfg.template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "template 'tokenizer' needs a tokenizer with a chat template", reason="TemplateError"
            )
        sources = _resolve_all(cfg, downloads)
        key = cache_key(cfg, tokenizer, sources, model_license)

        def build(folder: Path) -> None:
            try:
                _build(cfg, tokenizer, sources, folder, key, workers, stages, bad, report)
            finally:
                report.provenance.stages = stages.records
                report.bad_rows = bad.record(cfg.bad_rows.max_ratio)

        return Plan(key, build)

    return prepare_shared(
        "text",
        workdir,
        report,
        plan,
        _open,
        logger=log,
        store=store,
        attempt=attempt,
        wait=wait,
        downloads=cache_dir,
    )
