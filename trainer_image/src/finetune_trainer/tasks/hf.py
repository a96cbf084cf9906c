"""What the Hugging Face tasks share at the finish: saving the artifact folder (``model/`` for a full
fine-tune or a merged adapter, ``adapter/`` for LoRA/QLoRA) with the processor (tokenizer, image
processor) next to the weights, so that ``from_pretrained`` of the folder gives the trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.config import Method, TrainerConfig
from finetune_trainer.modeling import TORCH_DTYPES, resolve_model_location
from finetune_trainer.tasks.base import Exported


def save_pretrained_artifact(
    cfg: TrainerConfig,
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    out: Path,
    processor: Any,
    auto_class: Any,
    **config_overrides: Any,
) -> Exported:
    """Write ``out/model`` (full) or ``out/adapter`` (+ ``out/model`` merged with ``output.mergeAdapter``);
    the merge reloads the base with ``auto_class`` and ``config_overrides`` (``num_labels``...)."""
    model: Any = module
    model_dir, adapter_dir = out / "model", out / "adapter"
    if cfg.method is Method.FULL:
        model.save_pretrained(str(model_dir), state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(str(model_dir))
        return Exported(model_dir, "full")
    model.save_pretrained(str(adapter_dir), state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(str(adapter_dir))
    if not cfg.output.merge_adapter:
        return Exported(adapter_dir, "adapter")
    from peft import PeftModel

    dtype = torch.float32 if cfg.method is Method.LORA else TORCH_DTYPES[cfg.distributed.precision]
    location, revision = resolve_model_location(cfg.model)
    base = auto_class.from_pretrained(
        location,
        revision=revision,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        **config_overrides,
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(model_dir), safe_serialization=True)
    processor.save_pretrained(str(model_dir))
    return Exported(model_dir, "merged")
