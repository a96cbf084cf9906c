"""Causal language modelling: prompt/completion (or chat, instruction, plain text) rows, loss on the labels.

Examples are ``{"input_ids", "attention_mask", "labels"}`` lists (finetune_trainer.data.encoding); labels are
unshifted (Hugging Face style) and -100 outside the loss spans.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data.encoding import Example
from finetune_trainer.distributed import Distributed
from finetune_trainer.engine import Batch, DeepSpeedEngine, Engine, causal_lm_loss, evaluating


class CausalLM:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, examples: Sequence[Example], device: torch.device) -> Batch:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(example["labels"])
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    @staticmethod
    def fingerprint(examples: Sequence[Example]) -> str:
        digest = hashlib.sha256()
        for example in examples:
            digest.update(np.asarray(example["input_ids"], dtype=np.int32).tobytes())
            digest.update(np.asarray(example["labels"], dtype=np.int32).tobytes())
        return digest.hexdigest()[:16]

    @staticmethod
    def tokens(examples: Sequence[Example]) -> int:
        return sum(len(e["input_ids"]) for e in examples)

    def eval_sums(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Summed loss, labelled-token count and next-token hits of one batch."""
        loss, count = causal_lm_loss(logits, batch["labels"])
        predictions = logits[:, :-1, :].argmax(-1)
        targets = batch["labels"][:, 1:]
        hits = ((predictions == targets) & (targets != -100)).sum()
        return {"loss_sum": float(loss) * float(count), "tokens": float(count), "correct": float(hits)}

    def final_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """loss, perplexity and next-token accuracy over the labelled tokens."""
        tokens = max(sums["tokens"], 1.0)
        mean = sums["loss_sum"] / tokens
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": sums["correct"] / tokens}

    def generation_samples(
        self, cfg: TrainerConfig, engine: Engine, tokenizer: Any, data: Any, dist: Distributed
    ) -> list[dict[str, str]]:
        """Greedy completions of the first validation prompts (every rank generates: ZeRO-3 needs it)."""
        wanted = cfg.evaluation.generation_samples
        prompts = list(getattr(data, "samples", {}).get("validation", []))[:wanted]
        if not prompts:
            return []
        synced = isinstance(engine, DeepSpeedEngine) and cfg.distributed.zero_stage == 3
        module: Any = engine.module
        out = []
        with evaluating(engine):
            for sample in prompts:
                encoded = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)
                ids = encoded["input_ids"].to(dist.device)
                generated = module.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=cfg.evaluation.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                    synced_gpus=synced and dist.world_size > 1,
                )
                text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
                out.append({"prompt": sample.prompt, "reference": sample.completion, "generated": text})
        return out
