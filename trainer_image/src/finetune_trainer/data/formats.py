"""Readers that turn one input into rows, each with the 1-based line (or row) it came from.

- jsonl: one JSON object per line; blank lines are skipped (not rows); a line that is not valid JSON, or
  not an object, is a malformed row with its line number.
- csv: the standard library's ``csv`` module (pyarrow's reader loses line numbers), header on line 1; a record
  reports the physical line it starts on, so quoted multi-line fields keep correct numbers. A record with more
  or fewer fields than the header is malformed. Values are strings; a chat ``messages`` column holds JSON.
- parquet: pyarrow, in record batches; "line" is the 1-based row number.
- hf-disk: ``datasets.load_from_disk``; "line" is the 1-based row number in the chosen split.
- hf-hub (``hf://`` sources): ``datasets.load_dataset``; "line" is the 1-based row number.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from finetune_trainer.data.errors import DataError
from finetune_trainer.data.sources import ResolvedSource, load_hub_dataset

__all__ = ["RawRow", "jsonl_lines", "read_rows"]

# Fields of a CSV record may be large (long documents); the default limit is 128 KiB.
csv.field_size_limit(1 << 30)


@dataclass(frozen=True)
class RawRow:
    """A row as read: its parsed mapping, or why it could not be parsed."""

    source: str
    line: int
    data: dict[str, Any] | None
    error: str | None = None


def jsonl_lines(src: ResolvedSource) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file with their 1-based numbers, unparsed (parsing is per row)."""
    with src.path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if number == 1:
                text = text.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
            if text:
                yield number, text


def _read_jsonl(src: ResolvedSource) -> Iterator[RawRow]:
    for number, text in jsonl_lines(src):
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield RawRow(src.uri, number, None, f"invalid JSON: {exc}")
            continue
        if not isinstance(value, dict):
            yield RawRow(src.uri, number, None, f"expected a JSON object, got {type(value).__name__}")
            continue
        yield RawRow(src.uri, number, value)


def _read_csv(src: ResolvedSource) -> Iterator[RawRow]:
    with src.path.open(newline="", encoding="utf-8-sig", errors="strict") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{src.uri}: unreadable CSV header: {exc}", reason="SourceUnreadable") from exc
        start = reader.line_num + 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                yield RawRow(src.uri, start, None, f"invalid CSV: {exc}")
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if len(record) != len(header):
                yield RawRow(src.uri, line, None, f"expected {len(header)} fields, got {len(record)}")
                continue
            yield RawRow(src.uri, line, dict(zip(header, record, strict=True)))


def _read_parquet(src: ResolvedSource) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(src.path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{src.uri}: unreadable parquet file: {exc}", reason="SourceUnreadable") from exc
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield RawRow(src.uri, number, row)


def _read_hf_disk(src: ResolvedSource, hf_split: str) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(src.path))
    except Exception as exc:  # FileNotFoundError, or datasets' own errors on a damaged folder
        raise DataError(
            f"{src.uri}: cannot load the saved dataset: {exc}", reason="SourceUnreadable"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if hf_split not in loaded:
            raise DataError(
                f"{src.uri}: split {hf_split!r} not found (has {sorted(loaded)}); set hfSplit",
                reason="SourceUnreadable",
            )
        loaded = loaded[hf_split]
    yield from _rows_of(src, loaded)


def _rows_of(src: ResolvedSource, dataset: Any) -> Iterator[RawRow]:
    for number, row in enumerate(dataset, start=1):
        yield RawRow(src.uri, number, dict(row))


def read_rows(src: ResolvedSource, *, hf_split: str = "train") -> Iterator[RawRow]:
    """Every row of one input, in file order."""
    if src.format == "jsonl":
        return _read_jsonl(src)
    if src.format == "csv":
        return _read_csv(src)
    if src.format == "parquet":
        return _read_parquet(src)
    if src.format == "hf-disk":
        return _read_hf_disk(src, hf_split)
    if src.format == "hf-hub":
        return _rows_of(src, load_hub_dataset(src.uri, hf_split))
    raise DataError(f"{src.uri}: unsupported format {src.format!r}", reason="UnsupportedFormat")
