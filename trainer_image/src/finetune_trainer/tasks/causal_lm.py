"""Causal language modelling: prompt/completion (or chat, instruction, plain text) rows, loss on the labels.

Examples are ``{"input_ids", "attention_mask", "labels"}`` lists (finetune_trainer.data.encoding); labels are
unshifted (Hugging Face style) and -100 outside the loss spans.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data.encoding import Example
from finetune_trainer.tasks.base import Batch, Exported


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the labelled tokens, number of labelled tokens); labels are unshifted (HF style)."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    count = (shifted_labels != -100).sum()
    loss = functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return loss / count.clamp(min=1), count


def collate_tokens(examples: Sequence[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-padded ``input_ids`` (``pad_id``), ``attention_mask`` and ``labels`` (-100) of equal width."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def token_fingerprint(examples: Sequence[Mapping[str, Any]]) -> str:
    """A digest of the examples' ids and labels (what prepared data computes while writing)."""
    computed = getattr(examples, "fingerprint", None)  # prepared data computed it while writing
    if callable(computed):
        return str(computed())
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example["input_ids"], dtype=np.int32).tobytes())
        digest.update(np.asarray(example["labels"], dtype=np.int32).tobytes())
    return digest.hexdigest()[:16]


def prepare_text(
    cfg: TrainerConfig, tokenizer: Any, workdir: Path, *, store: Path, attempt: str, wait: bool
) -> Any:
    """The text data pipeline (finetune_trainer.data.pipeline.prepare) for a text task."""
    from finetune_trainer.data.pipeline import prepare

    return prepare(
        cfg.data,
        tokenizer,
        workdir,
        model_license=cfg.model.license,
        store=store,
        attempt=attempt,
        wait=wait,
    )


class CausalLM:
    name: ClassVar[str] = "causal-lm"
    unit: ClassVar[str] = "tokens"

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.tokenizer: Any = None
        self.pad_id = 0

    # ---------------------------------------------------------------------------------------- set-up
    def load_processor(self) -> Any:
        from finetune_trainer.modeling import load_tokenizer

        self.tokenizer = load_tokenizer(self.cfg)
        self.pad_id = int(self.tokenizer.pad_token_id)
        return self.tokenizer

    def prepare(self, processor: Any, workdir: Path, *, store: Path, attempt: str, wait: bool) -> Any:
        return prepare_text(self.cfg, processor, workdir, store=store, attempt=attempt, wait=wait)

    def load_model(self, prepared: Any, device: torch.device, ds_config: dict[str, Any] | None) -> nn.Module:
        from transformers import AutoModelForCausalLM

        from finetune_trainer.modeling import apply_method, load_pretrained

        model = load_pretrained(
            self.cfg, AutoModelForCausalLM, device=device, ds_config=ds_config, what="a causal LM"
        )
        model.config.use_cache = False
        return apply_method(self.cfg, model, peft_task_type="CAUSAL_LM")

    # ------------------------------------------------------------------------------------- the loop
    def collate(self, examples: Sequence[Example], device: torch.device) -> Batch:
        return collate_tokens(examples, self.pad_id, device)

    def forward(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # type: ignore[no-any-return]

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        loss, _ = causal_lm_loss(
            outputs, batch["labels"], label_smoothing=self.cfg.hyperparameters.label_smoothing
        )
        return loss

    @staticmethod
    def units(examples: Sequence[Example]) -> int:
        return sum(len(e["input_ids"]) for e in examples)

    @staticmethod
    def fingerprint(examples: Sequence[Example]) -> str:
        return token_fingerprint(examples)

    # ----------------------------------------------------------------------------------- evaluation
    def eval_sums(self, outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Summed loss, labelled-token count and next-token hits of one batch."""
        loss, count = causal_lm_loss(outputs, batch["labels"])
        predictions = outputs[:, :-1, :].argmax(-1)
        targets = batch["labels"][:, 1:]
        hits = ((predictions == targets) & (targets != -100)).sum()
        return {"loss_sum": float(loss) * float(count), "tokens": float(count), "correct": float(hits)}

    def eval_records(self, outputs: torch.Tensor, batch: Batch) -> list[Any]:
        return []

    def final_metrics(self, sums: Mapping[str, float], records: Sequence[Any]) -> dict[str, float]:
        """loss, perplexity and next-token accuracy over the labelled tokens."""
        tokens = max(sums["tokens"], 1.0)
        mean = sums["loss_sum"] / tokens
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": sums["correct"] / tokens}

    # --------------------------------------------------------------------------------------- finish
    def samples(
        self, module: nn.Module, prepared: Any, device: torch.device, synced: bool
    ) -> list[dict[str, Any]]:
        """Greedy completions of the first validation prompts (every rank generates: ZeRO-3 needs it)."""
        wanted = self.cfg.evaluation.generation_samples
        prompts = list(getattr(prepared, "samples", {}).get("validation", []))[:wanted]
        generator: Any = module
        out: list[dict[str, Any]] = []
        for sample in prompts:
            encoded = self.tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)
            ids = encoded["input_ids"].to(device)
            generated = generator.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.cfg.evaluation.max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                synced_gpus=synced,
            )
            text = self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            out.append({"prompt": sample.prompt, "reference": sample.completion, "generated": text})
        return out

    def export(
        self, module: nn.Module, state_dict: dict[str, torch.Tensor], out: Path, prepared: Any
    ) -> Exported:
        from transformers import AutoModelForCausalLM

        from finetune_trainer.tasks.hf import save_pretrained_artifact

        return save_pretrained_artifact(
            self.cfg, module, state_dict, out, self.tokenizer, AutoModelForCausalLM
        )

    def card_section(self, metrics: Mapping[str, Any], out: Path) -> str:
        lines = [
            "Loss and perplexity over completion tokens; accuracy is next-token accuracy on those tokens.",
            "",
        ]
        if metrics.get("samples"):
            lines += [
                "## Sample completions",
                "",
                "Greedy completions of validation prompts by the exported model.",
                "",
            ]
            for sample in metrics["samples"]:
                lines += [
                    "```text",
                    sample["prompt"].rstrip(),
                    "```",
                    f"- generated: `{_inline(sample['generated'])}`",
                    f"- reference: `{_inline(sample['reference'])}`",
                    "",
                ]
        return "\n".join(lines)


def _inline(text: str) -> str:
    return " ".join(text.replace("`", "'").split())[:300]
