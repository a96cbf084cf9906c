"""Object-detection data: COCO annotation files or rows of ``image`` + ``objects``, checked image by image.

Two ways to give the data (``data.source``, ``additionalSources``, ``split.validationSource``/``testSource``):

- a **COCO annotation file** (a source whose name ends in ``.json``): ``images`` (``id``, ``file_name``,
  optional ``width``/``height``), ``annotations`` (``id``, ``image_id``, ``bbox`` ``[x, y, w, h]`` in pixels,
  ``category_id``) and ``categories`` (``id``, ``name``); each image is a row, its annotations its objects;
- **rows** (jsonl, csv, parquet) with the columns of the ``object-detection`` layout
  (``data.fields.image``: the image path; ``data.fields.objects``: a list of ``{"bbox": [x, y, w, h],
  "category": name}``).

Relative image paths are relative to the annotation file's folder. Every image is decoded in full here and
passes the same checks as an image-classification image (:func:`.images.examine_image`: decodable,
``data.images.mode``, ``minSize``/``maxSize``), so a broken or out-of-limits file is a malformed row found
before training, not in the middle of it.

A row is the image with all its boxes: a bad box makes the whole image malformed (dropping the box alone would
teach the model that its object is background), named with its source, 1-based position and reason
(missing or undecodable file, a box outside the image, zero or negative area, an unknown category, a size
that differs from the file's) through the same bad-row log and ``badRows.maxRatio`` as text rows. Images
with identical bytes are duplicates (the first copy is kept; held-out sources are read first, so an image in
both ``validationSource`` and ``source`` stays in validation, as for images and text), and a row's split is
the hash split of its id column or, without one, of its image's content hash, so a copy can never sit in two
splits.

Examples (:data:`DetectionExample`) are small dicts: the image path, its size, its boxes as
``[x1, y1, x2, y2]`` and its class ids (indices into ``category_names``); the task decodes the image at
collation. Torch-free.

Prepared and shared like every modality (:func:`.sharing.prepare_shared`): rank 0 prepares into a folder of
``store`` named by a key of the config, the sources and every image's bytes (``examples.json``,
``meta.json``, ``READY`` written last), the other ranks wait for it and read it instead of opening every image
again, and a restarted attempt with the same key reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.data.compliance import check_licences, config_digest
from finetune_trainer.data.config import DataConfig, ImagesConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import read_rows
from finetune_trainer.data.images import examine_image, refuse_near_dedup
from finetune_trainer.data.report import (
    DataReport,
    PiiRecord,
    Provenance,
    SourceRecord,
    SplitRecord,
    StageRecord,
)
from finetune_trainer.data.sharing import Plan, content_key, prepare_shared
from finetune_trainer.data.sources import ResolvedSource, resolve_source
from finetune_trainer.data.split import SPLITS, assign_split
from finetune_trainer.data.store import META, read_meta
from finetune_trainer.data.validation import BadRowLog

__all__ = [
    "DetectionData",
    "DetectionExample",
    "DetectionRow",
    "prepare_detection",
    "read_coco",
]

log = logging.getLogger(__name__)

#: Bumped whenever the stored layout or what the stages compute changes (part of the cache key).
LAYOUT_VERSION = "detection-1"

#: {"image": path, "width": int, "height": int, "boxes": [[x1, y1, x2, y2], ...], "labels": [int, ...],
#: "split": name, "index": position in the split}
DetectionExample = dict[str, Any]

#: How far (pixels) a box edge may pass the image border before the box is "outside": float noise only.
BORDER_TOLERANCE = 1e-3
COCO_SUFFIX = ".json"


@dataclass(frozen=True)
class AnnotatedObject:
    """One box as given, before it is checked."""

    bbox: Any
    #: The category name, or None when the annotation names none that exists (``problem`` says why).
    category: str | None
    #: What names the box in messages: ``annotation 7`` (COCO) or ``objects[2]`` (rows).
    what: str
    problem: str | None = None


@dataclass(frozen=True)
class DetectionRow:
    """One image as read, before it is checked: where it came from and its boxes as given."""

    source: str
    line: int
    role: str
    image: Path
    objects: tuple[AnnotatedObject, ...]
    #: The size the annotations declare (COCO ``width``/``height``), checked against the file.
    declared_size: tuple[int, int] | None = None
    row_id: str | None = None


@dataclass
class DetectionData:
    """What :func:`prepare_detection` returns (shaped like ``data.pipeline.PreparedData``)."""

    train: list[DetectionExample]
    validation: list[DetectionExample]
    test: list[DetectionExample]
    report: DataReport
    category_names: list[str]
    folder: Path | None = None
    samples: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        return self.category_names


class _BadRowError(ValueError):
    """Why an image cannot be used (the message names the box or the file)."""


# ------------------------------------------------------------------------------------------------ reading
def read_coco(src: ResolvedSource) -> tuple[list[DetectionRow], list[str], list[tuple[int, str]]]:
    """The rows of a COCO annotation file, its category names (in ``id`` order) and its malformed entries
    (1-based position, reason): ``images`` entries without a ``file_name`` and annotations that belong to
    no image."""
    try:
        document = json.loads(src.path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{src.uri}: not a readable COCO annotation file: {exc}", reason="SourceUnreadable"
        ) from exc
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DataError(
            f"{src.uri}: a COCO annotation file needs an 'images' list (and 'annotations', 'categories')",
            reason="SourceUnreadable",
        )
    categories = document.get("categories") or []
    try:
        by_id = {int(c["id"]): str(c["name"]) for c in categories}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{src.uri}: every entry of 'categories' needs an integer 'id' and a 'name' ({exc})",
            reason="SourceUnreadable",
        ) from exc
    names = [by_id[i] for i in sorted(by_id)]
    folder = src.path.parent
    per_image: dict[Any, list[AnnotatedObject]] = {}
    image_ids = {image.get("id") for image in document["images"] if isinstance(image, dict)}
    malformed: list[tuple[int, str]] = []
    for position, annotation in enumerate(document.get("annotations") or [], start=1):
        if not isinstance(annotation, dict) or annotation.get("image_id") not in image_ids:
            image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
            malformed.append(
                (position, f"annotations[{position - 1}]: image_id {image_id!r} is not in images")
            )
            continue
        category = annotation.get("category_id")
        name = by_id.get(category) if isinstance(category, int) else None
        per_image.setdefault(annotation["image_id"], []).append(
            AnnotatedObject(
                bbox=annotation.get("bbox"),
                category=name,
                what=f"annotation {annotation.get('id', position)}",
                problem=None if name is not None else f"unknown category_id {category!r}",
            )
        )
    rows = []
    for position, image in enumerate(document["images"], start=1):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            malformed.append((position, f"images[{position - 1}]: no 'file_name'"))
            continue
        width, height = image.get("width"), image.get("height")
        declared = (width, height) if isinstance(width, int) and isinstance(height, int) else None
        rows.append(
            DetectionRow(
                source=src.uri,
                line=position,
                role=src.role,
                image=folder / image["file_name"],
                objects=tuple(per_image.get(image.get("id"), [])),
                declared_size=declared,
                row_id=None,
            )
        )
    return rows, names, malformed


def _read_object_rows(src: ResolvedSource, cfg: DataConfig) -> Iterator[DetectionRow | tuple[int, str]]:
    """Rows of a jsonl/csv/parquet source in the object-detection layout, or (line, reason) when malformed."""
    fields = cfg.fields
    folder = src.path.parent
    for raw in read_rows(src, hf_split=cfg.hf_split):
        if raw.data is None:
            yield raw.line, raw.error or "unreadable row"
            continue
        image, objects = raw.data.get(fields.image), raw.data.get(fields.objects)
        if isinstance(objects, str):  # csv cells hold the list as JSON text
            try:
                objects = json.loads(objects)
            except json.JSONDecodeError as exc:
                yield raw.line, f"field {fields.objects!r}: not a JSON list ({exc})"
                continue
        if not isinstance(image, str) or not image:
            yield raw.line, f"field {fields.image!r}: missing or not a path"
            continue
        if not isinstance(objects, list):
            yield raw.line, f"field {fields.objects!r}: missing or not a list of {{bbox, category}}"
            continue
        parsed = []
        for i, obj in enumerate(objects):
            what = f"{fields.objects}[{i}]"
            if not isinstance(obj, dict) or obj.get("category") is None:
                parsed.append(AnnotatedObject(None, None, what, "no 'category'"))
            else:
                parsed.append(AnnotatedObject(obj.get("bbox"), str(obj["category"]), what))
        row_id = raw.data.get(fields.id) if fields.id else None
        yield DetectionRow(
            source=src.uri,
            line=raw.line,
            role=src.role,
            image=(folder / image) if not Path(image).is_absolute() else Path(image),
            objects=tuple(parsed),
            row_id=str(row_id) if row_id is not None else None,
        )


# ------------------------------------------------------------------------------------------------ checking
def _image_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise _BadRowError(f"image file {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _BadRowError(f"image file {path} cannot be read: {exc.strerror or exc}") from exc


def _digests(rows: list[DetectionRow]) -> list[str | None]:
    """Every row's image digest (None when its file cannot be read: the check names why). The bytes are
    read and let go: memory stays one image at a time."""
    digests: list[str | None] = []
    for row in rows:
        try:
            digests.append(hashlib.sha256(_image_bytes(row.image)).hexdigest())
        except _BadRowError:
            digests.append(None)
    return digests


def _box(bbox: Any, what: str, width: int, height: int) -> list[float]:
    """``[x, y, w, h]`` checked against the image → ``[x1, y1, x2, y2]``."""
    if (
        not isinstance(bbox, list | tuple)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        raise _BadRowError(f"{what}: bbox {bbox!r} is not four finite numbers [x, y, width, height]")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise _BadRowError(f"{what}: bbox {list(bbox)} has zero or negative area (width {w:g}, height {h:g})")
    tol = BORDER_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise _BadRowError(f"{what}: bbox {list(bbox)} lies outside the {width}x{height} image")
    return [x, y, x + w, y + h]


def _check(
    row: DetectionRow, digest: str | None, index: dict[str, int] | None, images: ImagesConfig
) -> tuple[DetectionExample, list[str]]:
    """The example of a row and its category names; :class:`_BadRowError` when unusable. The image passes
    the same checks as an image-classification image (:func:`.images.examine_image`: decodable in full,
    ``data.images`` mode and size)."""
    for obj in row.objects:
        if obj.problem is not None:
            raise _BadRowError(f"{obj.what}: {obj.problem}")
        if index is not None and obj.category not in index:
            raise _BadRowError(f"{obj.what}: unknown category {obj.category!r}")
    blob = _image_bytes(row.image)
    if hashlib.sha256(blob).hexdigest() != digest:
        raise _BadRowError(f"image file {row.image}: the file changed while the data was prepared")
    try:
        width, height, _ = examine_image(blob, images)
    except ValueError as exc:
        raise _BadRowError(f"image file {row.image}: {exc}") from exc
    if row.declared_size is not None and row.declared_size != (width, height):
        raise _BadRowError(
            f"image {row.image.name}: the annotations say {row.declared_size[0]}x{row.declared_size[1]}, "
            f"the file is {width}x{height}"
        )
    boxes = [_box(obj.bbox, obj.what, width, height) for obj in row.objects]
    example: DetectionExample = {"image": str(row.image), "width": width, "height": height, "boxes": boxes}
    return example, [str(obj.category) for obj in row.objects]


# ---------------------------------------------------------------------------------------------- preparing
def _sources(cfg: DataConfig, cache_dir: Path) -> list[ResolvedSource]:
    # Held-out sources first, as for images and text: de-duplication keeps the first copy, so an image in
    # both a held-out source and the training data stays held out (the held-out set is complete, no leak).
    wanted = [(cfg.split.validation_source, "validation"), (cfg.split.test_source, "test")]
    wanted += [(uri, "main") for uri in cfg.all_sources]
    resolved: list[ResolvedSource] = []
    for uri, role in wanted:
        if not uri:
            continue
        # A COCO file is one JSON document; the readers only know row formats, so it is resolved (found,
        # downloaded, hashed) as a file and parsed here.
        fmt = "jsonl" if uri.lower().endswith(COCO_SUFFIX) else cfg.format
        resolved += resolve_source(uri, fmt, role=role, cache_dir=cache_dir, hf_split=cfg.hf_split)
    return resolved


@dataclass
class _Read:
    """Every source's rows as read, before the images are checked."""

    rows: list[DetectionRow]
    #: The COCO files' categories (all equal), None for row sources.
    coco_names: list[str] | None
    #: Malformed entries found while reading (counted in the bad-row total).
    unreadable: int


def _read(cfg: DataConfig, sources: list[ResolvedSource], bad: BadRowLog, report: DataReport) -> _Read:
    read = _Read([], None, 0)
    for src in sources:
        before = len(read.rows) + bad.count
        if src.path.suffix.lower() == COCO_SUFFIX:
            found, names, malformed = read_coco(src)
            if read.coco_names is not None and names != read.coco_names:
                raise DataError(
                    f"{src.uri}: its categories {names} differ from an earlier annotation file's "
                    f"{read.coco_names}; every COCO source must list the same categories",
                    reason="InconsistentCategories",
                )
            read.coco_names = names
            read.rows += found
            for line, reason in malformed:
                bad.bad(src.uri, line, reason)
            read.unreadable += len(malformed)
        else:
            for item in _read_object_rows(src, cfg):
                if isinstance(item, DetectionRow):
                    read.rows.append(item)
                else:
                    bad.bad(src.uri, item[0], item[1])
                    read.unreadable += 1
        report.provenance.sources.append(
            SourceRecord(
                uri=src.uri,
                role=src.role,
                sha256=src.hashes[0][1] if len(src.hashes) == 1 else _combined(src.hashes),
                bytes=sum(h[2] for h in src.hashes),
                rows=len(read.rows) + bad.count - before,
            )
        )
    return read


def prepare_detection(
    cfg: DataConfig,
    workdir: Path,
    *,
    model_license: str | None = None,
    store: Path | None = None,
    attempt: str | None = None,
    wait: bool = False,
) -> DetectionData:
    """Read, check, de-duplicate and split the detection data; write ``data_report.json`` and
    ``provenance.json`` into ``workdir`` (also when a :class:`DataError` stops it). Deterministic: the same
    data and config give the same examples in the same order. Raises :class:`DataError` (too many malformed
    images, an empty train split, COCO files whose categories disagree, an unreadable source).

    Prepared and shared like every modality (:func:`.sharing.prepare_shared`): cached in ``store`` under a
    key of the config, the sources and every image's bytes, and reused by a later call with the same key (a
    restarted attempt); with ``attempt`` the other ranks (``wait=True``) read the preparing rank's result,
    or raise its :class:`DataError`."""
    bad = BadRowLog()
    report = DataReport(
        provenance=Provenance(config_digest=config_digest(cfg), tokenizer=""),
        mapping_kind="object-detection",
        template="none",
        bad_rows=bad.record(cfg.bad_rows.max_ratio),
        pii=PiiRecord(policy="not applicable (images)"),
    )

    def plan(downloads: Path) -> Plan:
        refuse_near_dedup(cfg)  # here, so that the waiting ranks end with the same error
        report.provenance.licences = check_licences(cfg.compliance, model_license=model_license)
        sources = _sources(cfg, downloads)
        try:
            read = _read(cfg, sources, bad, report)
        finally:
            report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
        digests = _digests(read.rows)
        key = content_key("detection", LAYOUT_VERSION, cfg, sources, model_license, digests)

        def build(folder: Path) -> None:
            try:
                _build(cfg, read, digests, bad, report, folder, key)
            finally:
                report.bad_rows = bad.record(cfg.bad_rows.max_ratio)

        return Plan(key, build)

    return prepare_shared(
        "detection", workdir, report, plan, _open, logger=log, store=store, attempt=attempt, wait=wait
    )


def _build(
    cfg: DataConfig,
    read: _Read,
    digests: list[str | None],
    bad: BadRowLog,
    report: DataReport,
    folder: Path,
    key: str,
) -> None:
    """Check, de-duplicate and split into ``folder`` (a private temporary folder, published after)."""
    index = {name: i for i, name in enumerate(read.coco_names)} if read.coco_names is not None else None
    checked: list[tuple[DetectionRow, DetectionExample, str, list[str]]] = []
    for row, digest in zip(read.rows, digests, strict=True):
        try:
            example, names = _check(row, digest, index, cfg.images)
        except _BadRowError as exc:
            bad.bad(row.source, row.line, str(exc))
            continue
        assert digest is not None  # _check refuses a row whose file could not be read
        checked.append((row, example, digest, names))
    bad.total = len(read.rows) + read.unreadable
    stages = [StageRecord(name="read", rows_in=bad.total, rows_out=len(checked), removed={})]
    report.provenance.stages = stages
    if bad.count:
        stages[0].removed["malformed"] = bad.count
    report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
    bad.check(cfg.bad_rows.max_ratio)

    seen: set[str] = set()
    unique = []
    for entry in checked:
        digest = entry[2]
        if cfg.dedup.exact and digest in seen:
            continue
        seen.add(digest)
        unique.append(entry)
    duplicates = len(checked) - len(unique)
    stages.append(
        StageRecord(
            name="dedup",
            rows_in=len(checked),
            rows_out=len(unique),
            removed={"duplicate": duplicates} if duplicates else {},
        )
    )

    names = read.coco_names if read.coco_names is not None else sorted({n for *_, ns in unique for n in ns})
    label_of = {name: i for i, name in enumerate(names)}
    splits: dict[str, list[DetectionExample]] = {name: [] for name in SPLITS}
    for row, example, digest, row_names in unique:
        place = row.role if row.role != "main" else assign_split(row.row_id or digest, cfg.split)
        example["labels"] = [label_of[n] for n in row_names]
        splits[place].append(example)
    for name, members in splits.items():
        for position, example in enumerate(members):
            # The split and the position in it seed the training-only augmentation draws.
            example["split"], example["index"] = name, position
    stages.append(StageRecord(name="split", rows_in=len(unique), rows_out=len(unique), removed={}))
    if not splits["train"]:
        raise DataError(
            f"the train split is empty ({len(unique)} usable images, split ratios validation "
            f"{cfg.split.validation:g}, test {cfg.split.test:g})",
            reason="EmptySplit",
        )
    report.splits = {
        name: SplitRecord(rows=len(examples), tokens=0, loss_tokens=0)
        for name, examples in splits.items()
        if examples or name != "test"
    }
    report.label_names = names
    (folder / EXAMPLES).write_text(json.dumps(splits, sort_keys=True), encoding="utf-8")
    meta = {
        "key": key,
        "report": report.model_dump(mode="json", by_alias=True),
        "categoryNames": names,
    }
    (folder / META).write_text(json.dumps(meta), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- sharing
EXAMPLES = "examples.json"


def _open(folder: Path) -> DetectionData:
    """The :class:`DetectionData` published into ``folder``."""
    meta = read_meta(folder)
    splits = json.loads((folder / EXAMPLES).read_text(encoding="utf-8"))
    return DetectionData(
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        report=DataReport.model_validate(meta["report"]),
        category_names=list(meta["categoryNames"]),
        folder=folder,
    )


def _combined(hashes: Sequence[tuple[str, str, int]]) -> str:
    digest = hashlib.sha256()
    for name, sha, _ in hashes:
        digest.update(f"{name}:{sha}\n".encode())
    return digest.hexdigest()
