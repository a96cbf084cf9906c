"""What data preparation did: ``data_report.json``, ``provenance.json`` and the model-card section.

Torch-free pydantic models (camelCase in JSON). Nothing is dropped silently: every stage records rows in, rows
out, and the reason for every removed row; malformed rows keep their source file and 1-based line number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "BAD_LINES_KEPT",
    "BadLine",
    "BadRowsRecord",
    "CacheRecord",
    "DataReport",
    "Histogram",
    "ImageSplitRecord",
    "LicenceRecord",
    "PiiRecord",
    "Provenance",
    "SourceRecord",
    "SplitRecord",
    "StageRecord",
    "histogram",
    "render_data_section",
    "write_report",
]

#: How many malformed lines are listed in the report (all are counted).
BAD_LINES_KEPT = 1000


class _ReportModel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="forbid")


class SourceRecord(_ReportModel):
    uri: str = Field(description="The file as configured/expanded (URI or path).")
    role: str = Field(description="'main', 'validation' or 'test': which split source it belongs to.")
    sha256: str = Field(
        description="SHA-256 of the file's bytes (of every file, for a saved dataset folder)."
    )
    bytes: int = Field(description="Size in bytes.")
    rows: int = Field(description="Rows read from it (including malformed ones).")


class StageRecord(_ReportModel):
    name: str = Field(description="Stage name, in pipeline order.")
    rows_in: int = Field(description="Rows entering the stage.")
    rows_out: int = Field(description="Rows leaving the stage.")
    removed: dict[str, int] = Field(default_factory=dict, description="Removed rows by reason.")


class BadLine(_ReportModel):
    source: str = Field(description="Source file.")
    line: int = Field(
        description="1-based line (jsonl, csv: the physical line where the record starts) or row."
    )
    reason: str = Field(description="What is wrong with it.")


class BadRowsRecord(_ReportModel):
    count: int = Field(default=0, description="Malformed rows.")
    total: int = Field(default=0, description="Rows read.")
    ratio: float = Field(default=0.0, description="count / total.")
    max_ratio: float = Field(default=0.0, description="The configured limit.")
    lines: list[BadLine] = Field(
        default_factory=list, description=f"The first {BAD_LINES_KEPT} malformed rows."
    )


class PiiRecord(_ReportModel):
    policy: str = Field(description="scrub, reject or allow.")
    matches: dict[str, int] = Field(default_factory=dict, description="Matches found, by kind.")
    rows_with_pii: int = Field(default=0, description="Rows with at least one match.")
    rows_rejected: int = Field(default=0, description="Rows dropped (policy reject).")


class Histogram(_ReportModel):
    edges: list[int] = Field(
        default_factory=list,
        description="Bin edges in tokens (len = len(counts) + 1), equal bins from 0 to the longest example.",
    )
    counts: list[int] = Field(default_factory=list, description="Examples per bin [edges[i], edges[i+1]).")


class SplitRecord(_ReportModel):
    rows: int = Field(description="Examples (before packing).")
    tokens: int = Field(description="Tokens in all examples.")
    loss_tokens: int = Field(description="Tokens that carry a loss (label != -100).")
    truncated: int = Field(default=0, description="Examples cut to maxSeqLength.")
    packed_blocks: int | None = Field(default=None, description="Blocks after packing (train, packing on).")
    length_histogram: Histogram = Field(default_factory=Histogram, description="Token-length histogram.")
    min_tokens: int = Field(default=0, description="Shortest example.")
    max_tokens: int = Field(default=0, description="Longest example.")
    mean_tokens: float = Field(default=0.0, description="Mean example length.")


class ImageSplitRecord(_ReportModel):
    images: int = Field(description="Images in the split.")
    per_class: list[int] = Field(default_factory=list, description="Images per class id (labelNames order).")
    modes: dict[str, int] = Field(default_factory=dict, description="Images by colour mode as stored.")
    min_width: int = Field(default=0, description="Narrowest image (pixels).")
    max_width: int = Field(default=0, description="Widest image (pixels).")
    min_height: int = Field(default=0, description="Lowest image (pixels).")
    max_height: int = Field(default=0, description="Tallest image (pixels).")


class LicenceRecord(_ReportModel):
    dataset: str | None = Field(default=None, description="Dataset licence (SPDX).")
    model: str | None = Field(default=None, description="Base-model licence (SPDX).")
    allowed: list[str] = Field(default_factory=list, description="The configured allowlist.")
    checked: bool = Field(default=False, description="Whether the allowlist was enforced.")


class Provenance(_ReportModel):
    config_digest: str = Field(description="SHA-256 of the data config (canonical JSON).")
    sources: list[SourceRecord] = Field(default_factory=list, description="Every input file with its hash.")
    stages: list[StageRecord] = Field(default_factory=list, description="Row counts per stage.")
    tokenizer: str = Field(default="", description="Tokenizer name or path.")
    licences: LicenceRecord = Field(default_factory=LicenceRecord, description="Licences and the check.")


class CacheRecord(_ReportModel):
    key: str = Field(description="Digest of the data config, the source files' hashes and the tokenizer.")
    folder: str = Field(default="", description="Where the prepared examples are (Arrow, memory-mapped).")
    reused: bool = Field(default=False, description="True when this run reused an earlier preparation.")


class DataReport(_ReportModel):
    provenance: Provenance = Field(description="Inputs, hashes, config digest, per-stage counts.")
    mapping_kind: str = Field(description="Row layout (fields.kind).")
    template: str = Field(description="Template used.")
    bad_rows: BadRowsRecord = Field(default_factory=BadRowsRecord, description="Malformed rows.")
    pii: PiiRecord = Field(description="PII counts.")
    splits: dict[str, SplitRecord] = Field(default_factory=dict, description="train / validation / test.")
    augmented_rows: int = Field(default=0, description="Rows added to train by augmentation.")
    augmented_ratio: float = Field(
        default=0.0,
        description="augmentedRows / the train rows before augmentation (0 without augmentation).",
    )
    label_names: list[str] | None = Field(default=None, description="Class names (kind classification).")
    images: dict[str, ImageSplitRecord] = Field(
        default_factory=dict, description="train / validation / test of an image task: counts and sizes."
    )
    cache: CacheRecord | None = Field(default=None, description="The prepared-data cache entry used.")

    @property
    def stages(self) -> list[StageRecord]:
        return self.provenance.stages

    def removed_by_reason(self) -> dict[str, int]:
        """All removed rows over all stages, by reason."""
        totals: dict[str, int] = {}
        for stage in self.provenance.stages:
            for reason, n in stage.removed.items():
                totals[reason] = totals.get(reason, 0) + n
        return totals


def histogram(lengths: list[int], max_length: int, bins: int = 10) -> Histogram:
    """Equal-width bins from 0 to ``max_length`` inclusive (bins never narrower than one token)."""
    width = max(1, -(-(max_length + 1) // bins))
    edges = [i * width for i in range(bins + 1)]
    counts = [0] * bins
    for length in lengths:
        counts[min(length // width, bins - 1)] += 1
    return Histogram(edges=edges, counts=counts)


def _write_atomically(path: Path, document: object) -> None:
    """Every rank may prepare the data into the same folder: write a private temporary file, then rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)


def write_report(report: DataReport, directory: Path) -> tuple[Path, Path]:
    """Write ``data_report.json`` and ``provenance.json`` into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    report_path = directory / "data_report.json"
    provenance_path = directory / "provenance.json"
    _write_atomically(report_path, report.model_dump(mode="json", by_alias=True))
    _write_atomically(provenance_path, report.provenance.model_dump(mode="json", by_alias=True))
    return report_path, provenance_path


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_data_section(report: DataReport) -> str:
    """A Markdown ``## Data`` section for the model card: sources, stages, removals, PII, splits, lengths."""
    prov = report.provenance
    out = ["## Data", ""]
    rendered = (
        "images decoded per batch"
        if report.images
        else f"template `{report.template}`, tokenizer `{prov.tokenizer}`"
    )
    out.append(
        f"Rows of kind `{report.mapping_kind}`, {rendered}. Data config digest `{prov.config_digest[:16]}`."
    )
    out += ["", "### Sources", ""]
    out += _table(
        ["source", "role", "rows", "bytes", "sha256"],
        [[f"`{s.uri}`", s.role, str(s.rows), str(s.bytes), f"`{s.sha256[:16]}…`"] for s in prov.sources],
    )
    out += ["", "### Preparation stages", ""]
    out += _table(
        ["stage", "rows in", "rows out", "removed (reason: rows)"],
        [
            [
                st.name,
                str(st.rows_in),
                str(st.rows_out),
                ", ".join(f"{k}: {v}" for k, v in sorted(st.removed.items())) or "—",
            ]
            for st in prov.stages
        ],
    )
    bad = report.bad_rows
    out += ["", f"Malformed rows: {bad.count} of {bad.total} ({bad.ratio:.2%}; limit {bad.max_ratio:.2%})."]
    if bad.lines:
        shown = ", ".join(f"`{Path(b.source).name}:{b.line}`" for b in bad.lines[:10])
        out[-1] += f" First: {shown}."
    pii = report.pii
    found = ", ".join(f"{k}: {v}" for k, v in sorted(pii.matches.items())) or "none"
    if not report.images:  # images carry no text to scan
        out += [
            "",
            f"Personal data (policy `{pii.policy}`): {found}; rows with PII: {pii.rows_with_pii}, "
            f"rejected: {pii.rows_rejected}.",
        ]
    if report.augmented_rows:
        out += [
            "",
            f"Augmentation added {report.augmented_rows} training rows "
            f"({report.augmented_ratio:.2f} per original training row).",
        ]
    lic = prov.licences
    if lic.checked or lic.dataset or lic.model:
        verdict = "checked against the allowlist" if lic.checked else "not checked (no allowlist)"
        out += [
            "",
            f"Licences: dataset `{lic.dataset or 'unknown'}`, base model `{lic.model or 'unknown'}`; "
            f"{verdict}.",
        ]
    if report.cache is not None:
        how = "reused from an earlier preparation" if report.cache.reused else "prepared by this run"
        out += ["", f"Prepared examples (cache key `{report.cache.key[:16]}`): {how}."]
    if report.images:
        return "\n".join([*out, *_image_splits(report)]) + "\n"
    out += ["", "### Splits", ""]
    out += _table(
        ["split", "examples", "tokens", "loss tokens", "truncated", "min / mean / max tokens"],
        [
            [
                name,
                str(sp.rows)
                + (f" ({sp.packed_blocks} packed blocks)" if sp.packed_blocks is not None else ""),
                str(sp.tokens),
                str(sp.loss_tokens),
                str(sp.truncated),
                f"{sp.min_tokens} / {sp.mean_tokens:.1f} / {sp.max_tokens}",
            ]
            for name, sp in report.splits.items()
        ],
    )
    train = report.splits.get("train")
    if train and train.length_histogram.counts:
        hist = train.length_histogram
        out += ["", "Training example lengths (tokens):", ""]
        out += _table(
            ["length", "examples"],
            [[f"{hist.edges[i]}-{hist.edges[i + 1] - 1}", str(n)] for i, n in enumerate(hist.counts)],
        )
    return "\n".join(out) + "\n"


def _image_splits(report: DataReport) -> list[str]:
    names = report.label_names or []
    out = ["", "### Splits", ""]
    out += _table(
        ["split", "images", "width (min-max)", "height (min-max)", "colour modes"],
        [
            [
                name,
                str(sp.images),
                f"{sp.min_width}-{sp.max_width}",
                f"{sp.min_height}-{sp.max_height}",
                ", ".join(f"{mode}: {n}" for mode, n in sorted(sp.modes.items())) or "—",
            ]
            for name, sp in report.images.items()
        ],
    )
    out += ["", "Images per class:", ""]
    out += _table(
        ["class", *report.images],
        [
            [name, *(str(sp.per_class[i]) if i < len(sp.per_class) else "0" for sp in report.images.values())]
            for i, name in enumerate(names)
        ],
    )
    return out
