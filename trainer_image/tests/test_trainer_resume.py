"""Restarts: SIGKILL then resume, half-written checkpoints ignored, SIGTERM saves and exits PREEMPTED."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from finetune_trainer.checkpoint import MARKER, complete_checkpoints
from finetune_trainer.exit_codes import ExitCode
from trainer_fixtures import (
    make_config,
    make_task_data,
    make_tiny_model,
    read_events,
    run_trainer,
    trainer_env,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_task_data(root / "data.jsonl", rows=300)


def _config(tmp: Path, tiny: tuple[Path, Path], **overrides: object) -> Path:
    model_dir, data = tiny
    sections: dict[str, object] = {
        # Dropout makes the loss depend on the RNG state, so an exact continuation proves it was restored.
        "hyperparameters": {"epochs": 5, "dropout": 0.1},
        "evaluation": {"everySteps": 0, "beforeTraining": False},
        "checkpointing": {"dir": str(tmp / "ckpt"), "everySteps": 5, "keepLast": 3},
        **overrides,
    }
    config = make_config(tmp, model_dir, data, **sections)
    return write_config(tmp, config)


def _start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer", "--config", str(config)],
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_checkpoint(
    root: Path, proc: subprocess.Popen[str], min_step: int, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.step >= min_step for c in complete_checkpoints(root)):
            return
        if proc.poll() is not None:
            pytest.fail(f"trainer ended before checkpoint {min_step}: {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        time.sleep(0.02)
    pytest.fail(f"no checkpoint {min_step} within {timeout}s")


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the launcher and every descendant (torchrun puts workers in their own sessions)."""
    parent = psutil.Process(proc.pid)
    family = [*parent.children(recursive=True), parent]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def _train_losses(events: list[dict[str, object]]) -> dict[int, float]:
    return {int(str(e["step"])): float(str(e["loss"])) for e in events if e["event"] == "train"}


@pytest.mark.parametrize("zero_stage", [0, 1], ids=["torch", "deepspeed"])
def test_sigkill_then_restart_resumes_and_continues_the_curve(
    tmp_path: Path, tiny: tuple[Path, Path], zero_stage: int
) -> None:
    distributed = {"zeroStage": zero_stage, "precision": "fp32", "shutdownTimeoutSeconds": 30}
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    reference = run_trainer(_config(reference_dir, tiny, distributed=distributed))
    assert reference.returncode == 0, reference.stderr[-4000:]
    expected = _train_losses(read_events(reference_dir / "out" / "metrics.jsonl"))
    total = json.loads((reference_dir / "out" / "metrics.json").read_text())["totalSteps"]

    config = _config(killed_dir, tiny, distributed=distributed)
    proc = _start(config)
    _wait_for_checkpoint(killed_dir / "ckpt", proc, min_step=10)
    _kill_tree(proc)  # the whole pod dies at once: launcher, torchrun and worker

    newest = complete_checkpoints(killed_dir / "ckpt")[-1].step
    assert newest < total

    # Debris of a run killed while saving: a tmp folder and a renamed folder without its marker.
    ckpt = killed_dir / "ckpt"
    (ckpt / f"step-{newest + 2:08d}.tmp").mkdir()
    (ckpt / f"step-{newest + 2:08d}.tmp" / "engine.pt").write_bytes(b"garbage")
    half = ckpt / f"step-{newest + 3:08d}"
    half.mkdir()
    (half / "trainer_state.json").write_text('{"step": 999}')
    assert not (half / MARKER).exists()

    restarted = run_trainer(config)
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    # The restart found the data the killed attempt prepared, and says so in its log and its report.
    assert "finetune_trainer.data.pipeline: reusing the prepared data in" in restarted.stderr
    report = json.loads((killed_dir / "out" / "data_report.json").read_text())
    assert report["cache"]["reused"] is True
    events = read_events(killed_dir / "out" / "metrics.jsonl")
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1
    assert resume[0]["step"] == newest
    after_resume = _train_losses(events[events.index(resume[0]) :])
    assert min(after_resume) == newest + 1
    assert max(after_resume) == total
    metrics = json.loads((killed_dir / "out" / "metrics.json").read_text())
    assert metrics["steps"] == total
    print(f"resumed at step {newest}; loss after resume vs uninterrupted:")
    for step in sorted(after_resume)[:5]:
        print(f"  step {step}: {after_resume[step]:.6f} vs {expected[step]:.6f}")
    for step, loss in after_resume.items():
        assert loss == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step
    assert not half.exists()  # pruned as half-written


def test_sigterm_saves_a_checkpoint_and_exits_preempted(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    config = _config(tmp_path, tiny, checkpointing={"dir": str(tmp_path / "ckpt"), "everySteps": 7})
    proc = _start(config)
    _wait_for_checkpoint(tmp_path / "ckpt", proc, min_step=7)
    proc.send_signal(signal.SIGTERM)  # what the kubelet does to PID 1 of the container
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == ExitCode.PREEMPTED, stderr[-4000:]
    events = read_events(tmp_path / "out" / "metrics.jsonl")
    preempted = [e for e in events if e["event"] == "preempted"]
    assert len(preempted) == 1
    step = preempted[0]["step"]
    saved = {c.step for c in complete_checkpoints(tmp_path / "ckpt")}
    assert step in saved
    assert step % 7 != 0 or step in saved  # saved at the agreed step, not only on the schedule
