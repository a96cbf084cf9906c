"""Deterministic prompt-variant augmentation of the training split."""

from __future__ import annotations

from dataclasses import replace

from finetune_trainer.data.config import AugmentationConfig
from finetune_trainer.data.mapping import Message, Record

__all__ = ["augment", "with_prompt"]


def with_prompt(record: Record, variant: str) -> Record:
    def rewrite(prompt: str) -> str:
        return variant.replace("{prompt}", prompt)

    if record.kind == "prompt-completion":
        return replace(record, parts={**record.parts, "prompt": rewrite(record.parts["prompt"])})
    if record.kind == "instruction":
        return replace(record, parts={**record.parts, "instruction": rewrite(record.parts["instruction"])})
    if record.kind == "chat":
        messages = list(record.messages)
        last_assistant = max(i for i, m in enumerate(messages) if m.role == "assistant")
        user = next((i for i in range(last_assistant - 1, -1, -1) if messages[i].role == "user"), None)
        if user is None:
            return record
        messages[user] = Message("user", rewrite(messages[user].content))
        return replace(record, messages=tuple(messages))
    return record


def augment(records: list[Record], cfg: AugmentationConfig) -> list[Record]:
    """The original rows followed by ``copies`` rewritten copies of each (copy i uses variant i mod len);
    copies identical to their original are skipped."""
    if cfg.strategy == "none" or cfg.copies == 0:
        return list(records)
    extra = []
    for copy in range(1, cfg.copies + 1):
        variant = cfg.variants[copy % len(cfg.variants)]
        for record in records:
            rewritten = with_prompt(record, variant)
            if rewritten != record:
                extra.append(rewritten)
    return [*records, *extra]
