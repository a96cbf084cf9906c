"""A trained tiny model is copied to ``output.copyTo`` (spec.output.uri) through the real entrypoint: to S3 (a
real S3-compatible server) and to a folder; the copies load, and the artifact points at them. A failed copy
exits with the retryable code, and the restarted run copies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.exit_codes import ExitCode
from finetune_trainer.output_copy import MARKER
from trainer_fixtures import (
    make_config,
    make_task_data,
    make_tiny_model,
    read_events,
    run_trainer,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_task_data(root / "data.jsonl", rows=120)


def _config(tmp_path: Path, tiny: tuple[Path, Path], **overrides: Any) -> Path:
    sections: dict[str, Any] = {
        "hyperparameters": {"maxSteps": 6},
        "evaluation": {"everySteps": 0, "batchSize": 16, "maxSamples": 16},
        **overrides,
    }
    return write_config(tmp_path, make_config(tmp_path, *tiny, **sections))


def _check_copy(copy: Path, out: Path, artifact_uri: str, card_uri: str) -> dict[str, Any]:
    """The copy holds every exported file, byte for byte, the marker, and metrics that point at the copy."""
    exported = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    copied = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
    # metrics.jsonl gets its last lines ("copied", "done") after the copy: everything else is identical.
    assert copied == sorted([*exported, MARKER])
    for name in exported:
        if name != "metrics.jsonl":
            assert (copy / name).read_bytes() == (out / name).read_bytes(), name
    metrics = json.loads((copy / "metrics.json").read_text())
    artifact = metrics["artifact"]
    assert artifact["uri"] == artifact_uri
    assert artifact["modelCard"] == card_uri
    assert artifact["claimUri"] == str(out / artifact_uri.rsplit("/", 1)[1])
    marker = json.loads((copy / MARKER).read_text())
    assert marker["artifact"]["sha256"] == artifact["sha256"]
    assert set(marker["files"]) == {n for n in copied if n != MARKER}
    events = {e["event"]: e for e in read_events(out / "metrics.jsonl")}
    assert events["copied"]["destination"] == artifact_uri.rsplit("/", 1)[0]
    assert "done" in events
    return artifact  # type: ignore[no-any-return]


def test_lora_outputs_are_copied_to_s3_and_load_from_there(
    tmp_path: Path, tiny: tuple[Path, Path], s3_server: str
) -> None:
    import boto3
    import s3fs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="models")
    path = _config(
        tmp_path, tiny, method="lora", output={"copyTo": "s3://models/support-bot/v1", "mergeAdapter": True}
    )
    result = run_trainer(path)
    assert result.returncode == 0, result.stderr[-4000:]

    download = tmp_path / "download"
    s3fs.S3FileSystem().get("models/support-bot/v1/", str(download), recursive=True)
    _check_copy(
        download, tmp_path / "out", "s3://models/support-bot/v1/model", "s3://models/support-bot/v1/README.md"
    )
    merged = AutoModelForCausalLM.from_pretrained(download / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    adapted = PeftModel.from_pretrained(base, download / "adapter")  # adds the LoRA weights to `base`
    assert any("lora" in name for name, _ in adapted.named_parameters())


def test_full_outputs_are_copied_to_a_folder_addressed_as_a_claim(
    tmp_path: Path, tiny: tuple[Path, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    published = tmp_path / "model-store" / "support-bot"
    # What the operator renders for spec.output.uri: pvc://model-store/support-bot (mounted in the pod).
    output = {"copyTo": f"file://{published}", "copyToUri": "pvc://model-store/support-bot"}
    result = run_trainer(_config(tmp_path, tiny, method="full", output=output))
    assert result.returncode == 0, result.stderr[-4000:]
    _check_copy(
        published,
        tmp_path / "out",
        "pvc://model-store/support-bot/model",
        "pvc://model-store/support-bot/README.md",
    )
    model = AutoModelForCausalLM.from_pretrained(published / "model")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_failed_copy_exits_retryable_naming_the_field_and_the_restart_copies(
    tmp_path: Path, tiny: tuple[Path, Path], s3_server: str
) -> None:
    import boto3

    path = _config(tmp_path, tiny, output={"copyTo": "s3://not-created-yet/runs/v1"})
    result = run_trainer(path)
    assert result.returncode == ExitCode.RETRYABLE, result.stderr[-4000:]
    failure = result.stderr.split("trainer failed: exit code 11: ", 1)[1]
    assert failure.startswith(
        "OutputCopyError: spec.output.uri: copying the outputs to s3://not-created-yet/runs/v1 failed"
    )
    out = tmp_path / "out"
    assert (out / "model" / "model.safetensors").is_file()  # the export itself is complete on the claim
    assert "copied" not in {e["event"] for e in read_events(out / "metrics.jsonl")}

    # Someone creates the bucket; the operator's restart resumes from the final checkpoint and copies.
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="not-created-yet")
    again = run_trainer(path)
    assert again.returncode == 0, again.stderr[-4000:]
    events = read_events(out / "metrics.jsonl")
    assert [e["event"] for e in events].count("resume") == 1
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="not-created-yet")["Contents"]}
    assert {"runs/v1/model/model.safetensors", "runs/v1/README.md", f"runs/v1/{MARKER}"} <= keys


def test_two_ranks_rank_zero_copies_and_its_failure_comes_out_of_torchrun(
    tmp_path: Path, tiny: tuple[Path, Path]
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    two_ranks = {"distributed": {"zeroStage": 2, "precision": "fp32", "shutdownTimeoutSeconds": 30}}
    failing = _config(
        tmp_path,
        tiny,
        hyperparameters={"maxSteps": 6, "microBatchSize": 4},
        output={"copyTo": str(blocker / "v1")},
        **two_ranks,
    )
    result = run_trainer(failing, PET_NPROC_PER_NODE="2")
    # Rank 1 ended cleanly after the export; rank 0's copy failed: the launcher re-raises rank 0's code.
    assert result.returncode == ExitCode.RETRYABLE, result.stderr[-4000:]
    assert "trainer failed: exit code 11: OutputCopyError: spec.output.uri" in result.stderr

    published = tmp_path / "published"
    fixed = _config(
        tmp_path,
        tiny,
        hyperparameters={"maxSteps": 6, "microBatchSize": 4},
        output={"copyTo": str(published)},
        **two_ranks,
    )
    again = run_trainer(fixed, PET_NPROC_PER_NODE="2")
    assert again.returncode == 0, again.stderr[-4000:]
    assert (published / MARKER).is_file()
    assert json.loads((published / "metrics.json").read_text())["artifact"]["uri"] == f"{published}/model"
