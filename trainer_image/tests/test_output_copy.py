"""The copy to ``output.copyTo`` (spec.output.uri): commit order, retries, errors that name the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from finetune_trainer.config import ConfigError, parse_config
from finetune_trainer.output_copy import MARKER, MODEL_CARD, OutputCopyError, copy_order, copy_outputs


def fake_outputs(root: Path) -> Path:
    """An output.dir as the export leaves it (small files standing in for the real ones)."""
    files = {
        "model/config.json": '{"model_type": "llama"}',
        "model/model.safetensors": "x" * 3000,
        "model/tokenizer.json": "{}",
        "adapter/adapter_config.json": "{}",
        "metrics.json": "{}",
        "loss_curve.png": "png",
        MODEL_CARD: "# model card",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _key(path: Any) -> str:
    """The object key below the bucket, however the filesystem was handed the path."""
    return str(path).split("bucket/", 1)[1]


class RecordingFileSystem(MemoryFileSystem):
    """An in-memory filesystem that records the order of writes and fails the first `failures` uploads of
    each file with a transient error (like a connection reset)."""

    protocol = "recording"
    failures: ClassVar[int] = 0
    writes: ClassVar[list[str]] = []
    _failed: ClassVar[dict[str, int]] = {}

    def put_file(self, lpath: Any, rpath: Any, *args: Any, **kwargs: Any) -> None:
        name = _key(rpath)
        if self._failed.get(name, 0) < self.failures:
            self._failed[name] = self._failed.get(name, 0) + 1
            raise ConnectionResetError(f"connection reset while uploading {name}")
        self.writes.append(name)
        super().put_file(lpath, rpath, *args, **kwargs)

    def pipe_file(self, path: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        self.writes.append(_key(path))
        super().pipe_file(path, value, *args, **kwargs)


@pytest.fixture
def recording() -> Iterator[type[RecordingFileSystem]]:
    fsspec.register_implementation("recording", RecordingFileSystem, clobber=True)
    RecordingFileSystem.failures, RecordingFileSystem.writes, RecordingFileSystem._failed = 0, [], {}
    RecordingFileSystem.store.clear()
    RecordingFileSystem.pseudo_dirs[:] = [""]
    yield RecordingFileSystem
    RecordingFileSystem.store.clear()


def test_file_destination_gets_every_file_then_the_card_then_the_marker(tmp_path: Path) -> None:
    out = fake_outputs(tmp_path / "out")
    dest = tmp_path / "published" / "v1"
    (dest).mkdir(parents=True)
    (dest / MARKER).write_text("{}")  # a previous copy's marker is not trusted
    result = copy_outputs(
        out, f"file://{dest}", address="pvc://models/v1", extra_marker={"artifact": {"a": 1}}
    )
    assert result.destination == "pvc://models/v1"
    names = copy_order(out)
    assert names[-1] == MODEL_CARD
    for name in names:
        assert (dest / name).read_bytes() == (out / name).read_bytes(), name
    marker = json.loads((dest / MARKER).read_text())
    assert marker["files"] == {name: (out / name).stat().st_size for name in names}
    assert marker["artifact"] == {"a": 1}
    assert result.files == len(names)
    assert result.bytes == marker["bytes"]
    assert not [p for p in dest.rglob("*") if p.name.endswith(".partial")]
    # The marker is the newest file, the model card the next newest.
    by_time = sorted(dest.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
    assert by_time[-1].name == MARKER


def test_transient_errors_are_retried_and_the_order_holds(
    tmp_path: Path, recording: type[RecordingFileSystem]
) -> None:
    out = fake_outputs(tmp_path / "out")
    recording.failures = 2
    sleeps: list[float] = []
    copy_outputs(out, "recording://bucket/runs/v1", attempts=3, sleep=sleeps.append)
    files = copy_order(out)
    assert recording.writes == [f"runs/v1/{name}" for name in [*files, MARKER]]
    assert sleeps == [1.0, 2.0] * len(files)  # two failures per file, exponential backoff


def test_transient_errors_beyond_the_attempts_fail_naming_the_field(
    tmp_path: Path, recording: type[RecordingFileSystem]
) -> None:
    out = fake_outputs(tmp_path / "out")
    recording.failures = 5
    with pytest.raises(OutputCopyError) as info:
        copy_outputs(out, "recording://bucket/runs/v1", attempts=3, sleep=lambda _: None)
    message = str(info.value)
    assert message.startswith("spec.output.uri: copying the outputs to recording://bucket/runs/v1 failed")
    assert "ConnectionResetError" in message
    assert "after 3 attempts" in message
    assert f"runs/v1/{MARKER}" not in recording.writes


def test_a_permanent_error_is_not_retried(tmp_path: Path) -> None:
    out = fake_outputs(tmp_path / "out")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    sleeps: list[float] = []
    with pytest.raises(OutputCopyError, match=r"^spec.output.uri: .*a-file/v1 failed") as info:
        copy_outputs(out, str(blocker / "v1"), sleep=sleeps.append)
    assert isinstance(info.value.__cause__, (NotADirectoryError, FileExistsError, FileNotFoundError))
    assert sleeps == []


def test_s3_destination_on_a_real_s3_server(tmp_path: Path, s3_server: str) -> None:
    import boto3

    out = fake_outputs(tmp_path / "out")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="runs/v1/COMPLETE", Body=b"{}")  # stale
    copy_outputs(out, "s3://models/runs/v1", sleep=lambda _: None)
    listed = s3.list_objects_v2(Bucket="models", Prefix="runs/v1/")["Contents"]
    keys = {o["Key"].removeprefix("runs/v1/"): o for o in listed}
    assert set(keys) == {*copy_order(out), MARKER}
    for name in copy_order(out):
        body = s3.get_object(Bucket="models", Key=f"runs/v1/{name}")["Body"].read()
        assert body == (out / name).read_bytes(), name
    marker = json.loads(s3.get_object(Bucket="models", Key="runs/v1/COMPLETE")["Body"].read())
    assert set(marker["files"]) == set(copy_order(out))
    assert keys[MARKER]["LastModified"] >= keys[MODEL_CARD]["LastModified"]


def test_s3_missing_bucket_fails_at_once_naming_the_field(tmp_path: Path, s3_server: str) -> None:
    out = fake_outputs(tmp_path / "out")
    sleeps: list[float] = []
    with pytest.raises(OutputCopyError) as info:
        copy_outputs(out, "s3://no-such-bucket/runs", address="s3://no-such-bucket/runs", sleep=sleeps.append)
    assert "spec.output.uri: copying the outputs to s3://no-such-bucket/runs failed" in str(info.value)
    assert sleeps == []


def _config(output: dict[str, Any]) -> Any:
    return parse_config(
        {"model": {"path": "/models/m"}, "data": {"source": "/data/d.jsonl"}, "output": output}
    )


@pytest.mark.parametrize("copy_to", ["/workspace/output/model", "file:///workspace/output/model/sub"])
def test_a_copy_into_the_output_folder_is_a_config_error(copy_to: str) -> None:
    with pytest.raises(ConfigError, match=r"is inside output.dir"):
        _config({"dir": "/workspace/output/model", "copyTo": copy_to})


@pytest.mark.parametrize(
    "copy_to",
    ["/workspace/exports/model", "/workspace/output/model-v2", "s3://bucket/workspace/output/model"],
)
def test_copies_elsewhere_are_accepted(copy_to: str) -> None:
    assert _config({"dir": "/workspace/output/model", "copyTo": copy_to}).output.copy_to == copy_to


def test_a_destination_no_filesystem_can_reach_is_refused_before_training(tmp_path: Path) -> None:
    from finetune_trainer.exit_codes import ExitCode
    from trainer_fixtures import make_config, make_task_data, make_tiny_model, run_trainer, write_config

    model, data = make_tiny_model(tmp_path / "model"), make_task_data(tmp_path / "data.jsonl", rows=40)
    config = make_config(tmp_path, model, data, output={"copyTo": "nosuch://bucket/v1"})
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
    assert "output.copyTo 'nosuch://bucket/v1' (spec.output.uri): Protocol not known: nosuch" in result.stderr
    assert not (tmp_path / "ckpt").exists()  # refused by the pre-flight: nothing trained
