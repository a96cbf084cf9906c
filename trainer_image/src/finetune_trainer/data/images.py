"""Image rows for image classification: read, validate, de-duplicate, split; decoded later, per batch.

Sources (``data.source``, ``additionalSources``, ``split.validationSource``/``testSource``):

- ``format: image-folder``: a folder with one sub-folder per class, ``root/<label>/<image>``; every file
  in a class folder is a row (a file that is not an image fails to decode and is reported), a file
  directly under ``root`` is a malformed row (it has no class).
- a csv/jsonl/parquet table (the generic readers of :mod:`finetune_trainer.data.formats`) with the
  ``fields.image`` and ``fields.label`` columns: the image is a path (relative to the table's folder, or
  absolute), raw encoded bytes, or ``{"bytes": …}`` / ``{"path": …}`` (a Hugging Face ``Image`` cell).

Stages, each counted in the data report (nothing is dropped silently):

1. read: a row without an image or a label is malformed (``badRows``; file and line named);
2. validate: every image is decoded in full by PIL (a truncated or corrupt file fails here), its colour
   mode converted to RGB or refused (``data.images.mode``), its size checked (``minSize``/``maxSize``);
   a failing row is a malformed row naming the file and the reason. The malformed ratio is checked here;
3. dedup (``dedup.exact``): images with the same bytes (SHA-256) are one row, the first copy wins;
4. split: the generic hash split (:mod:`finetune_trainer.data.split`) of the image's digest (or the
   ``fields.id`` column), so a copy never lands in two splits and appending images never moves others.

The prepared folder (cached in ``store`` under a key of the config, the sources and every image's
digest, and shared between ranks like the text pipeline's: rank 0 prepares, the others wait,
:mod:`finetune_trainer.data.sharing`) holds an Arrow index (``path`` or ``data``, ``label`` id,
``digest``), the row numbers of each split and ``meta.json`` (report, class names, train fingerprint).
Examples are :class:`ImageExample` dicts; :func:`load_image` decodes one as RGB.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, overload

import numpy as np
import pyarrow as pa

from finetune_trainer.data.compliance import check_licences, config_digest
from finetune_trainer.data.config import DataConfig, ImagesConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import read_rows
from finetune_trainer.data.mapping import MappingError
from finetune_trainer.data.report import (
    DataReport,
    ImageSplitRecord,
    PiiRecord,
    Provenance,
    SourceRecord,
    StageRecord,
)
from finetune_trainer.data.sharing import Plan, content_key, prepare_shared
from finetune_trainer.data.sources import ResolvedSource, resolve_source
from finetune_trainer.data.split import SPLITS, assign_split
from finetune_trainer.data.store import META, memory_mapped_table, read_meta
from finetune_trainer.data.validation import BadRowLog

__all__ = [
    "ImageExample",
    "PreparedImages",
    "examine_image",
    "load_image",
    "prepare_images",
    "refuse_near_dedup",
]

log = logging.getLogger(__name__)

#: Bumped whenever the stored layout or what the stages compute changes (part of the cache key).
LAYOUT_VERSION = "images-1"
INDEX = "index.arrow"
INDEX_SCHEMA = pa.schema(
    [("path", pa.string()), ("data", pa.large_binary()), ("label", pa.int32()), ("digest", pa.string())]
)


class ImageExample(TypedDict):
    """One prepared image: where its bytes are (a file, or the bytes themselves), its class id, and its
    place in its split (``index``; ``split``: augmentation applies to ``train`` only)."""

    path: str | None
    data: bytes | None
    label: int
    split: str
    index: int


@dataclass(frozen=True)
class _Row:
    """A row as read: where it came from, its image (path or bytes), its label, or why it is malformed."""

    source: str
    line: int
    path: str | None = None
    data: bytes | None = None
    label: str | None = None
    row_id: str | None = None
    error: str | None = None

    @property
    def what(self) -> str:
        """How the row's image is named in messages."""
        return repr(self.path) if self.path is not None else f"{len(self.data or b'')} bytes"


@dataclass
class PreparedImages:
    """What :meth:`ImageClassification.prepare` gives the loop (the shape of pipeline.PreparedData)."""

    train: Sequence[ImageExample]
    validation: Sequence[ImageExample]
    test: Sequence[ImageExample]
    report: DataReport
    label_names: list[str] = field(default_factory=list)
    folder: Path | None = None


# ------------------------------------------------------------------------------------------------ reading
def _folder_rows(root: Path) -> Iterator[_Row]:
    """``root/<label>/<file>`` in sorted order; ``line`` is the 1-based position in that order."""
    entries = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    for number, path in enumerate(entries, start=1):
        relative = path.relative_to(root)
        if len(relative.parts) != 2:
            where = "directly in the folder" if len(relative.parts) == 1 else "nested below a class folder"
            yield _Row(str(root), number, path=str(path), error=f"{relative}: {where}, not in a class folder")
            continue
        yield _Row(str(root), number, path=str(path), label=relative.parts[0])


def _cell_image(value: Any, column: str, base: Path) -> tuple[str | None, bytes | None]:
    if isinstance(value, dict):  # a Hugging Face Image cell
        if value.get("bytes"):
            return None, bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return None, bytes(value)
    if isinstance(value, str) and value.strip():
        path = Path(value)
        return str(path if path.is_absolute() else base / path), None
    raise MappingError(f"field {column!r} must be an image path or image bytes, got {type(value).__name__}")


def _label(value: Any, column: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise MappingError(f"missing label {column!r}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(f"label {column!r} must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _table_rows(src: ResolvedSource, cfg: DataConfig) -> Iterator[_Row]:
    fields = cfg.fields
    base = src.path.parent
    for raw in read_rows(src, hf_split=cfg.hf_split):
        if raw.data is None:
            yield _Row(raw.source, raw.line, error=raw.error or "malformed")
            continue
        try:
            if raw.data.get(fields.image) is None:
                raise MappingError(f"missing field {fields.image!r}")
            path, data = _cell_image(raw.data[fields.image], fields.image, base)
            label = _label(raw.data.get(fields.label), fields.label)
            row_id = _label(raw.data.get(fields.id), fields.id) if fields.id is not None else None
        except MappingError as exc:
            yield _Row(raw.source, raw.line, error=str(exc))
            continue
        yield _Row(raw.source, raw.line, path=path, data=data, label=label, row_id=row_id)


def _resolve(uri: str, cfg: DataConfig, role: str, cache_dir: Path) -> list[ResolvedSource]:
    if cfg.format != "image-folder":
        return resolve_source(uri, cfg.format, role=role, cache_dir=cache_dir, hf_split=cfg.hf_split)
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    root = Path(local)
    if "://" in local or not root.is_dir():
        raise DataError(
            f"{uri}: format image-folder needs a local folder (or a mounted volume) with a folder per class",
            reason="SourceUnreadable",
        )
    return [ResolvedSource(uri=uri, path=root, format="image-folder", role=role, hashes=())]


def _sources(cfg: DataConfig, cache_dir: Path) -> list[ResolvedSource]:
    # Held-out sources first: de-duplication keeps the first copy, so an image in both stays held out.
    roles = [("validation", cfg.split.validation_source), ("test", cfg.split.test_source)]
    roles += [("main", uri) for uri in cfg.all_sources]
    return [src for role, uri in roles if uri for src in _resolve(uri, cfg, role, cache_dir)]


def _read(
    cfg: DataConfig, sources: list[ResolvedSource]
) -> tuple[list[tuple[str, _Row]], list[SourceRecord]]:
    """Every row of every source with its role, and the sources' records for the provenance."""
    rows: list[tuple[str, _Row]] = []
    records: list[SourceRecord] = []
    for src in sources:
        read = list(_folder_rows(src.path) if src.format == "image-folder" else _table_rows(src, cfg))
        rows += [(src.role, row) for row in read]
        digest, size = src.hashes[0][1:] if src.hashes else ("", 0)
        records.append(SourceRecord(uri=src.uri, role=src.role, sha256=digest, bytes=size, rows=len(read)))
    return rows, records


# --------------------------------------------------------------------------------------------- validation
def _image_bytes(row: _Row) -> bytes:
    if row.data is not None:
        return row.data
    assert row.path is not None
    try:
        return Path(row.path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {row.path}: {exc.strerror or exc}") from exc


def refuse_near_dedup(cfg: DataConfig) -> None:
    """Images (classification and detection) are de-duplicated by their bytes; ``dedup.near`` is refused."""
    if cfg.dedup.near:
        raise DataError(
            "data.dedup.near finds near-duplicate text; images are de-duplicated by their bytes "
            "(dedup.exact)",
            reason="InvalidConfig",
        )


def examine_image(blob: bytes, cfg: ImagesConfig) -> tuple[int, int, str]:
    """(width, height, mode) of an encoded image that passes ``data.images``; ValueError says why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()  # decode every pixel: a truncated file fails here, not in the middle of training
            width, height, mode = image.width, image.height, image.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode the image ({exc})") from exc
    if mode != "RGB" and cfg.mode == "refuse":
        raise ValueError(f"colour mode {mode} is not RGB (data.images.mode: refuse)")
    if min(width, height) < cfg.min_size:
        raise ValueError(f"{width}x{height} pixels is below data.images.minSize {cfg.min_size}")
    if cfg.max_size is not None and max(width, height) > cfg.max_size:
        raise ValueError(f"{width}x{height} pixels is above data.images.maxSize {cfg.max_size}")
    return width, height, mode


def load_image(example: ImageExample) -> Any:
    """The example's image as an RGB PIL image (validation already proved it decodes)."""
    from PIL import Image

    source: Any = io.BytesIO(example["data"]) if example["data"] is not None else example["path"]
    with Image.open(source) as image:
        return image.convert("RGB")


# ------------------------------------------------------------------------------------------- the stages
@dataclass
class _Kept:
    """A row that passed validation, with what the later stages need."""

    role: str
    row: _Row
    digest: str
    size: tuple[int, int]
    mode: str


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _label_names(labels: set[str]) -> list[str]:
    if all(n.lstrip("-").isdigit() for n in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _stage(name: str, rows_in: int, rows_out: int, removed: dict[str, int]) -> StageRecord:
    log.info("image data stage %s: %d -> %d rows %s", name, rows_in, rows_out, removed or "")
    return StageRecord(
        name=name, rows_in=rows_in, rows_out=rows_out, removed={k: v for k, v in removed.items() if v}
    )


def _digests(rows: list[tuple[str, _Row]]) -> tuple[list[tuple[str, _Row]], list[str | None]]:
    """Every row's image digest (None for a malformed row); a row whose file cannot be read becomes
    malformed. The bytes are read and let go: memory stays one image at a time."""
    out: list[tuple[str, _Row]] = []
    digests: list[str | None] = []
    for role, row in rows:
        digest = None
        if row.error is None:
            try:
                digest = _digest(_image_bytes(row))
            except ValueError as exc:
                row = _Row(row.source, row.line, path=row.path, error=f"image {row.what}: {exc}")
        out.append((role, row))
        digests.append(digest)
    return out, digests


def _validate(
    cfg: DataConfig, rows: list[tuple[str, _Row]], digests: list[str | None], bad: BadRowLog
) -> list[_Kept]:
    kept: list[_Kept] = []
    for (role, row), digest in zip(rows, digests, strict=True):
        bad.row_read()
        if row.error is not None or digest is None:
            bad.bad(row.source, row.line, row.error or "unreadable")
            continue
        try:
            blob = _image_bytes(row)
            if _digest(blob) != digest:
                raise ValueError("the file changed while the data was prepared")
            width, height, mode = examine_image(blob, cfg.images)
        except ValueError as exc:
            bad.bad(row.source, row.line, f"image {row.what}: {exc}")
            continue
        kept.append(_Kept(role, row, digest, (width, height), mode))
    return kept


def _split_record(members: list[_Kept], label_index: dict[str, int]) -> ImageSplitRecord:
    widths = [k.size[0] for k in members] or [0]
    heights = [k.size[1] for k in members] or [0]
    classes = [0] * len(label_index)
    modes: dict[str, int] = {}
    for k in members:
        classes[label_index[k.row.label or ""]] += 1
        modes[k.mode] = modes.get(k.mode, 0) + 1
    return ImageSplitRecord(
        images=len(members),
        per_class=classes,
        modes=modes,
        min_width=min(widths),
        max_width=max(widths),
        min_height=min(heights),
        max_height=max(heights),
    )


def _build(
    cfg: DataConfig,
    rows: list[tuple[str, _Row]],
    digests: list[str | None],
    folder: Path,
    key: str,
    report: DataReport,
    bad: BadRowLog,
) -> None:
    """Validate, de-duplicate and split into ``folder`` (a private temporary folder, published after)."""
    kept = _validate(cfg, rows, digests, bad)
    stages = [_stage("read + validate", len(rows), len(kept), {"malformed": bad.count})]
    report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
    report.provenance.stages = stages
    bad.check(cfg.bad_rows.max_ratio)
    unique = kept
    if cfg.dedup.exact:
        seen: set[str] = set()
        unique = [k for k in kept if not (k.digest in seen or seen.add(k.digest))]  # type: ignore[func-returns-value]
    stages.append(_stage("dedup", len(kept), len(unique), {"duplicate_image": len(kept) - len(unique)}))
    placed: dict[str, list[_Kept]] = {name: [] for name in SPLITS}
    for k in unique:
        key_of_row = f"id:{k.row.row_id}" if k.row.row_id is not None else f"content:{k.digest}"
        placed[k.role if k.role != "main" else assign_split(key_of_row, cfg.split)].append(k)
    stages.append(_stage("split", len(unique), len(unique), {}))
    ratios = {
        "validation": cfg.split.validation_source or cfg.split.validation,
        "test": cfg.split.test_source or cfg.split.test,
    }
    for name in SPLITS:
        if not placed[name] and (name == "train" or ratios[name]):
            raise DataError(
                f"the {name} split has no image ({len(unique)} images after validation and de-duplication); "
                "add images or change data.split",
                reason="EmptySplit",
            )
    label_names = _label_names({k.row.label or "" for k in unique})
    label_index = {name: i for i, name in enumerate(label_names)}
    ordered = [k for name in SPLITS for k in placed[name]]
    table = pa.Table.from_pydict(
        {
            "path": [k.row.path if k.row.data is None else None for k in ordered],
            "data": [k.row.data for k in ordered],
            "label": [label_index[k.row.label or ""] for k in ordered],
            "digest": [k.digest for k in ordered],
        },
        schema=INDEX_SCHEMA,
    )
    with pa.ipc.new_stream(str(folder / INDEX), INDEX_SCHEMA) as writer:
        writer.write_table(table)
    start = 0
    for name in SPLITS:
        np.save(folder / f"{name}.rows.npy", np.arange(start, start + len(placed[name]), dtype=np.int64))
        start += len(placed[name])
        report.images[name] = _split_record(placed[name], label_index)
    fingerprint = hashlib.sha256(
        "\n".join(f"{k.digest}:{label_index[k.row.label or '']}" for k in placed["train"]).encode()
    ).hexdigest()[:16]
    report.label_names = label_names
    report.provenance.stages = stages
    meta = {
        "key": key,
        "fingerprint": fingerprint,
        "labelNames": label_names,
        "report": report.model_dump(mode="json", by_alias=True),
    }
    (folder / META).write_text(json.dumps(meta), encoding="utf-8")


# ------------------------------------------------------------------------------------------ the examples
class ImageExampleView(Sequence[ImageExample]):
    """One split of a prepared folder, read by index from the memory-mapped index table."""

    def __init__(self, table: pa.Table, rows: np.ndarray, split: str, fingerprint: str = "") -> None:
        self._table = table
        self._rows = rows
        self._split = split
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> ImageExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[ImageExample]: ...

    def __getitem__(self, index: int | slice) -> ImageExample | list[ImageExample]:
        if isinstance(index, slice):
            return [self._example(i) for i in range(len(self))[index]]
        return self._example(range(len(self))[index])

    def _example(self, position: int) -> ImageExample:
        row = int(self._rows[position])
        data = self._table.column("data")[row].as_py()
        return ImageExample(
            path=self._table.column("path")[row].as_py(),
            data=data,
            label=int(self._table.column("label")[row].as_py()),
            split=self._split,
            index=position,
        )

    def fingerprint(self) -> str:
        """A digest of the train split's images and labels (computed at preparation)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"ImageExampleView({self._split}, {len(self)} images)"


def _open(folder: Path) -> PreparedImages:
    meta = read_meta(folder)
    report = DataReport.model_validate(meta["report"])
    table = memory_mapped_table(str(folder / INDEX))
    views = {
        name: ImageExampleView(
            table,
            np.load(folder / f"{name}.rows.npy"),
            name,
            meta["fingerprint"] if name == "train" else "",
        )
        for name in SPLITS
    }
    return PreparedImages(
        train=views["train"],
        validation=views["validation"],
        test=views["test"],
        report=report,
        label_names=list(meta["labelNames"]),
        folder=folder,
    )


# ------------------------------------------------------------------------------------------- entry point
def prepare_images(
    cfg: DataConfig,
    workdir: Path,
    *,
    model_license: str | None = None,
    store: Path | None = None,
    attempt: str | None = None,
    wait: bool = False,
) -> PreparedImages:
    """Read, validate, de-duplicate and split image rows; write ``data_report.json`` and ``provenance.json``
    into ``workdir`` (also when a :class:`DataError` stops it). ``store``/``attempt``/``wait`` as in
    :func:`finetune_trainer.data.pipeline.prepare`: without ``store`` the prepared folder is temporary."""
    bad = BadRowLog()
    report = DataReport(
        provenance=Provenance(config_digest=config_digest(cfg), tokenizer=""),
        mapping_kind=cfg.fields.kind,
        template="none",
        pii=PiiRecord(policy="allow"),
    )

    def plan(downloads: Path) -> Plan:
        refuse_near_dedup(cfg)  # here, so that the waiting ranks end with the same error
        report.provenance.licences = check_licences(cfg.compliance, model_license=model_license)
        sources = _sources(cfg, downloads)
        rows, report.provenance.sources = _read(cfg, sources)
        rows, digests = _digests(rows)
        key = content_key("images", LAYOUT_VERSION, cfg, sources, model_license, digests)
        return Plan(key, lambda folder: _build(cfg, rows, digests, folder, key, report, bad))

    return prepare_shared(
        "images", workdir, report, plan, _open, logger=log, store=store, attempt=attempt, wait=wait
    )
