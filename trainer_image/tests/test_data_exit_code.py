"""End to end through the pod's command: unusable data ends the trainer with the data-error exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.exit_codes import NON_RETRYABLE, ExitCode
from trainer_fixtures import make_config, make_task_data, make_tiny_model, run_trainer, write_config


@pytest.mark.slow
def test_too_many_malformed_rows_exit_with_the_data_error_code_naming_the_lines(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "model", hidden=16, layers=1)
    data = make_task_data(tmp_path / "data" / "train.jsonl", rows=40)
    lines = data.read_text().splitlines()
    lines[6] = "{not json"
    lines[20] = json.dumps({"prompt": "missing the completion"})
    data.write_text("\n".join(lines) + "\n")
    config = make_config(tmp_path, model_dir, data, data={"badRows": {"maxRatio": 0.02}})
    exit_file = tmp_path / "exit-code"

    result = run_trainer(write_config(tmp_path, config), FTO_EXIT_CODE_FILE=str(exit_file))

    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    assert ExitCode.DATA_ERROR in NON_RETRYABLE
    assert "2 of 40 rows are malformed" in result.stderr
    assert "train.jsonl:7: invalid JSON" in result.stderr
    assert "train.jsonl:21: missing field 'completion'" in result.stderr
    report = json.loads((Path(config["output"]["dir"]) / "data_report.json").read_text())
    assert [b["line"] for b in report["badRows"]["lines"]] == [7, 21]
