"""Provenance (hashes, per-stage counts, config digest), licence allowlist, data_report.json, model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.data.compliance import config_digest
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pipeline import PreparedData, prepare
from finetune_trainer.data.report import DataReport, render_data_section
from tiny_tokenizer import make_tiny_tokenizer

ROWS = [{"prompt": f"Name {i}", "completion": f"Item {i}"} for i in range(80)]


def _files(tmp_path: Path) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines = [json.dumps(r) for r in ROWS[:40]]
    lines[3] = "{broken"
    first.write_text("\n".join(lines) + "\n")
    second.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS[40:], ROWS[0]]))
    return first, second


def _prepare(tmp_path: Path, model_license: str | None = None, **overrides: Any) -> PreparedData:
    first, second = _files(tmp_path)
    cfg = DataConfig.model_validate(
        {
            "source": str(first),
            "additionalSources": [str(second)],
            "badRows": {"maxRatio": 0.05},
            "split": {"validation": 0.1, "test": 0.1},
            **overrides,
        }
    )
    return prepare(cfg, make_tiny_tokenizer(), tmp_path / "work", model_license=model_license)


def test_provenance_hashes_every_input_file_and_counts_rows_per_stage(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path)
    provenance = prepared.report.provenance
    for record, path in zip(provenance.sources, _files(tmp_path), strict=True):
        assert record.uri == str(path)
        assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record.bytes == path.stat().st_size
    assert [s.rows for s in provenance.sources] == [40, 41]
    stages = {s.name: s for s in provenance.stages}
    assert list(stages) == ["read", "clean", "pii", "dedup", "split", "tokenize"]
    assert stages["read"].removed == {"malformed": 1}
    assert stages["dedup"].removed == {"exact_duplicate": 1}
    for earlier, later in zip(provenance.stages[:4], provenance.stages[1:5], strict=True):
        assert earlier.rows_out == later.rows_in
        assert later.rows_in - later.rows_out == sum(later.removed.values())
    splits = prepared.report.splits
    assert sum(s.rows for s in splits.values()) == stages["tokenize"].rows_out == 79
    assert (len(prepared.train), len(prepared.validation), len(prepared.test)) == tuple(
        splits[name].rows for name in ("train", "validation", "test")
    )


def test_report_files_are_written_and_parse_back(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path)
    written = json.loads((tmp_path / "work" / "data_report.json").read_text())
    assert DataReport.model_validate(written) == prepared.report
    assert written["badRows"]["lines"][0]["line"] == 4
    histogram = written["splits"]["train"]["lengthHistogram"]
    assert sum(histogram["counts"]) == len(prepared.train)
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1
    provenance = json.loads((tmp_path / "work" / "provenance.json").read_text())
    assert provenance["configDigest"] == prepared.report.provenance.config_digest
    assert [s["sha256"] for s in provenance["sources"]] == [
        s.sha256 for s in prepared.report.provenance.sources
    ]


def test_config_digest_is_stable_and_sensitive() -> None:
    one = DataConfig.model_validate({"source": "x", "maxSeqLength": 64})
    same = DataConfig.model_validate({"source": "x", "max_seq_length": 64})
    other = DataConfig.model_validate({"source": "x", "maxSeqLength": 65})
    assert config_digest(one) == config_digest(same)
    assert config_digest(one) != config_digest(other)


def test_licences_in_the_allowlist_pass_and_are_recorded(tmp_path: Path) -> None:
    compliance = {"allowedLicenses": ["Apache-2.0", "MIT"], "datasetLicense": "mit"}
    prepared = _prepare(tmp_path, model_license="apache-2.0", compliance=compliance)
    licences = prepared.report.provenance.licences
    assert licences.checked
    assert (licences.dataset, licences.model) == ("mit", "apache-2.0")


@pytest.mark.parametrize(
    ("compliance", "model_license", "needle"),
    [
        (
            {"allowedLicenses": ["MIT"], "datasetLicense": "CC-BY-NC-4.0"},
            "MIT",
            "dataset licence 'CC-BY-NC-4.0'",
        ),
        ({"allowedLicenses": ["MIT"], "datasetLicense": "MIT"}, "llama3", "base model licence 'llama3'"),
        ({"allowedLicenses": ["MIT"], "datasetLicense": "MIT"}, None, "base model licence is unknown"),
        ({"allowedLicenses": ["MIT"], "modelLicense": "MIT"}, None, "dataset licence is unknown"),
        (
            {"allowedLicenses": ["MIT"], "datasetLicense": "MIT", "modelLicense": "GPL-3.0"},
            "MIT",
            "base model licence 'GPL-3.0'",
        ),
    ],
)
def test_licences_outside_the_allowlist_are_refused(
    tmp_path: Path, compliance: dict[str, Any], model_license: str | None, needle: str
) -> None:
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, model_license=model_license, compliance=compliance)
    assert info.value.reason == "LicenseNotAllowed"
    assert needle in str(info.value)


def test_no_allowlist_means_no_check(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, model_license="anything", compliance={"datasetLicense": "proprietary"})
    assert not prepared.report.provenance.licences.checked


def test_model_card_section_lists_stages_removals_pii_and_splits(tmp_path: Path) -> None:
    prepared = _prepare(
        tmp_path, compliance={"allowedLicenses": ["MIT"], "datasetLicense": "MIT"}, model_license="MIT"
    )
    section = render_data_section(prepared.report)
    assert section.startswith("## Data\n")
    assert "| dedup | 80 | 79 | exact_duplicate: 1 |" in section
    assert "Malformed rows: 1 of 81" in section
    assert "`a.jsonl:4`" in section
    assert "policy `scrub`" in section
    assert "checked against the allowlist" in section
    for name in ("train", "validation", "test"):
        assert f"| {name} | {prepared.report.splits[name].rows} |" in section
    assert prepared.report.provenance.sources[0].sha256[:16] in section
