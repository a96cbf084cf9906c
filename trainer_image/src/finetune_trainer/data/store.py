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

A memory-mapped table costs no memory until read. :class:`ExampleView` reads the (large) id and label values
with ``pread`` from the file the table maps instead of through the map, so the pages a rank reads stay in the
page cache, shared by every rank of the node, and never enter its resident set: a rank that samples a few
thousand examples at random would otherwise map whole large page-cache folios around each one (hundreds of
MB of file-backed RSS for a million rows). Only the offsets (4 bytes a row) are read through the map.
"""

from __future__ import annotations

import json
import os
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


@dataclass(frozen=True)
class _MappedFile:
    path: str
    start: int  # the map's address in this process
    size: int
    source: pa.MemoryMappedFile  # held, so that the address range stays this file's while listed


#: The files mapped by :func:`memory_mapped_table`, to find which file (and where in it) a buffer lies.
_MAPS: dict[str, _MappedFile] = {}


@lru_cache(maxsize=16)
def _mapped(path: str, inode: int, size: int, mtime_ns: int) -> pa.Table:
    source = pa.memory_map(path, "r")
    if size:
        _MAPS[path] = _MappedFile(path, source.read_buffer(1).address, size, source)
        source.seek(0)
    return pa.ipc.open_stream(source).read_all()


def forget_mapped_tables() -> None:
    """Drop the per-process cache of mapped tables (views keep the buffers they already hold)."""
    _mapped.cache_clear()
    _MAPS.clear()


def tables(paths: Sequence[Path]) -> pa.Table:
    return pa.concat_tables([memory_mapped_table(str(p)) for p in paths])


class _Values:
    """The values of one list-column chunk as ``int`` lists by offset range: read with ``pread`` from the
    mapped file when the chunk lies in one (see the module's docstring), sliced from memory otherwise."""

    def __init__(self, array: pa.Array) -> None:
        self._array = array.to_numpy()
        self._itemsize = self._array.dtype.itemsize
        self._file: tuple[str, int] | None = None  # (path, position of the first value)
        self._fd: tuple[int, int] | None = None  # (pid, descriptor), opened on first read in each process
        address = array.buffers()[1].address + array.offset * self._itemsize
        mapped = next((m for m in _MAPS.values() if m.start <= address < m.start + m.size), None)
        if mapped is not None:
            self._file = (mapped.path, address - mapped.start)

    @property
    def path(self) -> str | None:
        """The file the values are read from with ``pread``; None when they are sliced from memory."""
        return self._file[0] if self._file else None

    def __del__(self) -> None:
        if self._fd is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])

    def range(self, start: int, end: int) -> list[int]:
        if self._file is None:
            return self._array[start:end].tolist()  # type: ignore[no-any-return]
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self._file[0], os.O_RDONLY | os.O_CLOEXEC))
        size = self._itemsize
        raw = os.pread(self._fd[1], (end - start) * size, self._file[1] + start * size)
        return np.frombuffer(raw, dtype=self._array.dtype).tolist()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Chunk:
    start: int
    id_offsets: Any
    ids: _Values
    label_offsets: Any
    labels: _Values


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
                    _Values(ids_chunk.values),
                    labels_chunk.offsets.to_numpy(),
                    _Values(labels_chunk.values),
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

    def files(self) -> set[str | None]:
        """The files the examples' values are read from (None: a table in memory)."""
        return {values.path for chunk in self._chunks for values in (chunk.ids, chunk.labels)}

    def fingerprint(self) -> str:
        """What ``finetune_trainer.train.fingerprint`` gives for these examples (computed at preparation)."""
        return self._fingerprint

    def _example(self, row: int) -> Example:
        chunk = self._chunks[int(np.searchsorted(self._starts, row, side="right")) - 1]
        local = row - chunk.start
        ids = chunk.ids.range(int(chunk.id_offsets[local]), int(chunk.id_offsets[local + 1]))
        labels = chunk.labels.range(int(chunk.label_offsets[local]), int(chunk.label_offsets[local + 1]))
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
