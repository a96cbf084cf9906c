"""Pure pieces of the trainer: data order, checkpoint commit and pruning, schedule, loss, launcher."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_trainer.checkpoint import CheckpointManager, checkpoint_name, complete_checkpoints
from finetune_trainer.config import ConfigError, Hyperparameters, LrScheduler, TrainerConfig, parse_config
from finetune_trainer.data_order import DataOrder
from finetune_trainer.deepspeed_config import (
    deepspeed_config,
    load_deepspeed_config,
    resolve_deepspeed_config,
)
from finetune_trainer.distributed import Distributed
from finetune_trainer.engine import POLYNOMIAL_LR_END, lr_lambda
from finetune_trainer.engine import deepspeed_config as engine_deepspeed_config
from finetune_trainer.env import DEEPSPEED_CONFIG_ENV, TorchrunEnv
from finetune_trainer.exit_codes import NON_RETRYABLE, ExitCode
from finetune_trainer.export import output_address
from finetune_trainer.launch import read_exit_code, torchrun_command
from finetune_trainer.state import TrainState, improved
from finetune_trainer.tasks.causal_lm import causal_lm_loss
from finetune_trainer.train import classify


def test_data_order_gives_each_example_to_one_rank_once_per_epoch() -> None:
    order = DataOrder(num_examples=103, micro_batch=4, accumulation=3, world_size=2, seed=5)
    assert order.steps_per_epoch == 103 // 24
    perm = order.permutation(epoch=0)
    seen: list[int] = []
    for step in range(order.steps_per_epoch):
        for rank in range(2):
            for micro in order.micro_batches(perm, step, rank):
                assert len(micro) == 4
                seen.extend(micro)
    assert len(seen) == len(set(seen)) == order.steps_per_epoch * 24
    assert order.permutation(0) == perm
    assert order.permutation(1) != perm


def test_causal_lm_loss_ignores_masked_labels_and_shifts() -> None:
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = 10.0  # predicts token 2 at position 1
    labels = torch.tensor([[-100, 2, -100, -100]])
    loss, count = causal_lm_loss(logits, labels)
    assert int(count) == 1
    assert float(loss) < 1e-3
    smoothed, _ = causal_lm_loss(logits, labels, label_smoothing=0.1)
    assert float(smoothed) > float(loss)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "polynomial", "constant-with-warmup"])
def test_lr_schedule_warms_up_then_follows_the_schedule(schedule: str) -> None:
    hp = Hyperparameters(warmupSteps=4, lrScheduler=schedule)  # type: ignore[call-arg]
    factor = lr_lambda(hp, total_steps=20)
    warm = [factor(s) for s in range(4)]
    assert warm == sorted(warm)
    assert warm[-1] == 1.0
    tail = [factor(s) for s in range(4, 21)]
    if schedule == "constant-with-warmup":
        assert set(tail) == {1.0}
    else:
        assert tail == sorted(tail, reverse=True)
        end = POLYNOMIAL_LR_END / hp.learning_rate if schedule == "polynomial" else 0.0  # 1e-7 absolute
        assert tail[-1] == pytest.approx(end, abs=1e-9)


def test_every_schedule_the_api_accepts_is_a_distinct_schedule() -> None:
    """No schedule falls back to another: the six FineTuneJob names give six different curves."""
    curves = {}
    for schedule in LrScheduler:
        cycles = 3 if schedule is LrScheduler.COSINE_WITH_RESTARTS else 1
        warmup = None if schedule is LrScheduler.CONSTANT else 4
        hp = Hyperparameters(lrScheduler=schedule, lrCycles=cycles, warmupSteps=warmup)  # type: ignore[call-arg]
        factor = lr_lambda(hp, total_steps=40)
        curves[schedule.value] = tuple(round(factor(s), 6) for s in range(41))
    assert len(set(curves.values())) == len(curves) == 6
    assert curves["constant"][0] == 1.0  # no warm-up
    restarts = curves["cosine-with-restarts"]
    assert any(later > earlier for earlier, later in itertools.pairwise(restarts[2:]))


def _ds_cfg(**distributed: object) -> TrainerConfig:
    return parse_config(
        {
            "model": {"path": "/m"},
            "data": {"source": "/d"},
            "hyperparameters": {"microBatchSize": 3, "gradientAccumulationSteps": 5, "maxGradNorm": 0},
            "distributed": {"zeroStage": 3, "offload": "all", "precision": "bf16", **distributed},
        }
    )


@pytest.mark.parametrize("pin_memory", [True, False])
def test_deepspeed_config_batch_arithmetic_and_precision(pin_memory: bool) -> None:
    ds = deepspeed_config(_ds_cfg(), world_size=4, pin_memory=pin_memory)
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["bf16"] == {"enabled": True}
    assert "gradient_clipping" not in ds
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": pin_memory}
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_mounted_deepspeed_config_is_used_when_it_fits_the_world_size(tmp_path: Path) -> None:
    cfg = _ds_cfg()
    mounted = deepspeed_config(cfg, world_size=4, pin_memory=False)
    mounted["wall_clock_breakdown"] = True  # something the trainer would not compute itself
    path = tmp_path / "deepspeed.json"
    path.write_text(json.dumps(mounted))
    assert engine_deepspeed_config(cfg, 4, {DEEPSPEED_CONFIG_ENV: str(path)}) == mounted
    # Named but absent (a local run): computed, as without the variable.
    computed = engine_deepspeed_config(cfg, 4, {DEEPSPEED_CONFIG_ENV: str(tmp_path / "none.json")})
    assert computed == engine_deepspeed_config(cfg, 4, {})
    assert computed["wall_clock_breakdown"] is False


def test_a_mounted_deepspeed_config_for_another_world_size_is_a_config_error(tmp_path: Path) -> None:
    cfg = _ds_cfg()
    path = tmp_path / "deepspeed.json"
    path.write_text(json.dumps(deepspeed_config(cfg, world_size=16, pin_memory=True)))
    with pytest.raises(ConfigError) as refused:
        resolve_deepspeed_config(cfg, 4, pin_memory=False, environ={DEEPSPEED_CONFIG_ENV: str(path)})
    message = str(refused.value)
    assert str(path) in message
    assert f"train_batch_size={3 * 5 * 16} does not fit this run: 4 ranks" in message, message
    assert classify(refused.value) is ExitCode.CONFIG_ERROR
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        load_deepspeed_config(path, cfg, 4)


def test_deepspeed_config_module_is_torch_free() -> None:
    """The operator imports it to render the ConfigMap; it must not pull torch in."""
    code = (
        "import sys; import finetune_trainer.deepspeed_config; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_artifact_addresses_use_output_uri_when_set() -> None:
    base = {"model": {"path": "/m"}, "data": {"source": "/d"}}
    in_pod = parse_config({**base, "output": {"dir": "/workspace/output/model"}})
    assert output_address(in_pod, "model") == "/workspace/output/model/model"
    addressed = parse_config(
        {**base, "output": {"dir": "/workspace/output/model", "uri": "pvc://job-checkpoints/output/model/"}}
    )
    assert output_address(addressed, "model") == "pvc://job-checkpoints/output/model/model"
    assert output_address(addressed, "README.md") == "pvc://job-checkpoints/output/model/README.md"


def _manager(root: Path, keep_last: int = 2) -> CheckpointManager:
    return CheckpointManager(root, Distributed(TorchrunEnv(), use_deepspeed=False), keep_last=keep_last)


def _write_engine(tmp: Path) -> None:
    (tmp / "engine.pt").write_bytes(b"weights")


def test_checkpoint_commit_marker_and_half_written_checkpoints_ignored(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.save(10, _write_engine, TrainState(step=10).to_json())
    # A run killed while writing step 20 (tmp folder), and one killed between rename and marker (step 30).
    (tmp_path / (checkpoint_name(20) + ".tmp")).mkdir()
    half = tmp_path / checkpoint_name(30)
    half.mkdir()
    (half / "trainer_state.json").write_text(json.dumps(TrainState(step=30).to_json()))
    latest = manager.latest()
    assert latest is not None
    assert latest.step == 10
    assert latest.read_state()["step"] == 10
    assert latest.load_rng(0) is not None
    manifest = json.loads((latest.path / "manifest.json").read_text())
    assert manifest["files"]["engine.pt"] == len(b"weights")
    manager.prune(keep_steps=set())
    assert not (tmp_path / (checkpoint_name(20) + ".tmp")).exists()
    assert not half.exists()


def test_prune_keeps_last_k_and_the_best(tmp_path: Path) -> None:
    manager = _manager(tmp_path, keep_last=2)
    for step in (5, 10, 15, 20):
        manager.save(step, _write_engine, TrainState(step=step).to_json())
        manager.prune(keep_steps={5})
    assert [c.step for c in complete_checkpoints(tmp_path)] == [5, 15, 20]


def test_early_stopping_improvement_respects_mode_and_min_delta() -> None:
    cfg = parse_config(
        {
            "model": {"path": "/m"},
            "data": {"source": "/d"},
            "earlyStopping": {"enabled": True, "mode": "min", "minDelta": 0.1},
        }
    )
    assert improved(cfg, 1.0, None)
    assert improved(cfg, 0.85, 1.0)
    assert not improved(cfg, 0.95, 1.0)
    cfg.early_stopping.mode = "max"
    assert improved(cfg, 1.2, 1.0)
    assert not improved(cfg, 1.05, 1.0)


def test_exceptions_map_to_documented_exit_codes() -> None:
    from finetune_trainer.config import ConfigError
    from finetune_trainer.data.errors import DataError
    from finetune_trainer.modeling import ModelError

    assert classify(ConfigError("x")) is ExitCode.CONFIG_ERROR
    assert classify(DataError("x")) is ExitCode.DATA_ERROR
    assert classify(ModelError("x")) is ExitCode.MODEL_ERROR
    assert classify(RuntimeError("x")) is ExitCode.RETRYABLE
    assert {ExitCode.CONFIG_ERROR, ExitCode.DATA_ERROR, ExitCode.MODEL_ERROR} == NON_RETRYABLE
    assert ExitCode.PREEMPTED not in NON_RETRYABLE


def test_torchrun_command_standalone_or_from_pet_variables() -> None:
    local = torchrun_command("/c.yaml", shutdown_timeout=90, environ={}, python="py")
    assert local[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--max-restarts=0" in local
    assert "--shutdown-timeout=90" in local
    assert "--standalone" in local
    assert local[-3:] == ["finetune_trainer.train", "--config", "/c.yaml"]
    multi = torchrun_command(
        "/c.yaml", shutdown_timeout=90, environ={"PET_MASTER_ADDR": "j-0.svc"}, python="py"
    )
    assert "--standalone" not in multi


def test_exit_code_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "code"
    path.write_text("4\nDataError: too many bad rows\n")
    assert read_exit_code(path) == (4, "DataError: too many bad rows")
    assert read_exit_code(tmp_path / "absent") == (None, "")


def test_torchrun_env_read_in_one_place() -> None:
    env = TorchrunEnv.from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launched) == (3, 8, 1, "h", True)
    assert not TorchrunEnv.from_environ({}).launched
    with pytest.raises(ValueError, match="RANK"):
        TorchrunEnv.from_environ({"RANK": "x"})


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_prometheus_endpoint_serves_the_training_gauges(tmp_path: Path) -> None:
    import urllib.request

    from finetune_trainer.config import Reporting
    from finetune_trainer.reporting import Reporter

    port = _free_port()
    reporter = Reporter(Reporting(metricsPort=port), tmp_path, enabled=True)  # type: ignore[call-arg]
    try:
        reporter.gauges({"loss": 1.5, "tokens_per_second": 1234.0, "progress_ratio": 0.25, "grad_norm": None})
        reporter.event("train", step=3, loss=1.5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        reporter.close()
    assert "finetune_trainer_loss 1.5" in body
    assert "finetune_trainer_tokens_per_second 1234.0" in body
    assert "finetune_trainer_progress_ratio 0.25" in body
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.5


def test_status_reporting_is_off_outside_a_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer.config import Reporting
    from finetune_trainer.reporting import Reporter

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("FTO_STATUS_KUBECONFIG", raising=False)
    reporter = Reporter(Reporting(jobName="j", namespace="ns", metricsPort=0), tmp_path, enabled=True)  # type: ignore[call-arg]
    try:
        assert reporter.patcher is None
        reporter.status({"progress": {"step": 1}})  # a no-op, not an error
    finally:
        reporter.close()


def test_wait_for_master_resolves_or_gives_up() -> None:
    from finetune_trainer.launch import wait_for_master

    assert wait_for_master("localhost", timeout_seconds=5)
    assert not wait_for_master("no-such-host.invalid", timeout_seconds=0.2, interval=0.05)
