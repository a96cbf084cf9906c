"""A tiny causal LM learns a generated task through the real entrypoint (launcher -> torchrun -> worker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from trainer_fixtures import (
    make_config,
    make_task_data,
    make_tiny_model,
    read_events,
    run_trainer,
    write_config,
)

pytestmark = pytest.mark.slow

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_task_data(root / "data.jsonl")


def _metrics(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "metrics.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("full", {}),
        # A random-initialised base has tiny frozen output logits: adapt lm_head too so LoRA can sharpen them.
        ("lora", {"hyperparameters": {"learningRate": 1e-2}, "lora": {"targetModules": LORA_TARGETS}}),
    ],
)
def test_tiny_model_learns_the_task(
    tmp_path: Path, tiny: tuple[Path, Path], method: str, overrides: dict[str, Any]
) -> None:
    model_dir, data = tiny
    config = make_config(tmp_path, model_dir, data, method=method, **overrides)
    config["evaluation"]["generationSamples"] = 3
    config["evaluation"]["maxNewTokens"] = 4
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    metrics = _metrics(out)
    before, after = metrics["before"]["test"], metrics["after"]["test"]
    print(f"{method}: test before {before} -> after {after}")
    assert after["loss"] < 0.6 * before["loss"]
    assert after["accuracy"] >= before["accuracy"] + 0.3
    assert metrics["steps"] == metrics["totalSteps"]

    # Artifact layout: safetensors + tokenizer in model/, the adapter kept for LoRA, card, metrics, reports.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "model" / name).is_file(), name
    if method == "lora":
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert metrics["artifact"]["format"] == "merged"
    for name in ("README.md", "loss_curve.png", "data_report.json", "provenance.json", "trainer_config.json"):
        assert (out / name).is_file(), name
    assert len(metrics["samples"]) == 3
    assert all(
        s["prompt"].startswith("word: ") and isinstance(s["generated"], str) for s in metrics["samples"]
    )
    card = (out / "README.md").read_text()
    assert "## Sample completions" in card
    assert "| test | loss |" in card
    assert "## Data" in card
    assert "loss_curve.png" in card

    # The exported model loads and reproduces the reported test loss.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as handle:
        assert not any("lora" in key for key in handle.keys())  # noqa: SIM118
    assert sum(p.numel() for p in model.parameters()) > 0

    events = read_events(out / "metrics.jsonl")
    kinds = {e["event"] for e in events}
    assert {"start", "train", "eval", "checkpoint", "done"} <= kinds
    train = [e for e in events if e["event"] == "train"]
    assert all(e["tokens_per_second"] > 0 and e["lr"] > 0 for e in train[:-1])


def test_early_stopping_stops_and_exports_the_best_step(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    model_dir, data = tiny
    # Every evaluation after the first must beat the best by 100 nats: impossible, so it stops after patience.
    config = make_config(
        tmp_path,
        model_dir,
        data,
        evaluation={"everySteps": 5, "batchSize": 16},
        earlyStopping={"enabled": True, "metric": "loss", "mode": "min", "patience": 2, "minDelta": 100.0},
        checkpointing={"dir": str(tmp_path / "ckpt"), "everySteps": 100, "keepLast": 1},
    )
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = _metrics(tmp_path / "out")
    assert metrics["stoppedEarly"] is True
    assert metrics["steps"] == 15 < metrics["totalSteps"]
    assert metrics["bestStep"] == 5
    # What was exported is the best checkpoint (step 5), not the last weights (step 15).
    eval_at_5 = next(h["eval_loss"] for h in metrics["history"] if h.get("eval_loss") and h["step"] == 5)
    assert metrics["after"]["validation"]["loss"] == pytest.approx(eval_at_5, rel=1e-5)
    # keepLast 1 plus the best: the best checkpoint survives pruning.
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["step-00000005", "step-00000015"]
