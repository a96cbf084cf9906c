"""Prepared examples on disk, read by index: Arrow tables (``int32`` ids and labels) memory-mapped, plus the
row numbers of each split.

Layout of one prepared folder (written by :mod:`finetune_trainer.data.pipeline`, published by renaming it
into place; see :mod:`finetune_trainer.data.sharing`)::

    <key>/
        examples-*.arrow      every encoded row (Arrow IPC stream: input_ids, labels, dropped, length, ...)
        packed.arrow          the packed training blocks (packing on)
        train.rows.npy        row numbers of each split's examples in its table, in order
        validation.rows.npy
        test.rows.npy
        meta.json             the data report, text samples, class names, the train fingerprint, files
        READY                 written last

A memory-mapped table costs no memory until read; pages read are the page cache's, shared by every rank of
the node that maps the same file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa

from finetune_trainer.data.encoding import Example

__all__ = [
    "META",
    "READY",
    "ExampleView",
    "forget_mapped_tables",
    "memory_mapped_table",
    "open_split",
    "read_meta",
    "tables",
]

READY = "READY"
META = "meta.json"


def memory_mapped_table(path: str) -> pa.Table:
    """An Arrow IPC stream file as a table backed by a memory map (no copy; cached per process and file
    version, so that a rewritten file is mapped anew)."""
    stat = Path(path).stat()
    return _mapped(path, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _mapped(path: str, inode: int, size: int, mtime_ns: int) -> pa.Table:
    return pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()


def forget_mapped_tables() -> None:
    """Drop the per-process cache of mapped tables (views keep the buffers they already hold)."""
    _mapped.cache_clear()


def tables(paths: Sequence[Path]) -> pa.Table:
    return pa.concat_tables([memory_mapped_table(str(p)) for p in paths])


@dataclass(frozen=True)
class _Chunk:
    start: int
    id_offsets: Any
    ids: Any
    label_offsets: Any
    labels: Any


class ExampleView(Sequence[Example]):
    """The examples of one split: ``len`` and ``view[i]`` give the same ``Example`` dicts (lists of ints) as
    a list would; slices give lists. Reads go straight to the memory-mapped Arrow buffers."""

    def __init__(self, table: pa.Table, rows: Any, fingerprint: str = "") -> None:
        self._rows = np.asarray(rows, dtype=np.int64)
        self._fingerprint = fingerprint
        self._chunks: list[_Chunk] = []
        start = 0
        ids_column, labels_column = table.column("input_ids"), table.column("labels")
        for ids_chunk, labels_chunk in zip(
            ids_column.chunks, _aligned(labels_column, ids_column), strict=True
        ):
            self._chunks.append(
                _Chunk(
                    start,
                    ids_chunk.offsets.to_numpy(),
                    ids_chunk.values.to_numpy(),
                    labels_chunk.offsets.to_numpy(),
                    labels_chunk.values.to_numpy(),
                )
            )
            start += len(ids_chunk)
        self._starts = np.asarray([c.start for c in self._chunks], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self._example(int(row)) for row in self._rows[index]]
        return self._example(int(self._rows[index]))

    def __iter__(self) -> Iterator[Example]:
        for row in self._rows.tolist():
            yield self._example(row)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Sequence[Example]) -> list[Example]:
        return [*self, *other]

    def __radd__(self, other: Sequence[Example]) -> list[Example]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"ExampleView({len(self)} examples)"

    def fingerprint(self) -> str:
        """What ``finetune_trainer.train.fingerprint`` gives for these examples (computed at preparation)."""
        return self._fingerprint

    def _example(self, row: int) -> Example:
        chunk = self._chunks[int(np.searchsorted(self._starts, row, side="right")) - 1]
        local = row - chunk.start
        ids = chunk.ids[chunk.id_offsets[local] : chunk.id_offsets[local + 1]].tolist()
        labels = chunk.labels[chunk.label_offsets[local] : chunk.label_offsets[local + 1]].tolist()
        return Example(input_ids=ids, attention_mask=[1] * len(ids), labels=labels)


def _aligned(column: pa.ChunkedArray, like: pa.ChunkedArray) -> list[pa.Array]:
    """``column``'s chunks cut at the same rows as ``like``'s (columns of one table usually are)."""
    if [len(c) for c in column.chunks] == [len(c) for c in like.chunks]:
        return list(column.chunks)
    out, start = [], 0
    for chunk in like.chunks:
        out.append(column.slice(start, len(chunk)).combine_chunks())
        start += len(chunk)
    return out


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def open_split(folder: Path, meta: dict[str, Any], split: str) -> ExampleView:
    """One split of a prepared folder, memory-mapped."""
    files = meta["files"]["train" if split == "train" and "train" in meta["files"] else "examples"]
    rows = np.load(folder / f"{split}.rows.npy", mmap_mode="r")
    fingerprint = meta.get("fingerprint", "") if split == "train" else ""
    return ExampleView(tables([folder / name for name in files]), rows, fingerprint)
