"""Sources and formats: malformed rows with 1-based line numbers, the bad-row ratio, every source kind."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pipeline import PreparedData, prepare
from finetune_trainer.data.report import DataReport
from finetune_trainer.exit_codes import NON_RETRYABLE, ExitCode
from tiny_tokenizer import make_tiny_tokenizer

ROWS = [{"prompt": f"Spell {i} in words", "completion": f"number {i}"} for i in range(60)]
#: Split ratios that keep every row in train, so counts below are about reading only.
NO_HOLDOUT = {"validation": 0.0, "test": 0.0}


def _prepare(tmp_path: Path, source: str, **overrides: Any) -> PreparedData:
    cfg = DataConfig.model_validate({"source": source, "split": NO_HOLDOUT, **overrides})
    return prepare(cfg, make_tiny_tokenizer(), tmp_path / "work")


def _bad_lines(report: DataReport) -> list[tuple[str, int]]:
    return [(Path(b.source).name, b.line) for b in report.bad_rows.lines]


def test_jsonl_malformed_rows_are_reported_with_their_line_numbers(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in ROWS[:10]]
    lines[2] = '{"prompt": "unterminated'  # line 3: bad JSON
    lines[4] = json.dumps({"prompt": "no completion"})  # line 5: missing field
    lines[6] = json.dumps({"prompt": "typed", "completion": 7})  # line 7: wrong type
    lines[7] = "[1, 2]"  # line 8: not an object
    lines.insert(8, "")  # a blank line 9 is not a row; the next row is line 10
    lines[9] = "not json"  # line 10
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    prepared = _prepare(tmp_path, str(tmp_path / "d.jsonl"), badRows={"maxRatio": 0.9})
    bad = prepared.report.bad_rows
    assert _bad_lines(prepared.report) == [
        ("d.jsonl", 3),
        ("d.jsonl", 5),
        ("d.jsonl", 7),
        ("d.jsonl", 8),
        ("d.jsonl", 10),
    ]
    reasons = [b.reason for b in bad.lines]
    assert reasons[0].startswith("invalid JSON")
    assert reasons[1] == "missing field 'completion'"
    assert reasons[2] == "field 'completion' must be a string, got int"
    assert "expected a JSON object" in reasons[3]
    assert bad.count == 5
    assert bad.total == 10
    read = prepared.report.stages[0]
    assert (read.name, read.rows_in, read.rows_out, read.removed) == ("read", 10, 5, {"malformed": 5})
    assert len(prepared.train) == 5


def test_bad_row_ratio_above_the_limit_stops_with_a_data_error_naming_lines(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in ROWS[:20]]
    for index in (1, 4, 9):
        lines[index] = "{oops"
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, str(tmp_path / "d.jsonl"), badRows={"maxRatio": 0.1})
    message = str(info.value)
    assert info.value.reason == "TooManyBadRows"
    assert "3 of 20 rows are malformed" in message
    assert "d.jsonl:2:" in message
    assert "d.jsonl:5:" in message
    assert "d.jsonl:10:" in message
    # The trainer maps DataError to this code, which the operator treats as non-retryable.
    assert ExitCode.DATA_ERROR in NON_RETRYABLE
    # The report is written even though preparation stopped.
    report = json.loads((tmp_path / "work" / "data_report.json").read_text())
    assert [b["line"] for b in report["badRows"]["lines"]] == [2, 5, 10]


def test_bad_row_ratio_at_the_limit_passes(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in ROWS[:20]]
    lines[0] = "{oops"
    lines[1] = "{oops"
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    prepared = _prepare(tmp_path, str(tmp_path / "d.jsonl"), badRows={"maxRatio": 0.1})
    assert prepared.report.bad_rows.count == 2
    assert len(prepared.train) == 18


def test_csv_line_numbers_count_physical_lines_of_quoted_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])  # line 1
        writer.writerow(["a\nmulti-line\nprompt", "ok"])  # lines 2-4
        writer.writerow(["short row"])  # line 5: one field
        writer.writerow(["p", "c", "extra"])  # line 6: three fields
        writer.writerow(["fine", "row"])  # line 7
    prepared = _prepare(tmp_path, str(path), badRows={"maxRatio": 0.9})
    assert _bad_lines(prepared.report) == [("d.csv", 5), ("d.csv", 6)]
    assert prepared.report.bad_rows.lines[0].reason == "expected 2 fields, got 1"
    assert len(prepared.train) == 2


def test_a_byte_order_mark_is_not_a_malformed_row(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in ROWS[:3]).encode())
    (tmp_path / "d.csv").write_bytes(bom + b"prompt,completion\nfirst,one\nsecond,two\n")
    assert len(_prepare(tmp_path / "j", str(tmp_path / "d.jsonl"), badRows={"maxRatio": 0}).train) == 3
    assert len(_prepare(tmp_path / "c", str(tmp_path / "d.csv"), badRows={"maxRatio": 0}).train) == 2


def test_parquet_rows_are_numbered_and_typed(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["a", "b", None, "d"], "completion": ["1", "2", "3", "4"]})
    pq.write_table(table, tmp_path / "d.parquet")
    prepared = _prepare(tmp_path, str(tmp_path / "d.parquet"), badRows={"maxRatio": 0.5})
    assert _bad_lines(prepared.report) == [("d.parquet", 3)]
    assert len(prepared.train) == 3


def test_a_damaged_parquet_file_is_a_data_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a"] * 100, "completion": ["b"] * 100}), tmp_path / "d.parquet")
    data = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "d.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, str(tmp_path / "d.parquet"))
    assert info.value.reason == "SourceUnreadable"
    assert "d.parquet" in str(info.value)


def test_hf_saved_dataset_folder_and_its_split(tmp_path: Path) -> None:
    import datasets

    dataset = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:12]),
            "other": datasets.Dataset.from_list(ROWS[12:15]),
        }
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    prepared = _prepare(tmp_path, str(tmp_path / "saved"))
    assert len(prepared.train) == 12
    sources = prepared.report.provenance.sources
    assert all(s.role == "main" for s in sources)
    assert {Path(s.uri).name for s in sources} >= {"dataset_dict.json"}
    other = _prepare(tmp_path / "o", str(tmp_path / "saved"), hfSplit="other")
    assert len(other.train) == 3
    with pytest.raises(DataError, match="split 'nope' not found"):
        _prepare(tmp_path / "n", str(tmp_path / "saved"), hfSplit="nope")


def test_file_uri_glob_directory_and_additional_sources(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for part in range(3):
        rows = ROWS[part * 10 : part * 10 + 10]
        (data / f"part-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "notes.txt").write_text("ignored: not a data file")
    assert len(_prepare(tmp_path / "a", f"file://{data}/part-*.jsonl").train) == 30
    assert len(_prepare(tmp_path / "b", str(data)).train) == 30
    combined = _prepare(
        tmp_path / "c", str(data / "part-0.jsonl"), additionalSources=[f"file://{data / 'part-2.jsonl'}"]
    )
    assert len(combined.train) == 20
    assert [Path(s.uri).name for s in combined.report.provenance.sources] == ["part-0.jsonl", "part-2.jsonl"]


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_http_source_is_downloaded_hashed_and_read(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    import hashlib

    base, root = http_root
    body = "".join(json.dumps(r) + "\n" for r in ROWS[:8]).encode()
    (root / "train.jsonl").write_bytes(body)
    prepared = _prepare(tmp_path, f"{base}/train.jsonl")
    assert len(prepared.train) == 8
    (source,) = prepared.report.provenance.sources
    assert source.uri == f"{base}/train.jsonl"
    assert source.sha256 == hashlib.sha256(body).hexdigest()
    # The download is not left in the work folder (it may be the model's output folder).
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["data_report.json", "provenance.json"]
    cfg = DataConfig.model_validate({"source": f"{base}/train.jsonl", "split": NO_HOLDOUT})
    prepare(cfg, make_tiny_tokenizer(), tmp_path / "w2", cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").rglob("train.jsonl")
    assert cached.read_bytes() == body
    with pytest.raises(DataError) as info:
        _prepare(tmp_path / "missing", f"{base}/missing.jsonl")
    assert info.value.reason == "SourceUnreadable"


def test_s3_source_is_read_with_credentials_from_the_environment(tmp_path: Path, s3_server: str) -> None:
    import hashlib

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="datasets")
    body = "".join(json.dumps(r) + "\n" for r in ROWS[:12]).encode()
    s3.put_object(Bucket="datasets", Key="sft/train.jsonl", Body=body)

    prepared = _prepare(tmp_path, "s3://datasets/sft/train.jsonl")
    assert len(prepared.train) == 12
    (source,) = prepared.report.provenance.sources
    assert source.uri == "s3://datasets/sft/train.jsonl"
    assert source.sha256 == hashlib.sha256(body).hexdigest()
    with pytest.raises(DataError) as info:
        _prepare(tmp_path / "missing", "s3://datasets/sft/missing.jsonl")
    assert info.value.reason == "SourceUnreadable"


def test_hub_dataset_missing_from_the_offline_cache_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the failure path can be tested without network: the dataset is in no cache and the Hub is off.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, "hf://example-org/not-cached@main")
    assert info.value.reason == "SourceUnreadable"
    assert "hf://example-org/not-cached@main" in str(info.value)


def test_missing_source_and_unknown_extension_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        _prepare(tmp_path, str(tmp_path / "absent.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="set format"):
        _prepare(tmp_path, str(tmp_path / "d.txt"))
