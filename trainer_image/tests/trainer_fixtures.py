"""Tiny models, data and configs for the trainer tests: made on the spot, nothing downloaded."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def tiny_tokenizer() -> Any:
    """The data helper's character-level tokenizer (tiny_tokenizer.py)."""
    from tiny_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer()


def make_tiny_model(directory: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-initialised Llama-style causal LM + tokenizer saved in Hugging Face format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def make_task_data(path: Path, rows: int = 240, seed: int = 0) -> Path:
    """A small generated task with a learnable rule: a word and its first letter in upper case.

    ``{"prompt": "word: kqzt\\nfirst:", "completion": " K"}`` — the completion is a function of the prompt, so
    a model that learned the rule does better on unseen (test) rows too."""
    rng = random.Random(seed)
    lines: list[str] = []
    seen = set()
    while len(lines) < rows:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word in seen:
            continue
        seen.add(word)
        lines.append(json.dumps({"prompt": f"word: {word}\nfirst:", "completion": f" {word[0].upper()}"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_config(tmp: Path, model_dir: Path, data_path: Path, **overrides: Any) -> dict[str, Any]:
    """A config dict for a tiny CPU run; ``overrides`` are merged per section (camelCase keys)."""
    config: dict[str, Any] = {
        "version": "v1",
        "model": {"path": str(model_dir), "license": "apache-2.0"},
        "task": "causal-lm",
        "data": {
            "source": str(data_path),
            "maxSeqLength": 64,
            "split": {"validation": 0.1, "test": 0.1, "seed": 1},
        },
        "method": "full",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {
            "epochs": 2,
            "microBatchSize": 8,
            "gradientAccumulationSteps": 1,
            "learningRate": 3e-3,
            "lrScheduler": "cosine",
            "warmupSteps": 2,
            "maxGradNorm": 1.0,
        },
        # Evaluations and checkpoints by step only (the trainer's defaults add them at each epoch end).
        "evaluation": {"everySteps": 10, "everyEpoch": False, "batchSize": 16},
        "checkpointing": {"dir": str(tmp / "ckpt"), "everySteps": 10, "keepLast": 2, "saveOnEpochEnd": False},
        "distributed": {"zeroStage": 0, "precision": "fp32", "shutdownTimeoutSeconds": 60},
        "output": {"dir": str(tmp / "out"), "mergeAdapter": True},
        "reporting": {"metricsPort": 0, "statusThrottleSeconds": 0},
        "seed": 7,
    }
    return merge_overrides(config, overrides)


def merge_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each override: a section's keys merged into the section, any other value replacing."""
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def write_config(tmp: Path, config: dict[str, Any], name: str = "config.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "trainer_image" / "src"), str(REPO / "trainer_image" / "tests")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["CUDA_VISIBLE_DEVICES"] = ""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FTO_EXIT_CODE_FILE"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_trainer(config_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m finetune_trainer --config PATH`` the way the pod runs it."""
    return subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", str(config_path)],
        env=trainer_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


#: Two DeepSpeed ranks on the CPU (gloo): ZeRO stage 2 in fp32, the ``distributed`` section of a config.
ZERO2_CPU: dict[str, Any] = {"zeroStage": 2, "precision": "fp32", "shutdownTimeoutSeconds": 30}


def run_two_ranks(config_path: Path) -> subprocess.CompletedProcess[str]:
    """The trainer on two local ranks, as torchrun starts them in a pod with two processes per node."""
    return run_trainer(config_path, PET_NPROC_PER_NODE="2")


def check_two_rank_classification(
    tmp: Path, id2label: dict[str, str], test_rows: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared checks of a two-rank ZeRO-2 classification run in ``tmp`` (``out``/``ckpt`` laid out as
    ``make_config`` does): each of the ``test_rows`` (from the data report) is counted once in the confusion
    matrix (the padding rows of an uneven last round dropped), its diagonal is the reported accuracy, both
    ranks saved their optimizer shard, and the artifact carries the label map. Returns the test split's
    metrics (before, after)."""
    out = tmp / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["test"], metrics["after"]["test"]
    matrix = json.loads((out / "classification_report.json").read_text())["confusionMatrix"]
    assert sum(map(sum, matrix)) == test_rows
    assert sum(matrix[i][i] for i in range(len(matrix))) / test_rows == pytest.approx(after["accuracy"])
    ckpt = sorted((tmp / "ckpt").glob("step-*"))[-1]
    assert list((ckpt / "engine").rglob("zero_pp_rank_0_*optim_states.pt")), "rank 0's shard is missing"
    assert list((ckpt / "engine").rglob("zero_pp_rank_1_*optim_states.pt")), "rank 1's shard is missing"
    assert json.loads((out / "model" / "config.json").read_text())["id2label"] == id2label
    return before, after


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
