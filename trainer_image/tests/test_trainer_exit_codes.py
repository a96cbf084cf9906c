"""Non-retryable exit codes come out of the pod entrypoint, before and through torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.exit_codes import ExitCode
from trainer_fixtures import make_config, make_task_data, make_tiny_model, run_trainer, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_task_data(root / "data.jsonl")


def test_unknown_key_exits_config_error_before_torchrun(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    config = make_config(tmp_path, *tiny)
    config["hyperparameters"]["lerningRate"] = 0.1
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert "did you mean 'learningRate'" in result.stderr
    assert "torch.distributed" not in result.stderr  # refused by the pre-flight, no workers started


def test_missing_model_exits_model_error(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    config = make_config(tmp_path, tmp_path / "no-such-model", tiny[1])
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == ExitCode.MODEL_ERROR
    assert "no-such-model" in result.stderr


@pytest.mark.slow
def test_data_error_in_a_worker_comes_out_of_torchrun(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    model_dir, data = tiny
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()
    bad.write_text("\n".join(lines[:50] + ["{not json"] * 10) + "\n")
    config = make_config(tmp_path, model_dir, bad)
    config["data"]["badRows"] = {"maxRatio": 0.01}
    result = run_trainer(write_config(tmp_path, config))
    # torchrun itself exits 1; the launcher re-raises the code the failing rank recorded.
    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    assert "trainer failed: exit code 4" in result.stderr
    assert "line" in result.stderr.split("trainer failed: exit code 4", 1)[1]


@pytest.mark.slow
def test_config_error_found_by_a_worker_comes_out_of_torchrun(
    tmp_path: Path, tiny: tuple[Path, Path]
) -> None:
    # LoRA target modules that the model doesn't have are only detectable once the model is loaded.
    config = make_config(tmp_path, *tiny, method="lora", lora={"targetModules": ["no_such_proj"]})
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
    assert "trainer failed: exit code 3" in result.stderr
    assert json.dumps("no_such_proj")[1:-1] in result.stderr


def test_qlora_without_cuda_is_a_config_error_that_says_so(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    config = make_config(tmp_path, *tiny, method="qlora", distributed={"zeroStage": 2, "precision": "bf16"})
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert "needs a CUDA GPU" in result.stderr
