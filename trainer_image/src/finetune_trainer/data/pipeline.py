"""Data preparation entry point used by the trainer.

Public API (stable; the trainer codes against it)::

    from finetune_trainer.data import DataConfig, DataError
    from finetune_trainer.data.pipeline import PreparedData, prepare
    from finetune_trainer.data.report import DataReport, render_data_section, write_report

    prepared: PreparedData = prepare(cfg.data, tokenizer, workdir, model_license="apache-2.0")
    prepared.train / .validation / .test   # list[Example]; Example = {"input_ids": list[int],
                                           #   "attention_mask": list[int], "labels": list[int]}
                                           # labels are -100 on prompt tokens (completionOnlyLoss) and, for
                                           # kind "classification", a one-element list [class_id].
    prepared.samples["validation"]         # list[TextSample(prompt, completion)]: rendered prompt text for
                                           #   generation samples and the reference completion (<= 32 each)
    prepared.label_names                   # class names for kind "classification", else None
    prepared.report                        # DataReport; prepare() already wrote workdir/data_report.json
                                           #   and workdir/provenance.json (workdir may be the output folder:
                                           #   downloaded sources go to a temporary folder, or cache_dir=)
    render_data_section(prepared.report)   # Markdown "## Data" section for the model card

``prepare`` raises :class:`DataError` (message names the cause; ``.reason`` is a CamelCase code) for: too many
malformed rows, PII rejections above the limit, a licence not in the allowlist, an unreadable or empty source,
an empty train split. The trainer maps it to ``ExitCode.DATA_ERROR``. Examples are not padded; the collator
pads (``tokenizer.pad_token_id`` for input_ids, 0 for attention_mask, -100 for labels). ``prepare`` is
deterministic: the same config, data and tokenizer give the same examples in the same order on every rank.

Tests build a tiny tokenizer with ``trainer_image/tests/tiny_tokenizer.py`` (``make_tiny_tokenizer()``:
a character-level ``PreTrainedTokenizerFast`` with pad/eos/bos and a chatml-like chat template; no download).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.data.augmentation import augment
from finetune_trainer.data.cleaning import clean_record, length_violation
from finetune_trainer.data.compliance import check_licences, config_digest
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.dedup import ExactDeduplicator, NearDeduplicator
from finetune_trainer.data.encoding import Example, encode_batch, pack
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import read_rows
from finetune_trainer.data.mapping import MappingError, Record, map_row
from finetune_trainer.data.pii import PiiDetector
from finetune_trainer.data.report import (
    DataReport,
    LicenceRecord,
    PiiRecord,
    Provenance,
    SourceRecord,
    SplitRecord,
    StageRecord,
    histogram,
    write_report,
)
from finetune_trainer.data.sources import ResolvedSource, resolve_source
from finetune_trainer.data.split import SPLITS, assign_split
from finetune_trainer.data.templates import Rendered, render
from finetune_trainer.data.validation import BadRowLog

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DataError", "Example", "PreparedData", "TextSample", "prepare"]

log = logging.getLogger(__name__)

#: Text samples kept per evaluation split for generation.
SAMPLES_KEPT = 32


@dataclass(frozen=True)
class TextSample:
    """A rendered prompt (what the model sees before generating) and its reference completion."""

    prompt: str
    completion: str


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    report: DataReport
    samples: dict[str, list[TextSample]] = field(default_factory=dict)
    label_names: list[str] | None = None


class _Stages:
    """Row counts per stage, in order; every removal has a reason."""

    def __init__(self) -> None:
        self.records: list[StageRecord] = []

    def add(self, name: str, rows_in: int, rows_out: int, removed: dict[str, int] | None = None) -> None:
        removed = {reason: n for reason, n in (removed or {}).items() if n}
        self.records.append(StageRecord(name=name, rows_in=rows_in, rows_out=rows_out, removed=removed))
        log.info("data stage %s: %d -> %d rows %s", name, rows_in, rows_out, removed or "")


def _count(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


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


def _read(
    cfg: DataConfig, sources: list[ResolvedSource], bad: BadRowLog
) -> tuple[list[tuple[str, Record]], list[SourceRecord]]:
    rows: list[tuple[str, Record]] = []
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
                    rows.append((src.role, map_row(raw.data, cfg.fields, source=raw.source, line=raw.line)))
                except MappingError as exc:
                    bad.bad(raw.source, raw.line, str(exc))
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
    return rows, records


def _clean(cfg: DataConfig, rows: list[tuple[str, Record]], stages: _Stages) -> list[tuple[str, Record]]:
    removed: dict[str, int] = {}
    kept = []
    for role, record in rows:
        cleaned = clean_record(record, cfg.cleaning)
        violation = length_violation(cleaned, cfg.cleaning)
        if violation:
            _count(removed, violation)
        else:
            kept.append((role, cleaned))
    stages.add("clean", len(rows), len(kept), removed)
    return kept


def _scrub(
    cfg: DataConfig, rows: list[tuple[str, Record]], stages: _Stages
) -> tuple[list[tuple[str, Record]], PiiRecord]:
    detector = PiiDetector(cfg.pii)
    matches: dict[str, int] = {}
    with_pii = 0
    kept = []
    for role, record in rows:
        found: dict[str, int] = {}

        def scrub(text: str, found: dict[str, int] = found) -> str:
            result = detector.scan(text)
            for kind, n in result.counts.items():
                _count(found, kind, n)
            return result.text

        scrubbed = record.map_texts(scrub)
        for kind, n in found.items():
            _count(matches, kind, n)
        if found:
            with_pii += 1
        if found and cfg.pii.policy == "reject":
            continue
        kept.append((role, scrubbed if cfg.pii.policy == "scrub" else record))
    rejected = len(rows) - len(kept)
    stages.add("pii", len(rows), len(kept), {"pii": rejected})
    pii = PiiRecord(policy=cfg.pii.policy, matches=matches, rows_with_pii=with_pii, rows_rejected=rejected)
    if rows and rejected / len(rows) > cfg.pii.max_reject_ratio:
        raise DataError(
            f"{rejected} of {len(rows)} rows contain personal data ({rejected / len(rows):.2%} > "
            f"pii.maxRejectRatio {cfg.pii.max_reject_ratio:.2%}); found {matches}. Use policy 'scrub' or "
            "clean the data.",
            reason="TooMuchPersonalData",
        )
    return kept, pii


def _dedup(cfg: DataConfig, rows: list[tuple[str, Record]], stages: _Stages) -> list[tuple[str, Record]]:
    exact = ExactDeduplicator() if cfg.dedup.exact else None
    near = NearDeduplicator(cfg.dedup) if cfg.dedup.near else None
    removed: dict[str, int] = {}
    kept = []
    for role, record in rows:
        if exact is not None and exact.seen(record):
            _count(removed, "exact_duplicate")
        elif near is not None and near.is_near_duplicate(record):
            _count(removed, "near_duplicate")
        else:
            kept.append((role, record))
    stages.add("dedup", len(rows), len(kept), removed)
    return kept


def _split(cfg: DataConfig, rows: list[tuple[str, Record]], stages: _Stages) -> dict[str, list[Record]]:
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for role, record in rows:
        splits[role if role != "main" else assign_split(record.split_key(), cfg.split)].append(record)
    stages.add("split", len(rows), sum(len(v) for v in splits.values()))
    if not splits["train"]:
        raise DataError("the train split is empty after filtering; see data_report.json", reason="EmptySplit")
    for name, wanted in (
        ("validation", cfg.split.validation_source or cfg.split.validation > 0),
        ("test", cfg.split.test_source or cfg.split.test > 0),
    ):
        if wanted and not splits[name]:
            raise DataError(
                f"the {name} split is empty ({len(rows)} rows after filtering); add rows, raise "
                f"split.{name}, give split.{name}Source, or set split.{name} to 0",
                reason="EmptySplit",
            )
    return splits


def _label_names(records: Iterable[Record]) -> list[str]:
    names = {r.label for r in records if r.label is not None}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _encode_split(
    cfg: DataConfig,
    records: list[Record],
    tokenizer: Any,
    label_index: dict[str, int] | None,
    dropped: dict[str, int],
) -> tuple[list[Example], list[tuple[Record, Rendered]], int]:
    try:
        rendered = [render(r, cfg, tokenizer) for r in records]
    except ValueError as exc:
        raise DataError(
            f"cannot render rows with template {cfg.template!r}: {exc}", reason="TemplateError"
        ) from exc
    encoded = encode_batch(
        rendered,
        tokenizer,
        max_length=cfg.max_seq_length,
        truncation=cfg.truncation,
        completion_only=cfg.completion_only_loss and cfg.fields.kind != "text",
        add_eos=cfg.add_eos and cfg.fields.kind != "classification",
        add_special_tokens=cfg.template != "tokenizer",
    )
    examples: list[Example] = []
    kept: list[tuple[Record, Rendered]] = []
    truncated = 0
    for record, item, result in zip(records, rendered, encoded, strict=True):
        if label_index is not None and result.dropped == "no_loss_tokens":
            result.dropped = None  # classification: the label is the target, not the tokens
        if result.dropped or result.example is None:
            if result.dropped is None:
                raise AssertionError("an encoded example is missing")
            _count(dropped, result.dropped)
            continue
        example = result.example
        if label_index is not None and record.label is not None:
            example = Example(
                input_ids=example["input_ids"],
                attention_mask=example["attention_mask"],
                labels=[label_index[record.label]],
            )
        truncated += result.truncated
        examples.append(example)
        kept.append((record, item))
    return examples, kept, truncated


def _split_record(
    examples: list[Example], truncated: int, max_length: int, classification: bool
) -> SplitRecord:
    lengths = [len(e["input_ids"]) for e in examples]
    loss_tokens = (
        len(examples) if classification else sum(sum(1 for t in e["labels"] if t != -100) for e in examples)
    )
    return SplitRecord(
        rows=len(examples),
        tokens=sum(lengths),
        loss_tokens=loss_tokens,
        truncated=truncated,
        length_histogram=histogram(lengths, max(lengths, default=max_length)),
        min_tokens=min(lengths, default=0),
        max_tokens=max(lengths, default=0),
        mean_tokens=sum(lengths) / len(lengths) if lengths else 0.0,
    )


def prepare(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    workdir: Path,
    *,
    model_license: str | None = None,
    cache_dir: Path | None = None,
) -> PreparedData:
    """Read, validate, clean, scrub, de-duplicate, split, render and tokenize; write the report into workdir.

    Stage order: read (+ validate) → clean + length filter → PII → de-duplicate → split → augment (train) →
    tokenize (+ truncate) → pack (train). ``data_report.json`` and ``provenance.json`` are written to
    ``workdir`` also when a :class:`DataError` stops the preparation (as far as it got). Remote sources are
    downloaded into ``cache_dir`` (kept, re-downloaded on the next call) or, by default, into a temporary
    folder removed on return, so that no copy of the data lands in ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stages = _Stages()
    bad = BadRowLog()
    provenance = Provenance(
        config_digest=config_digest(cfg),
        tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
    )
    report = DataReport(
        provenance=provenance,
        mapping_kind=cfg.fields.kind,
        template=cfg.template,
        pii=PiiRecord(policy=cfg.pii.policy),
    )
    try:
        if cache_dir is not None:
            return _prepare(cfg, tokenizer, workdir, cache_dir, model_license, stages, bad, report)
        with tempfile.TemporaryDirectory(prefix="fto-data-") as scratch:
            return _prepare(cfg, tokenizer, workdir, Path(scratch), model_license, stages, bad, report)
    except DataError:
        report.provenance.stages = stages.records
        report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
        write_report(report, workdir)
        raise


def _prepare(
    cfg: DataConfig,
    tokenizer: Any,
    workdir: Path,
    cache_dir: Path,
    model_license: str | None,
    stages: _Stages,
    bad: BadRowLog,
    report: DataReport,
) -> PreparedData:
    licences: LicenceRecord = check_licences(cfg.compliance, model_license=model_license)
    report.provenance.licences = licences
    if cfg.template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'tokenizer' needs a tokenizer with a chat template", reason="TemplateError")

    sources = _resolve_all(cfg, cache_dir)
    rows, source_records = _read(cfg, sources, bad)
    report.provenance.sources = source_records
    stages.add("read", bad.total, len(rows), {"malformed": bad.count})
    report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
    bad.check(cfg.bad_rows.max_ratio)

    rows = _clean(cfg, rows, stages)
    rows, report.pii = _scrub(cfg, rows, stages)
    rows = _dedup(cfg, rows, stages)
    splits = _split(cfg, rows, stages)

    if cfg.augmentation.strategy != "none":
        train_records = augment(splits["train"], cfg.augmentation)
        report.augmented_rows = len(train_records) - len(splits["train"])
        stages.add("augment (train)", len(splits["train"]), len(train_records))
        splits["train"] = train_records

    classification = cfg.fields.kind == "classification"
    label_names = _label_names(r for records in splits.values() for r in records) if classification else None
    label_index = {name: i for i, name in enumerate(label_names)} if label_names is not None else None

    encoded: dict[str, list[Example]] = {}
    samples: dict[str, list[TextSample]] = {}
    dropped: dict[str, int] = {}
    rows_in = sum(len(v) for v in splits.values())
    for name in SPLITS:
        examples, rendered, truncated = _encode_split(cfg, splits[name], tokenizer, label_index, dropped)
        encoded[name] = examples
        report.splits[name] = _split_record(examples, truncated, cfg.max_seq_length, classification)
        samples[name] = [
            TextSample(
                prompt=item.prompt_text,
                completion=record.label if record.label is not None else record.target_text(),
            )
            for record, item in rendered[:SAMPLES_KEPT]
        ]
    stages.add("tokenize", rows_in, sum(len(v) for v in encoded.values()), dropped)
    if not encoded["train"]:
        raise DataError("no training example is left after tokenization", reason="EmptySplit")

    if cfg.packing:
        blocks, empty = pack(encoded["train"], cfg.max_seq_length)
        stages.add("pack", len(encoded["train"]), len(blocks), {"no_loss_tokens": empty})
        report.splits["train"].packed_blocks = len(blocks)
        encoded["train"] = blocks

    report.label_names = label_names
    report.provenance.stages = stages.records
    report.bad_rows = bad.record(cfg.bad_rows.max_ratio)
    write_report(report, workdir)
    return PreparedData(
        train=encoded["train"],
        validation=encoded["validation"],
        test=encoded["test"],
        report=report,
        samples=samples,
        label_names=label_names,
    )
