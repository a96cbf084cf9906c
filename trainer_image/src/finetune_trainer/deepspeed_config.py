"""The DeepSpeed JSON of a run, defined once (torch-free: the operator renders it into the job's ConfigMap).

The operator writes ``deepspeed_config(cfg, nodes x max(gpusPerNode, 1), pin_memory=gpusPerNode > 0)`` to
the file named by ``FTO_DEEPSPEED_CONFIG``; the trainer uses that file when it exists (after checking its
batch sizes against the actual world size) and computes the same function itself otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_trainer.config import ConfigError, Offload, Precision, TrainerConfig
from finetune_trainer.env import DEEPSPEED_CONFIG_ENV

log = logging.getLogger(__name__)


def deepspeed_config(cfg: TrainerConfig, world_size: int, *, pin_memory: bool) -> dict[str, Any]:
    """DeepSpeed config for ``world_size`` ranks; ``pin_memory`` for offloaded tensors (needs CUDA)."""
    hp, dist = cfg.hyperparameters, cfg.distributed
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload is not Offload.NONE:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if dist.offload is Offload.ALL:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hp.micro_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "train_batch_size": hp.micro_batch_size * hp.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }
    if hp.max_grad_norm > 0:
        config["gradient_clipping"] = hp.max_grad_norm
    if dist.precision is Precision.BF16:
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif dist.precision is Precision.FP16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def load_deepspeed_config(path: Path, cfg: TrainerConfig, world_size: int) -> dict[str, Any]:
    """A rendered DeepSpeed JSON, refused (ConfigError) when its batch sizes don't fit this run."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{DEEPSPEED_CONFIG_ENV}={path}: cannot read the DeepSpeed config: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{DEEPSPEED_CONFIG_ENV}={path}: the DeepSpeed config must be a JSON object")
    hp = cfg.hyperparameters
    expected = {
        "train_micro_batch_size_per_gpu": hp.micro_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "train_batch_size": hp.micro_batch_size * hp.gradient_accumulation_steps * world_size,
    }
    wrong = {key: loaded.get(key) for key, value in expected.items() if loaded.get(key) != value}
    if wrong:
        found = ", ".join(f"{key}={value}" for key, value in wrong.items())
        raise ConfigError(
            f"{DEEPSPEED_CONFIG_ENV}={path}: {found} does not fit this run: {world_size} ranks"
            f" x microBatchSize {hp.micro_batch_size} x gradientAccumulationSteps"
            f" {hp.gradient_accumulation_steps} = train_batch_size {expected['train_batch_size']}"
            " (was it rendered for another world size?)"
        )
    return loaded


def resolve_deepspeed_config(
    cfg: TrainerConfig, world_size: int, *, pin_memory: bool, environ: Mapping[str, str]
) -> dict[str, Any]:
    """The file named by ``FTO_DEEPSPEED_CONFIG`` when it exists (checked), else computed here."""
    named = environ.get(DEEPSPEED_CONFIG_ENV)
    if named and Path(named).is_file():
        loaded = load_deepspeed_config(Path(named), cfg, world_size)
        log.info(
            "DeepSpeed config from %s=%s (train_batch_size %s)",
            DEEPSPEED_CONFIG_ENV,
            named,
            loaded["train_batch_size"],
        )
        return loaded
    log.info("DeepSpeed config computed for %d ranks (no file at %s)", world_size, DEEPSPEED_CONFIG_ENV)
    return deepspeed_config(cfg, world_size, pin_memory=pin_memory)
