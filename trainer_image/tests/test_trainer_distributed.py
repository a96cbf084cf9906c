"""Two ranks with torchrun + DeepSpeed ZeRO-2/3 on the CPU (gloo) give the same artifact as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from finetune_trainer.config import parse_config
from finetune_trainer.deepspeed_config import deepspeed_config
from finetune_trainer.env import DEEPSPEED_CONFIG_ENV
from finetune_trainer.exit_codes import ExitCode
from trainer_fixtures import make_config, make_task_data, make_tiny_model, run_trainer, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_task_data(root / "data.jsonl")


def _layout(model_dir: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    files = sorted(p.name for p in model_dir.iterdir())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    return files, shapes


def _train(
    tmp: Path, tiny: tuple[Path, Path], method: str, distributed: dict[str, object], **env: str
) -> dict:  # type: ignore[type-arg]
    overrides: dict[str, object] = {
        "method": method,
        # A random-initialised base has tiny frozen output logits: let LoRA adapt lm_head too.
        "lora": {"targetModules": ["q_proj", "v_proj", "lm_head"]},
        "distributed": {"precision": "fp32", "shutdownTimeoutSeconds": 30, **distributed},
        # micro 4 x 2 ranks = the single process's 8: the same global batch and step count.
        "hyperparameters": {"microBatchSize": 4 if env else 8, "epochs": 1},
        "evaluation": {"everySteps": 10, "batchSize": 8, "generationSamples": 2, "maxNewTokens": 4},
    }
    config = make_config(tmp, *tiny, **overrides)  # type: ignore[arg-type]
    if env:
        # As in a pod: the DeepSpeed JSON rendered for the gang's world size is mounted and used.
        env = {DEEPSPEED_CONFIG_ENV: str(_mounted_deepspeed(tmp, config, world_size=2)), **env}
    result = run_trainer(write_config(tmp, config), **env)
    assert result.returncode == 0, result.stderr[-5000:]
    if env:
        assert f"DeepSpeed config from {DEEPSPEED_CONFIG_ENV}=" in result.stderr, result.stderr[-3000:]
    return json.loads((tmp / "out" / "metrics.json").read_text())  # type: ignore[no-any-return]


def _mounted_deepspeed(tmp: Path, config: dict[str, object], world_size: int) -> Path:
    """The file the operator renders into the ConfigMap (the same function, for `world_size` ranks)."""
    path = tmp / "deepspeed.json"
    path.write_text(json.dumps(deepspeed_config(parse_config(config), world_size, pin_memory=False)))
    return path


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Path, Path]) -> Path:
    tmp = tmp_path_factory.mktemp("single")
    _train(tmp, tiny, "full", {"zeroStage": 0})
    return tmp / "out"


@pytest.mark.parametrize(("method", "zero_stage"), [("full", 2), ("full", 3), ("lora", 3)])
def test_two_ranks_zero_train_and_export_the_single_process_layout(
    tmp_path: Path, tiny: tuple[Path, Path], single_process: Path, method: str, zero_stage: int
) -> None:
    metrics = _train(tmp_path, tiny, method, {"zeroStage": zero_stage}, PET_NPROC_PER_NODE="2")
    before, after = metrics["before"]["test"], metrics["after"]["test"]
    print(f"{method} ZeRO-{zero_stage} x2: test before {before} -> after {after}")
    assert after["loss"] < 0.8 * before["loss"]

    # Generation under ZeRO-3 needs every rank in lockstep (synced_gpus); it finished and gave text.
    assert len(metrics["samples"]) == 2
    out = tmp_path / "out"
    assert _layout(out / "model") == _layout(single_process / "model")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")
    # Both ranks wrote their own RNG state and shards into every checkpoint.
    ckpt = sorted((tmp_path / "ckpt").glob("step-*"))[-1]
    assert {p.name for p in ckpt.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    shards = list((ckpt / "engine").rglob("zero_pp_rank_1_*optim_states.pt"))
    assert shards, "rank 1's optimizer shard is missing"
    if method == "lora":
        # The adapter gathered from ZeRO-3 shards holds real weights, not empty placeholders.
        from safetensors.torch import load_file

        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        lora_b = [t for k, t in adapter.items() if "lora_B" in k]
        assert lora_b
        assert all(t.numel() > 0 for t in lora_b)
        assert any(float(t.abs().sum()) > 0 for t in lora_b)
        return
    # Same global batch, same data order, same seed: two ranks follow the single process closely.
    single = json.loads((single_process / "metrics.json").read_text())
    assert after["loss"] == pytest.approx(single["after"]["test"]["loss"], rel=0.05)


def test_a_deepspeed_config_rendered_for_another_world_size_is_refused_before_any_work(
    tmp_path: Path, tiny: tuple[Path, Path]
) -> None:
    distributed = {"zeroStage": 2, "precision": "fp32"}
    config = make_config(tmp_path, *tiny, distributed=distributed, hyperparameters={"microBatchSize": 4})
    mounted = _mounted_deepspeed(tmp_path, config, world_size=4)  # the gang has 2 ranks
    result = run_trainer(
        write_config(tmp_path, config), PET_NPROC_PER_NODE="2", **{DEEPSPEED_CONFIG_ENV: str(mounted)}
    )
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-5000:]
    # micro-batch 4 x accumulation 1 x 4 ranks, refused by a gang of 2, with the reason.
    reason = f"{DEEPSPEED_CONFIG_ENV}={mounted}: train_batch_size={4 * 1 * 4} does not fit this run: 2 ranks"
    assert reason in result.stderr, result.stderr[-5000:]
    assert not (tmp_path / "out" / "data_report.json").exists()  # refused before data preparation


def test_sigterm_to_one_rank_makes_all_ranks_save_the_same_step(
    tmp_path: Path, tiny: tuple[Path, Path]
) -> None:
    """Only one pod of a gang may be told to stop: the ranks agree (all-reduce) and save together."""
    import signal
    import subprocess
    import sys
    import time

    import psutil  # type: ignore[import-untyped]

    from finetune_trainer.checkpoint import complete_checkpoints
    from finetune_trainer.exit_codes import ExitCode
    from trainer_fixtures import read_events, trainer_env

    overrides: dict[str, object] = {
        "method": "full",
        "distributed": {"zeroStage": 2, "precision": "fp32", "shutdownTimeoutSeconds": 60},
        "hyperparameters": {"microBatchSize": 4, "epochs": 20},
        "evaluation": {"everySteps": 0, "beforeTraining": False},
        "checkpointing": {"dir": str(tmp_path / "ckpt"), "everySteps": 7, "keepLast": 2},
    }
    config = write_config(tmp_path, make_config(tmp_path, *tiny, **overrides))  # type: ignore[arg-type]
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer", "--config", str(config)],
        env=trainer_env(PET_NPROC_PER_NODE="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not complete_checkpoints(tmp_path / "ckpt"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "finetune_trainer.train" in " ".join(p.cmdline())
        ]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ExitCode.PREEMPTED, stderr[-4000:]
    preempted = [e for e in read_events(tmp_path / "out" / "metrics.jsonl") if e["event"] == "preempted"]
    assert len(preempted) == 1
    step = preempted[0]["step"]
    saved = next(c for c in complete_checkpoints(tmp_path / "ckpt") if c.step == step)
    assert {p.name for p in saved.path.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    assert list((saved.path / "engine").rglob("zero_pp_rank_1_*optim_states.pt"))
