"""Object-detection data: COCO annotation files or rows of ``image`` + ``objects``, checked image by image.

Two ways to give the data (``data.source``, ``additionalSources``, ``split.validationSource``/``testSource``):

- a **COCO annotation file** (a source whose name ends in ``.json``): ``images`` (``id``, ``file_name``,
  optional ``width``/``height``), ``annotations`` (``id``, ``image_id``, ``bbox`` ``[x, y, w, h]`` in pixels,
  ``category_id``) and ``categories`` (``id``, ``name``); each image is a row, its annotations its objects;
- **rows** (jsonl, csv, parquet) with the columns of the ``object-detection`` layout
  (``data.fields.image``: the image path; ``data.fields.objects``: a list of ``{"bbox": [x, y, w, h],
  "category": name}``).

Relative image paths are relative to the annotation file's folder. Every image is opened here (decodable,
converted to RGB, its size read), so a broken file is found before training, not in the middle of it.

A row is the image with all its boxes: a bad box makes the whole image malformed (dropping the box alone would
teach the model that its object is background), named with its source, 1-based position and reason
(missing or undecodable file, a box outside the image, zero or negative area, an unknown category, a size
that differs from the file's) through the same bad-row log and ``badRows.maxRatio`` as text rows. Images
with identical bytes are duplicates (the first copy is kept), and a row's split is the hash split of its id
column or, without one, of its image's content hash, so a copy can never sit in two splits.

Examples (:data:`DetectionExample`) are small dicts: the image path, its size, its boxes as
``[x1, y1, x2, y2]`` and its class ids (indices into ``category_names``); the task decodes the image at
collation. Torch-free.

Shared between ranks like the image and text pipelines (:mod:`finetune_trainer.data.sharing`): rank 0
prepares and publishes the examples and report into a folder of ``store`` (``examples.json``, ``meta.json``,
``READY`` written last), the other ranks wait for it and read it instead of opening every image again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.data.compliance import check_licences, config_digest
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import read_rows
from finetune_trainer.data.report import (
    DataReport,
    PiiRecord,
    Provenance,
    SourceRecord,
    SplitRecord,
    StageRecord,
    write_report,
)
from finetune_trainer.data.sharing import Publisher, wait_for
from finetune_trainer.data.sources import ResolvedSource, resolve_source, sha256_file
from finetune_trainer.data.split import SPLITS, assign_split
from finetune_trainer.data.store import META, READY, read_meta
from finetune_trainer.data.validation import BadRowLog

__all__ = [
    "DetectionData",
    "DetectionExample",
    "DetectionRow",
    "prepare_detection",
    "read_coco",
]

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
def _image_size_and_digest(path: Path) -> tuple[tuple[int, int], str]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise _BadRowError(f"image file {path} does not exist")
    digest, _ = sha256_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _BadRowError(f"image file {path} cannot be decoded: {exc}") from exc
    return size, digest


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


def _check(row: DetectionRow, index: dict[str, int] | None) -> tuple[DetectionExample, str, list[str]]:
    """The example of a row, its image digest and its category names; :class:`_BadRowError` when unusable."""
    for obj in row.objects:
        if obj.problem is not None:
            raise _BadRowError(f"{obj.what}: {obj.problem}")
        if index is not None and obj.category not in index:
            raise _BadRowError(f"{obj.what}: unknown category {obj.category!r}")
    (width, height), digest = _image_size_and_digest(row.image)
    if row.declared_size is not None and row.declared_size != (width, height):
        raise _BadRowError(
            f"image {row.image.name}: the annotations say {row.declared_size[0]}x{row.declared_size[1]}, "
            f"the file is {width}x{height}"
        )
    boxes = [_box(obj.bbox, obj.what, width, height) for obj in row.objects]
    example: DetectionExample = {"image": str(row.image), "width": width, "height": height, "boxes": boxes}
    return example, digest, [str(obj.category) for obj in row.objects]


# ---------------------------------------------------------------------------------------------- preparing
def _sources(cfg: DataConfig, cache_dir: Path) -> list[ResolvedSource]:
    wanted = [(uri, "main") for uri in cfg.all_sources]
    wanted += [(uri, role) for uri, role in ((cfg.split.validation_source, "validation"),) if uri]
    wanted += [(uri, role) for uri, role in ((cfg.split.test_source, "test"),) if uri]
    resolved: list[ResolvedSource] = []
    for uri, role in wanted:
        # A COCO file is one JSON document; the readers only know row formats, so it is resolved (found,
        # downloaded, hashed) as a file and parsed here.
        fmt = "jsonl" if uri.lower().endswith(COCO_SUFFIX) else cfg.format
        resolved += resolve_source(uri, fmt, role=role, cache_dir=cache_dir, hf_split=cfg.hf_split)
    return resolved


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
    ``provenance.json`` into ``workdir``. Deterministic: the same data and config give the same examples in
    the same order. Raises :class:`DataError` (too many malformed images, an empty train split, COCO files
    whose categories disagree, an unreadable source).

    With ``store`` and ``attempt`` the result is published into ``store`` for the other ranks of the attempt;
    ``wait=True`` (those ranks) reads the preparing rank's result instead, or raises its
    :class:`DataError`."""
    if wait:
        if store is None or attempt is None:
            raise ValueError("wait=True needs store= and attempt=")
        folder, _ = wait_for(store, attempt)
        return _open(folder)
    if store is None or attempt is None:
        return _prepare(cfg, workdir, model_license)
    publisher = Publisher(store, attempt)
    publisher.start()
    try:
        data = _prepare(cfg, workdir, model_license)
        data.folder = _publish(data, store)
    except BaseException as exc:
        publisher.failed(exc)
        raise
    publisher.ready(data.folder, reused=False)
    return data


def _prepare(cfg: DataConfig, workdir: Path, model_license: str | None) -> DetectionData:
    # Remote sources are downloaded into a temporary folder, never into workdir (the job's output.dir,
    # which is copied to output.copyTo with the artifact).
    with tempfile.TemporaryDirectory(prefix="fto-detection-sources-") as scratch:
        return _prepare_from(cfg, workdir, model_license, Path(scratch))


def _prepare_from(cfg: DataConfig, workdir: Path, model_license: str | None, cache: Path) -> DetectionData:
    licences = check_licences(cfg.compliance, model_license=model_license)
    workdir.mkdir(parents=True, exist_ok=True)
    sources = _sources(cfg, cache)
    rows: list[DetectionRow] = []
    bad = BadRowLog()
    coco_names: list[str] | None = None
    source_rows: dict[str, int] = {}
    unreadable = 0
    for src in sources:
        before = len(rows) + bad.count
        if src.path.suffix.lower() == COCO_SUFFIX:
            found, names, malformed = read_coco(src)
            if coco_names is not None and names != coco_names:
                raise DataError(
                    f"{src.uri}: its categories {names} differ from an earlier annotation file's "
                    f"{coco_names}; every COCO source must list the same categories",
                    reason="InconsistentCategories",
                )
            coco_names = names
            rows += found
            for line, reason in malformed:
                bad.bad(src.uri, line, reason)
            unreadable += len(malformed)
        else:
            for item in _read_object_rows(src, cfg):
                if isinstance(item, DetectionRow):
                    rows.append(item)
                else:
                    bad.bad(src.uri, item[0], item[1])
                    unreadable += 1
        source_rows[src.uri] = len(rows) + bad.count - before
    index = {name: i for i, name in enumerate(coco_names)} if coco_names is not None else None

    checked: list[tuple[DetectionRow, DetectionExample, str, list[str]]] = []
    for row in rows:
        try:
            example, digest, names = _check(row, index)
        except _BadRowError as exc:
            bad.bad(row.source, row.line, str(exc))
            continue
        checked.append((row, example, digest, names))
    bad.total = len(rows) + unreadable
    stages = [StageRecord(name="read", rows_in=bad.total, rows_out=len(checked), removed={})]
    if bad.count:
        stages[0].removed["malformed"] = bad.count
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

    names = coco_names if coco_names is not None else sorted({n for *_, ns in unique for n in ns})
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
    report = DataReport(
        provenance=Provenance(
            config_digest=config_digest(cfg),
            sources=[
                SourceRecord(
                    uri=src.uri,
                    role=src.role,
                    sha256=src.hashes[0][1] if len(src.hashes) == 1 else _combined(src.hashes),
                    bytes=sum(h[2] for h in src.hashes),
                    rows=source_rows[src.uri],
                )
                for src in sources
            ],
            stages=stages,
            tokenizer="",
            licences=licences,
        ),
        mapping_kind="object-detection",
        template="none",
        bad_rows=bad.record(cfg.bad_rows.max_ratio),
        pii=PiiRecord(policy="not applicable (images)"),
        splits={
            name: SplitRecord(rows=len(examples), tokens=0, loss_tokens=0)
            for name, examples in splits.items()
            if examples or name != "test"
        },
        label_names=names,
    )
    write_report(report, workdir)
    return DetectionData(
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        report=report,
        category_names=names,
        folder=workdir,
    )


# ----------------------------------------------------------------------------------------------- sharing
EXAMPLES = "examples.json"


def _publish(data: DetectionData, store: Path) -> Path:
    """Write ``data`` into ``store/detection-<digest of its content>`` (atomically; an identical folder
    already there is kept) and return the folder."""
    from finetune_trainer.data.pipeline import publish_folder

    examples = json.dumps({name: getattr(data, name) for name in SPLITS}, sort_keys=True)
    meta = {
        "report": data.report.model_dump(mode="json", by_alias=True),
        "categoryNames": data.category_names,
    }
    key = hashlib.sha256((examples + json.dumps(meta, sort_keys=True)).encode()).hexdigest()[:32]
    final = store / f"detection-{key}"
    if (final / READY).is_file():
        return final
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / EXAMPLES).write_text(examples, encoding="utf-8")
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _open(folder: Path) -> DetectionData:
    """The :class:`DetectionData` a preparing rank published into ``folder``."""
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
