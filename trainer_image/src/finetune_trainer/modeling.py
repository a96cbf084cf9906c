"""Loading the base model and tokenizer, and turning the model into what the method trains.

What every Hugging Face task shares; the task modules (finetune_trainer.tasks) pick the ``AutoModelFor…``
class, the config overrides and the peft task type. Errors that a restart cannot fix (missing path, a model
of the wrong kind, QLoRA without CUDA) raise
:class:`ModelError` or :class:`~finetune_trainer.config.ConfigError`; the worker maps them to exit codes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.config import ConfigError, Method, ModelSource, Precision, TrainerConfig

log = logging.getLogger(__name__)


class ModelError(Exception):
    """The base model or tokenizer cannot be loaded; the trainer exits with ExitCode.MODEL_ERROR."""


TORCH_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}


def resolve_model_location(source: ModelSource) -> tuple[str, str | None]:
    """(path or hub id, revision) for ``from_pretrained``. ``file://`` and plain paths are local."""
    path, revision = source.path, source.revision
    if path.startswith("file://"):
        return path.removeprefix("file://"), revision
    if path.startswith("hf://"):
        name = path.removeprefix("hf://")
        if "@" in name:
            name, _, rev = name.partition("@")
            revision = revision or rev
        return name, revision
    if "://" in path:
        raise ConfigError(f"model.path {path!r}: unsupported scheme (use a local/PVC path, file:// or hf://)")
    return path, revision


def check_model_source(source: ModelSource) -> None:
    """Cheap pre-flight check: a local model folder must exist and hold a config.json."""
    location, _ = resolve_model_location(source)
    if source.path.startswith("hf://"):
        return
    if not (Path(location) / "config.json").is_file():
        raise ModelError(f"model.path {source.path!r}: no Hugging Face model (config.json) at {location}")


def check_cuda_requirements(cfg: TrainerConfig) -> None:
    if cfg.method is Method.QLORA and not torch.cuda.is_available():
        raise ConfigError(
            "method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit kernels); none is visible. "
            "Use method 'lora' on CPU, or request GPUs."
        )


def load_tokenizer(cfg: TrainerConfig) -> Any:
    from transformers import AutoTokenizer

    location, revision = resolve_model_location(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {cfg.model.path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _override_dropout(model_config: Any, dropout: float) -> list[str]:
    changed = []
    for key, value in list(vars(model_config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(model_config, key, dropout)
            changed.append(key)
    return changed


@contextmanager
def _zero3_init(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Keep an HfDeepSpeedConfig alive so from_pretrained partitions the weights while loading (ZeRO-3)."""
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        del keep_alive


def load_pretrained(
    cfg: TrainerConfig,
    auto_class: Any,
    *,
    device: torch.device,
    ds_config: dict[str, Any] | None,
    what: str,
    new_head: bool = False,
    **config_overrides: Any,
) -> Any:
    """``auto_class.from_pretrained`` of ``model.path`` with the dropout override, QLoRA quantisation and
    ZeRO-3 partitioned loading applied; ``config_overrides`` go to the model config (``num_labels``,
    ``id2label``...). ``what`` names the model kind in the error (``a causal LM``). ``new_head``: the
    checkpoint's classification head may have another number of classes; it is then initialised afresh."""
    from transformers import AutoConfig

    location, revision = resolve_model_location(cfg.model)
    trust = cfg.model.trust_remote_code
    try:
        model_config = AutoConfig.from_pretrained(
            location, revision=revision, trust_remote_code=trust, **config_overrides
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config of {cfg.model.path!r}: {exc}") from exc
    if cfg.hyperparameters.dropout is not None:
        changed = _override_dropout(model_config, cfg.hyperparameters.dropout)
        log.info("dropout %.3f set on %s", cfg.hyperparameters.dropout, ", ".join(changed) or "nothing")
    kwargs: dict[str, Any] = {"config": model_config, "revision": revision, "trust_remote_code": trust}
    if new_head:
        kwargs["ignore_mismatched_sizes"] = True
    if cfg.method is Method.QLORA:
        from transformers import BitsAndBytesConfig

        compute = TORCH_DTYPES[cfg.distributed.precision]
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,
        )
        kwargs["dtype"] = compute
        if cfg.distributed.zero_stage != 3:
            kwargs["device_map"] = {"": device}
    else:
        # Master weights in fp32; DeepSpeed (or autocast) computes in bf16/fp16.
        kwargs["dtype"] = torch.float32
    try:
        with _zero3_init(ds_config):
            return auto_class.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model {cfg.model.path!r} as {what}: {exc}") from exc


def apply_method(cfg: TrainerConfig, model: Any, *, peft_task_type: str) -> nn.Module:
    """The model as ``cfg.method`` trains it: gradient checkpointing for a full fine-tune, LoRA/QLoRA
    adapters of the given peft task type (``CAUSAL_LM``, ``SEQ_CLS``...) otherwise."""
    if cfg.method is Method.FULL:
        if cfg.hyperparameters.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model  # type: ignore[no-any-return]
    return _with_lora(cfg, model, peft_task_type)


def _with_lora(cfg: TrainerConfig, model: Any, task_type: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method is Method.QLORA:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=cfg.hyperparameters.gradient_checkpointing
        )
    elif cfg.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets: str | list[str] = cfg.lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias=cfg.lora.bias,
        task_type=task_type,
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"lora.targetModules {cfg.lora.target_modules}: {exc}") from exc
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters count with their full size."""
    trainable = total = 0
    for param in model.parameters():
        n = int(getattr(param, "ds_numel", param.numel()))
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
